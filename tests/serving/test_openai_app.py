"""The OpenAI app against in-memory FakeLinks (no data plane, no Ray)."""

import asyncio
import json

import pytest

from amoe_serve.sampler import SamplingParams
from amoe_serve.serving.fake_link import FakeLink
from amoe_serve.serving.openai_app import ModelEntry, build_app
from amoe_serve.serving.settings import ServingConfig
from amoe_serve.tokenizer import Tokenizer

from .conftest import byte_ids, call_asgi, client, make_app, run, sse_events


def _err(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


# ----------------------------------------------------------------------------- completions


def test_completion_non_stream_exact_ids_text_usage(model_dir):
    link = FakeLink("m")
    app = make_app(model_dir, {"m": link})

    async def go():
        async with client(app) as c:
            r = await c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 5,
                                                      "some_unknown_field": {"x": 1}, "user": "u1"})
            assert r.status_code == 200, r.text
            b = r.json()
            assert b["object"] == "text_completion" and b["id"].startswith("cmpl-") and b["model"] == "m"
            assert isinstance(b["created"], int)
            ch = b["choices"][0]
            # BOS + 'h' 'i' -> the fake continues with the next byte ids: 'j' 'k' 'l' 'm' 'n'.
            assert link.requests[0]["prompt"] == [1] + byte_ids("hi")
            assert ch["token_ids"] == byte_ids("jklmn")
            assert ch["text"] == "jklmn" and ch["finish_reason"] == "length" and ch["logprobs"] is None
            assert b["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
            # Sampling params reach the data plane; the default model's generation_config is greedy.
            p = link.requests[0]["params"]
            assert SamplingParams.from_dict(p) == SamplingParams(max_tokens=5, temperature=0.0)
            assert p == {"max_tokens": 5}  # fields at their defaults do not travel

            # Token-id prompts (also as a one-element batch), explicit sampling fields, no model.
            r = await c.post("/v1/completions", json={"prompt": [[10, 11]], "temperature": 1, "top_p": 0.5,
                                                      "seed": 7, "stop_token_ids": [15], "ignore_eos": True})
            assert r.status_code == 200, r.text
            ch = r.json()["choices"][0]
            assert ch["token_ids"] == [12, 13, 14, 15] and ch["finish_reason"] == "stop"
            assert SamplingParams.from_dict(link.requests[1]["params"]) == SamplingParams(
                max_tokens=16, temperature=1.0, top_p=0.5, seed=7, stop_token_ids=[15], ignore_eos=True)
            r = await c.post("/v1/completions", json={"prompt": ["ab"], "max_tokens": 2})
            assert r.json()["choices"][0]["text"] == "cd"
            # EOS (id 2) ends the request with "stop" and is not in the text.
            r = await c.post("/v1/completions", json={"prompt": [0], "max_tokens": 10})
            ch = r.json()["choices"][0]
            assert ch["token_ids"] == [1, 2] and ch["finish_reason"] == "stop" and ch["text"] == ""
        assert link.cancels == []

    run(go())


def test_completion_stream_framing_and_usage(model_dir):
    app = make_app(model_dir)

    async def go():
        async with client(app) as c:
            r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5, "stream": True,
                                                      "stream_options": {"include_usage": True}})
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert "content-length" not in r.headers  # a streamed body has no length
            ev = sse_events(r.text)
            assert ev[-1] == "[DONE]"
            usage = ev[-2]
            assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 5,
                                                                  "total_tokens": 8}
            chunks = ev[:-2]
            assert all(c["object"] == "text_completion" for c in chunks)
            assert len({c["id"] for c in chunks}) == 1
            assert "".join(c["choices"][0]["text"] for c in chunks) == "jklmn"
            assert sum((c["choices"][0]["token_ids"] for c in chunks), []) == byte_ids("jklmn")
            assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
            assert all(c["usage"] is None for c in chunks)

            # Without include_usage: no usage chunk, no usage key.
            r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": True})
            ev = sse_events(r.text)
            assert ev[-1] == "[DONE]" and ev[-2]["choices"][0]["finish_reason"] == "length"
            assert all("usage" not in e for e in ev[:-1])

    run(go())


def test_stream_and_non_stream_agree_on_multibyte_utf8(model_dir):
    """A byte-level tokenizer splits each non-ASCII character over several tokens; the stream
    must never emit half a character (U+FFFD) and must concatenate to the full text."""
    text = "héllo 世界 🎉 ok ñ"
    script = byte_ids(text)
    tok = Tokenizer.from_dir(model_dir)
    assert tok.decode(script) == text
    app = make_app(model_dir, {"m": FakeLink("m", script=script)})

    async def go():
        async with client(app) as c:
            body = {"prompt": "x", "max_tokens": len(script), "stream": True}
            ev = sse_events((await c.post("/v1/completions", json=body)).text)
            chunks = ev[:-1]
            pieces = [c["choices"][0]["text"] for c in chunks]
            assert "".join(pieces) == text
            assert not any("\ufffd" in p for p in pieces)
            assert sum((c["choices"][0]["token_ids"] for c in chunks), []) == script
            assert len(chunks) < len(script)  # multi-byte characters came out whole
            assert "🎉" in pieces
            r = await c.post("/v1/completions", json={**body, "stream": False})
            assert r.json()["choices"][0]["text"] == text

    run(go())


def test_incremental_decoder_matches_full_decode_on_random_bytes(model_dir):
    """Also with invalid UTF-8 (a random model emits any byte), the concatenated deltas equal
    the decode of all ids."""
    import random

    from amoe_serve.serving.output_text import OutputText

    tok = Tokenizer.from_dir(model_dir)
    rng = random.Random(0)
    for trial in range(200):
        ids = [rng.choice([rng.randrange(3, 259), 3 + 0xE4, 3 + 0xB8, 3 + 0x96, 3 + 0xF0, 3 + 0x9F, 2])
               for _ in range(rng.randrange(1, 40))]
        out = OutputText(tok, [])
        got = "".join(out.add(t) for t in ids) + out.finish()
        assert got == tok.decode(ids), (trial, ids)
        assert out.token_ids == ids


# ----------------------------------------------------------------------------- stop strings


def test_stop_strings_truncate_and_cancel(model_dir):
    text = "hello world. STOP here and more"
    link = FakeLink("m", script=byte_ids(text))
    app = make_app(model_dir, {"m": link})

    async def go():
        async with client(app) as c:
            r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 40, "stop": ["xyz", "STOP"]})
            ch = r.json()["choices"][0]
            assert ch["text"] == "hello world. " and ch["finish_reason"] == "stop"
            assert ch["token_ids"] == byte_ids("hello world. STOP")  # up to the completing token
            assert r.json()["usage"]["completion_tokens"] == len(byte_ids("hello world. STOP"))
            assert link.cancels == [0]  # the rest was cancelled in the data plane

            r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 40, "stop": "STOP",
                                                      "stream": True})
            ev = sse_events(r.text)
            pieces = [e["choices"][0]["text"] for e in ev[:-1]]
            assert "".join(pieces) == "hello world. "  # no partial "S", "ST", ... leaked
            assert ev[-2]["choices"][0]["finish_reason"] == "stop"
            assert link.cancels == [0, 1]

            # A stop string that never occurs: full text, finish by length.
            r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 5, "stop": ["zzz"],
                                                      "stream": True})
            ev = sse_events(r.text)
            assert "".join(e["choices"][0]["text"] for e in ev[:-1]) == "hello"
            assert ev[-2]["choices"][0]["finish_reason"] == "length"

    run(go())


# ----------------------------------------------------------------------------- chat


def test_chat_default_template_non_stream_and_stream(model_dir):
    link = FakeLink("m", script=byte_ids("Hi there!"))
    app = make_app(model_dir, {"m": link})
    tok = Tokenizer.from_dir(model_dir)

    async def go():
        async with client(app) as c:
            msgs = [{"role": "system", "content": "be nice"},
                    {"role": "user", "content": [{"type": "text", "text": "hello"}]}]
            r = await c.post("/v1/chat/completions", json={"model": "m", "messages": msgs, "max_tokens": 20})
            assert r.status_code == 200, r.text
            b = r.json()
            assert b["object"] == "chat.completion" and b["id"].startswith("chatcmpl-")
            ch = b["choices"][0]
            assert ch["message"] == {"role": "assistant", "content": "Hi there!"}
            assert ch["finish_reason"] == "stop" and ch["token_ids"] == byte_ids("Hi there!")
            prompt = link.requests[0]["prompt"]
            assert prompt[0] == 1 and prompt[1] != 1
            assert tok.decode(prompt) == "<|system|>\nbe nice\n<|user|>\nhello\n<|assistant|>\n"
            assert b["usage"]["prompt_tokens"] == len(prompt)
            assert link.requests[0]["params"]["max_tokens"] == 20

            r = await c.post("/v1/chat/completions", json={"messages": msgs, "stream": True,
                                                           "stream_options": {"include_usage": True}})
            ev = sse_events(r.text)
            assert ev[-1] == "[DONE]"
            assert all(e["object"] == "chat.completion.chunk" for e in ev[:-1])
            assert ev[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            content = "".join(e["choices"][0]["delta"].get("content", "") for e in ev[:-2])
            assert content == "Hi there!"
            assert ev[-3]["choices"][0]["finish_reason"] == "stop" and ev[-3]["choices"][0]["delta"] == {}
            assert ev[-2]["usage"]["completion_tokens"] == len(byte_ids("Hi there!"))
            # No max_tokens: the room left in the context (bounded by max_tokens_limit=4096).
            assert link.requests[1]["params"]["max_tokens"] == 2048 - len(prompt)

    run(go())


def test_chat_jinja_template_from_checkpoint(model_dir, tmp_path):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(model_dir, ck)
    cfg = json.loads((ck / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}"
                            "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
                            "{% if add_generation_prompt %}[assistant]{% endif %}")
    (ck / "tokenizer_config.json").write_text(json.dumps(cfg))
    link = FakeLink("m", script=byte_ids("ok"))
    entry = ModelEntry.from_checkpoint("m", link, ck)
    app = build_app({"m": entry}, ServingConfig())
    tok = Tokenizer.from_dir(ck)

    async def go():
        async with client(app) as c:
            msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                    {"role": "user", "content": "q2"}]
            r = await c.post("/v1/chat/completions", json={"messages": msgs})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == "ok"
            prompt = link.requests[0]["prompt"]
            assert prompt[:2] == [1] + byte_ids("[")  # exactly one BOS
            assert tok.decode(prompt) == "[user]q[assistant]a[user]q2[assistant]"
            # A content part the server cannot render is the client's error.
            r = await c.post("/v1/chat/completions", json={"messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
            _err(r, 400)

    run(go())


# ----------------------------------------------------------------------------- models


def test_two_models_and_model_selection(model_dir):
    a, b = FakeLink("a"), FakeLink("b", script=byte_ids("from b"), max_model_len=512)
    app = make_app(model_dir, {"a": a, "b": b})

    async def go():
        async with client(app) as c:
            r = await c.get("/v1/models")
            assert r.status_code == 200
            body = r.json()
            assert body["object"] == "list"
            assert [(m["id"], m["object"], m["max_model_len"]) for m in body["data"]] == \
                [("a", "model", 2048), ("b", "model", 512)]
            ra = await c.post("/v1/completions", json={"model": "a", "prompt": "hi", "max_tokens": 2})
            rb = await c.post("/v1/completions", json={"model": "b", "prompt": "hi", "max_tokens": 6})
            assert ra.json()["choices"][0]["text"] == "jk" and ra.json()["model"] == "a"
            assert rb.json()["choices"][0]["text"] == "from b" and rb.json()["model"] == "b"
            assert len(a.requests) == 1 and len(b.requests) == 1
            # Ray Serve's multiplexed-model header picks the model when the body does not.
            r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 6},
                             headers={"serve_multiplexed_model_id": "b"})
            assert r.json()["model"] == "b" and len(b.requests) == 2
            e = _err(await c.post("/v1/completions", json={"prompt": "hi"}), 400)
            assert e["param"] == "model" and "a, b" in e["message"]
            e = _err(await c.post("/v1/completions", json={"model": "nope", "prompt": "hi"}), 404)
            assert "a, b" in e["message"] and e["code"] == "model_not_found"

    run(go())


# ----------------------------------------------------------------------------- errors


def test_400_bad_values(model_dir):
    link = FakeLink("m", max_model_len=64, vocab_size=259)
    app = make_app(model_dir, {"m": link}, max_prompt_tokens=20, max_tokens_limit=30)

    async def go():
        async with client(app) as c:
            async def bad(body, param=None, path="/v1/completions"):
                e = _err(await c.post(path, json=body), 400)
                if param is not None:
                    assert e["param"] == param, e
                return e

            await bad({"prompt": "x" * 30}, "prompt")                       # > max_prompt_tokens
            await bad({"prompt": list(range(3, 40))}, "prompt")             # token ids: too long too
            await bad({"prompt": "hi", "max_tokens": 31}, "max_tokens")     # > max_tokens_limit
            await bad({"prompt": "hi", "max_tokens": 0}, "max_tokens")
            await bad({"prompt": "hi", "n": 0}, "n")
            await bad({"prompt": "hi", "n": 17}, "n")
            await bad({"prompt": [5, 259]}, "prompt")                       # out of vocab
            await bad({"prompt": [5, -1]}, "prompt")
            await bad({"prompt": []}, "prompt")
            await bad({"prompt": ""}, "prompt")
            await bad({"prompt": ["a", ""]}, "prompt")                      # each prompt of a batch is checked
            await bad({"prompt": [[5], [5, 300]]}, "prompt")
            await bad({"prompt": "hi", "stop": [""]}, "stop")
            await bad({"prompt": "hi", "stop_token_ids": [999]}, "stop_token_ids")
            await bad({"prompt": "hi", "temperature": -1})
            await bad({"prompt": "hi", "top_p": 0})
            await bad({"prompt": "hi", "seed": -3}, "seed")
            await bad({"prompt": "hi", "logprobs": 21}, "logprobs")
            await bad({"prompt": "hi", "best_of": 2}, "best_of")
            await bad({"prompt": "hi", "suffix": "x"}, "suffix")
            await bad({"prompt": "hi", "tools": [{"type": "function"}]}, "tools")
            await bad({"prompt": "hi", "presence_penalty": 2.5}, "presence_penalty")
            await bad({"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty")
            await bad({"prompt": "hi", "top_k": -2}, "top_k")
            await bad({"prompt": "hi", "min_p": 1.5}, "min_p")
            await bad({"prompt": "hi", "logit_bias": {"999": 1}}, "logit_bias")
            await bad({"prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias")
            await bad({"prompt": "hi", "min_tokens": 20, "max_tokens": 5}, "min_tokens")
            await bad({"prompt": "hi", "prompt_logprobs": 21}, "prompt_logprobs")
            await bad({"prompt": "hi", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens")
            await bad({"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
                      "response_format")
            await bad({"prompt": "hi", "structured_outputs": {"regex": "(unclosed"}}, "structured_outputs")
            await bad({"prompt": "hi", "structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs")
            await bad({"messages": [{"role": "user", "content": "x" * 30}]}, "prompt", "/v1/chat/completions")
            await bad({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n", "/v1/chat/completions")
            await bad({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs",
                      "/v1/chat/completions")
            await bad({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
                      "top_logprobs", "/v1/chat/completions")
        assert link.requests == []  # nothing reached the data plane

    run(go())


def test_400_prompt_plus_max_tokens_over_context(model_dir):
    app = make_app(model_dir, {"m": FakeLink("m", max_model_len=64)}, max_tokens_limit=0)

    async def go():
        async with client(app) as c:
            e = _err(await c.post("/v1/completions", json={"prompt": list(range(3, 53)), "max_tokens": 20}), 400)
            assert e["code"] == "context_length_exceeded"
            _err(await c.post("/v1/completions", json={"prompt": list(range(3, 67))}), 400)  # 64 >= max_model_len
            # Default max_tokens is clamped to the room left instead.
            r = await c.post("/v1/completions", json={"prompt": list(range(3, 60))})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 7

    run(go())


def test_data_plane_400_passes_through(model_dir):
    app = make_app(model_dir, {"m": FakeLink("m", fail_status=400)})

    async def go():
        async with client(app) as c:
            _err(await c.post("/v1/completions", json={"prompt": "hi"}), 400)

    run(go())


def test_401_api_keys(model_dir):
    app = make_app(model_dir, api_keys=["sekret", "other"])

    async def go():
        async with client(app) as c:
            body = {"prompt": "hi", "max_tokens": 1}
            e = _err(await c.post("/v1/completions", json=body), 401)
            assert e["type"] == "authentication_error"
            _err(await c.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"}), 401)
            _err(await c.post("/v1/completions", json=body, headers={"Authorization": "sekret"}), 401)
            _err(await c.get("/v1/models"), 401)
            _err(await c.post("/v1/chat/completions", json={"messages": []}), 401)  # auth before the body
            r = await c.post("/v1/completions", json=body, headers={"Authorization": "Bearer sekret"})
            assert r.status_code == 200
            r = await c.get("/v1/models", headers={"Authorization": "Bearer other"})
            assert r.status_code == 200
            # Health and metrics stay open.
            assert (await c.get("/health")).status_code == 200
            assert (await c.get("/metrics")).status_code == 200

    run(go())


def test_404_405_routes(model_dir):
    app = make_app(model_dir)

    async def go():
        async with client(app) as c:
            _err(await c.get("/v1/nothing"), 404)
            _err(await c.post("/v2/completions", json={}), 404)
            r = await c.get("/v1/completions")
            _err(r, 405)
            assert "POST" in r.headers.get("allow", "")
            _err(await c.delete("/v1/models"), 405)

    run(go())


def test_413_body_too_large(model_dir):
    link = FakeLink("m")
    app = make_app(model_dir, {"m": link}, max_body_bytes=1000)

    async def go():
        async with client(app) as c:
            e = _err(await c.post("/v1/completions", json={"prompt": "x" * 2000}), 413)
            assert e["code"] == "request_too_large"

            async def chunked():  # no Content-Length: the bytes actually read are counted
                for _ in range(20):
                    yield b" " * 100

            r = await c.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
            assert "content-length" not in r.request.headers
            _err(r, 413)
            r = await c.post("/v1/completions", content=b"{}", headers={"content-length": "abc"})
            assert r.status_code in (400, 413, 422)
        assert link.requests == []

    run(go())


def test_422_schema_and_json(model_dir):
    app = make_app(model_dir)

    async def go():
        async with client(app) as c:
            async def bad(content=None, json_body=None, path="/v1/completions"):
                if json_body is not None:
                    r = await c.post(path, json=json_body)
                else:
                    r = await c.post(path, content=content, headers={"content-type": "application/json"})
                return _err(r, 422)

            await bad(content=b"{not json")
            await bad(content=b"")
            await bad(content=b"\xff\xfe\x00garbage")
            await bad(content=b"[" * 100000 + b"]" * 100000)
            await bad(json_body=[1, 2])
            await bad(json_body={"max_tokens": 3})                         # no prompt
            e = await bad(json_body={"prompt": "hi", "max_tokens": "16"})  # strict types
            assert e["param"] == "max_tokens"
            await bad(json_body={"prompt": "hi", "temperature": "hot"})
            await bad(json_body={"prompt": "hi", "stream": "yes"})
            await bad(json_body={"prompt": "hi", "max_tokens": 1.5})
            await bad(json_body={"prompt": "hi", "stop": 3})
            await bad(json_body={"prompt": {"a": 1}})
            await bad(json_body={"prompt": [1, "a"]})
            await bad(json_body={"prompt": "hi", "stream_options": {"include_usage": "x"}})
            await bad(json_body={"messages": []}, path="/v1/chat/completions")
            await bad(json_body={"messages": [{"content": "x"}]}, path="/v1/chat/completions")
            await bad(json_body={"messages": "hi"}, path="/v1/chat/completions")
            # NaN/Infinity are accepted by Python's JSON parser but are bad values.
            r = await c.post("/v1/completions", content=b'{"prompt": "hi", "temperature": NaN}',
                             headers={"content-type": "application/json"})
            _err(r, 400)
            r = await c.post("/v1/completions", content=b'{"prompt": "hi", "seed": 1e400}',
                             headers={"content-type": "application/json"})
            assert r.status_code in (400, 422)
            r = await c.post("/v1/completions", json={"prompt": "hi", "seed": 2**70})
            _err(r, 400)

    run(go())


def test_429_replica_limit_and_data_plane(model_dir):
    link = FakeLink("m", token_delay_s=0.02)
    app = make_app(model_dir, {"m": link}, max_concurrent_requests=1, retry_after_s=2.0)

    async def go():
        async with client(app) as c:
            first = asyncio.ensure_future(c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 20}))
            for _ in range(200):
                if link.active:
                    break
                await asyncio.sleep(0.005)
            assert link.active == 1
            r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            e = _err(r, 429)
            assert r.headers["retry-after"] == "2" and e["type"] == "rate_limit_error"
            r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": True})
            _err(r, 429)
            assert (await first).status_code == 200
            # The slot is free again.
            assert (await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})).status_code == 200

    run(go())

    refusing = FakeLink("m", fail_status=429, retry_after=2.5)
    app = make_app(model_dir, {"m": refusing})

    async def go2():
        async with client(app) as c:
            for stream in (False, True):
                r = await c.post("/v1/completions", json={"prompt": "hi", "stream": stream})
                _err(r, 429)
                assert r.headers["retry-after"] == "3"
            assert app.state.amoe.active == 0

    run(go2())


def test_503_down_and_stream_error_event(model_dir):
    down = FakeLink("m", down=True)
    app = make_app(model_dir, {"m": down, "ok": FakeLink("ok")})

    async def go():
        async with client(app) as c:
            for stream in (False, True):
                e = _err(await c.post("/v1/completions", json={"model": "m", "prompt": "hi", "stream": stream}), 503)
                assert e["type"] == "service_unavailable"
            r = await c.get("/health")
            e = _err(r, 503)
            assert r.json()["models"] == {"m": "down", "ok": "ok"} and "m" in e["message"]
            assert (await c.post("/v1/completions", json={"model": "ok", "prompt": "hi"})).status_code == 200
            down.down = False
            r = await c.get("/health")
            assert r.status_code == 200 and r.json()["status"] == "ok"

    run(go())

    failing = FakeLink("m", error_after=3)
    app = make_app(model_dir, {"m": failing})

    async def go2():
        async with client(app) as c:
            r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 10, "stream": True})
            assert r.status_code == 200  # the stream had started
            ev = sse_events(r.text)
            assert ev[-1] == "[DONE]"
            assert set(ev[-2]) == {"error"} and ev[-2]["error"]["type"] == "service_unavailable"
            assert "".join(e["choices"][0]["text"] for e in ev[:-2]) == "jkl"
            # The same failure without streaming is a plain 503.
            _err(await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 10}), 503)
            assert app.state.amoe.active == 0

    run(go2())


def test_504_timeout(model_dir):
    link = FakeLink("m", token_delay_s=0.2)
    app = make_app(model_dir, {"m": link}, request_timeout_s=0.3)

    async def go():
        async with client(app) as c:
            _err(await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 10}), 504)
            ev = sse_events((await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 10,
                                                                   "stream": True})).text)
            assert ev[-2]["error"]["code"] == "timeout" and ev[-1] == "[DONE]"
        assert len(link.cancels) == 2

    run(go())


# ----------------------------------------------------------------------------- disconnects


@pytest.mark.parametrize("how", ["receive", "send"])
def test_client_disconnect_mid_stream_cancels(model_dir, how):
    link = FakeLink("m", token_delay_s=0.02)
    app = make_app(model_dir, {"m": link})
    body = json.dumps({"prompt": "hi", "max_tokens": 200, "stream": True}).encode()

    async def go():
        kw = {"disconnect_after_chunks": 2} if how == "receive" else {"send_raises_after": 2, "spec_version": "2.4"}
        msgs = await call_asgi(app, "POST", "/v1/completions", body, **kw)
        assert msgs[0]["type"] == "http.response.start" and msgs[0]["status"] == 200
        assert link.cancels == [0] and link.active == 0
        assert app.state.amoe.active == 0
        assert b"[DONE]" not in b"".join(m.get("body", b"") for m in msgs)

    run(go())
    text = app.state.amoe.metrics.render().decode()
    assert 'amoe_requests_in_flight{model="m"} 0.0' in text
    assert 'amoe_requests_finished_total{finish_reason="cancelled",model="m"} 1.0' in text


def test_client_disconnect_non_stream_cancels(model_dir):
    link = FakeLink("m", token_delay_s=0.02)
    app = make_app(model_dir, {"m": link})
    body = json.dumps({"prompt": "hi", "max_tokens": 200}).encode()

    async def go():
        await call_asgi(app, "POST", "/v1/completions", body, disconnect_after_s=0.15)
        assert link.cancels == [0] and link.active == 0 and app.state.amoe.active == 0

    run(go())


# ----------------------------------------------------------------------------- metrics, health


def test_metrics_histograms_and_data_plane_gauges(model_dir):
    link = FakeLink("m", token_delay_s=0.001)
    app = make_app(model_dir, {"m": link})
    other = make_app(model_dir, {"m": FakeLink("m")})  # a second app: its own registry

    async def go():
        async with client(app) as c:
            await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
            await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "stream": True})
            await c.post("/v1/completions", json={"prompt": "hi", "n": 0})
            r = await c.get("/metrics")
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
            t = r.text
            for needle in (
                'amoe_http_requests_total{endpoint="/v1/completions",model="m",status="200"} 2.0',
                'amoe_http_requests_total{endpoint="/v1/completions",model="m",status="400"} 1.0',
                'amoe_time_to_first_token_seconds_count{model="m"} 2.0',
                'amoe_inter_token_latency_seconds_count{model="m"} 6.0',
                'amoe_inter_token_latency_seconds_bucket{le="0.001",model="m"}',
                'amoe_request_latency_seconds_count{endpoint="/v1/completions",model="m"} 2.0',
                'amoe_generated_tokens_total{model="m"} 8.0',
                'amoe_prompt_tokens_total{model="m"} 6.0',
                'amoe_requests_in_flight{model="m"} 0.0',
                'amoe_dataplane_up{model="m"} 1.0',
                'amoe_dataplane_queue_depth_mean{block="1",model="m",rank="1",slot="0"} 2.0',
                'amoe_dataplane_queue_depth_max{block="0",model="m",rank="1",slot="1"} 3.0',
                'amoe_dataplane_tokens_per_layer{block="1",model="m",rank="1",slot="1"} 40.0',
                'amoe_dataplane_batch_size_count{bucket="4-7",model="m",rank="1"} 1.0',
                'amoe_dataplane_idle_fraction{model="m",rank="0",role="attention"} 0.25',
                'amoe_gateway_waiting_requests{model="m"} 1.0',
                'amoe_gateway_running_requests{model="m"} 0.0',
                'amoe_gateway_kv_free_blocks{model="m",rank="0"} 1000.0',
            ):
                assert needle in t, needle
        # Malformed or failing stats never break a scrape.
        link._stats = {"ranks": {"0": "junk", "1": {"queue_depth_mean": "x", "batch_hist": [1],
                                                    "idle_fraction": None, "tokens_per_layer": [[1, "a"], 5]}},
                       "gateway": []}
        async with client(app) as c:
            t = (await c.get("/metrics")).text
            assert 'amoe_dataplane_tokens_per_layer{block="1",model="m",rank="1",slot="0"} 5.0' in t
            assert "queue_depth_mean{" not in t  # stale labels were dropped
            link.down = True
            r = await c.get("/metrics")
            assert r.status_code == 200 and 'amoe_dataplane_up{model="m"} 0.0' in r.text
        async with client(other) as c:
            assert 'status="200"' not in (await c.get("/metrics")).text

    run(go())


def test_health_ok(model_dir):
    app = make_app(model_dir)

    async def go():
        async with client(app) as c:
            r = await c.get("/health")
            assert r.status_code == 200 and r.json()["status"] == "ok"

    run(go())


def test_model_without_tokenizer_takes_token_ids(model_dir):
    link = FakeLink("raw")
    app = build_app({"raw": ModelEntry("raw", link)}, ServingConfig())

    async def go():
        async with client(app) as c:
            r = await c.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 3})
            ch = r.json()["choices"][0]
            assert ch["token_ids"] == [7, 8, 9] and ch["text"] == ""
            _err(await c.post("/v1/completions", json={"prompt": "text"}), 400)
            _err(await c.post("/v1/completions", json={"prompt": [5], "stop": "x"}), 400)
            _err(await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}), 400)
            # OpenAI's default temperature without a generation_config.
            assert link.requests[0]["params"]["temperature"] == 1.0

    run(go())
