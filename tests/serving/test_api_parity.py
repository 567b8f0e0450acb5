"""vLLM-parity request features of the OpenAI app, against in-memory FakeLinks: batched prompts,
n, echo, logprobs, prompt_logprobs, the new sampling fields and the tokenizer endpoints."""

import pytest

from amoe_serve.sampler import SamplingParams, StructuredSpec
from amoe_serve.serving.fake_link import FakeLink
from amoe_serve.serving.sampling_args import sample_seed

from .conftest import byte_ids, client, make_app, run, sse_events


def test_batched_prompts_and_n_index_and_usage(model_dir):
    link = FakeLink("m")
    app = make_app(model_dir, {"m": link})

    async def go():
        async with client(app) as c:
            r = await c.post("/v1/completions", json={"prompt": ["ab", "x"], "n": 2, "max_tokens": 2,
                                                      "temperature": 1.0, "seed": 5})
            assert r.status_code == 200, r.text
            b = r.json()
            assert [ch["index"] for ch in b["choices"]] == [0, 1, 2, 3]
            assert [ch["text"] for ch in b["choices"]] == ["cd", "cd", "yz", "yz"]
            # Each prompt counted once; every choice's tokens counted.
            assert b["usage"] == {"prompt_tokens": 3 + 2, "completion_tokens": 8, "total_tokens": 13}
            seeds = [q["params"]["seed"] for q in link.requests]
            assert seeds == [5, sample_seed(5, 1), 5, sample_seed(5, 1)] and seeds[0] != seeds[1]
            # Token-id batches too.
            r = await c.post("/v1/completions", json={"prompt": [[10, 11], [20]], "max_tokens": 1})
            assert [ch["token_ids"] for ch in r.json()["choices"]] == [[12], [21]]

    run(go())


def test_stream_n_interleaves_with_own_finish_and_usage(model_dir):
    app = make_app(model_dir, {"m": FakeLink("m", token_delay_s=0.001)})

    async def go():
        async with client(app) as c:
            r = await c.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "a"}], "n": 3, "max_tokens": 3, "stream": True,
                "stream_options": {"include_usage": True}})
            ev = sse_events(r.text)
            assert ev[-1] == "[DONE]"
            chunks = [e for e in ev[:-1] if e["choices"]]
            for i in range(3):
                mine = [e["choices"][0] for e in chunks if e["choices"][0]["index"] == i]
                assert mine[0]["delta"] == {"role": "assistant", "content": ""}
                assert [m["finish_reason"] for m in mine].count("length") == 1 and mine[-1]["finish_reason"] == "length"
                assert sum(len(m["token_ids"]) for m in mine) == 3
            assert ev[-2]["choices"] == [] and ev[-2]["usage"]["completion_tokens"] == 9

    run(go())


def test_echo_logprobs_in_lm_eval_shape(model_dir):
    """What lm-eval's local-completions sends for loglikelihood and how it reads the answer."""
    link = FakeLink("m")
    app = make_app(model_dir, {"m": link})

    async def go():
        async with client(app) as c:
            ctx = [[1, 10, 11, 12], [1, 20, 21]]
            r = await c.post("/v1/completions", json={"prompt": ctx, "echo": True, "logprobs": 1,
                                                      "max_tokens": 1, "temperature": 0, "seed": 1234})
            assert r.status_code == 200, r.text
            params = [SamplingParams.from_dict(q["params"]) for q in link.requests]
            assert all(p.logprobs == 1 and p.prompt_logprobs == 1 for p in params)
            for prompt, ch in zip(ctx, r.json()["choices"]):
                lp = ch["logprobs"]
                n = len(prompt) + 1  # prompt tokens, then the generated one
                assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
                assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
                assert lp["token_logprobs"][1:] == [-0.5] * (n - 1)
                for top in lp["top_logprobs"][1:]:
                    assert max(top.values()) == -0.5  # the token itself is the greedy one
                offs = lp["text_offset"]
                assert offs[0] == 0 and offs == sorted(offs)
                assert ch["text"].startswith(ch["text"][: offs[-1]])
            # lm-eval's own parser accepts it.
            lm_eval = pytest.importorskip("lm_eval.models.openai_completions")
            got = lm_eval.LocalCompletionsAPI.parse_logprobs(r.json(), ctx, [1, 1])
            assert got == [(-1.5, True), (-1.0, True)]  # the continuation: prompt tokens after ctxlen

    run(go())


def test_text_prompt_echo_and_prompt_logprobs(model_dir):
    app = make_app(model_dir, {"m": FakeLink("m")})

    async def go():
        async with client(app) as c:
            r = await c.post("/v1/completions", json={"prompt": "hi", "echo": True, "max_tokens": 2,
                                                      "prompt_logprobs": 2})
            ch = r.json()["choices"][0]
            assert ch["text"] == "hijk" and ch["logprobs"] is None
            plp = ch["prompt_logprobs"]
            assert plp[0] is None and len(plp) == 3
            t = str(byte_ids("h")[0])
            assert plp[1][t] == {"logprob": -0.5, "rank": 1, "decoded_token": "h"}

    run(go())


def test_chat_logprobs_shape(model_dir):
    app = make_app(model_dir, {"m": FakeLink("m")})

    async def go():
        async with client(app) as c:
            r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}],
                                                           "max_completion_tokens": 2, "logprobs": True,
                                                           "top_logprobs": 2})
            content = r.json()["choices"][0]["logprobs"]["content"]
            assert len(content) == 2
            for e in content:
                assert e["logprob"] == -0.5 and e["bytes"] == list(e["token"].encode())
                assert [t["logprob"] for t in e["top_logprobs"]] == [-0.5, -1.5]
            r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}],
                                                           "max_tokens": 2, "logprobs": True, "stream": True})
            chunks = [e for e in sse_events(r.text)[:-1] if e["choices"][0]["logprobs"]]
            assert sum(len(e["choices"][0]["logprobs"]["content"]) for e in chunks) == 2

    run(go())


def test_sampling_fields_reach_the_data_plane(model_dir):
    link = FakeLink("m")
    app = make_app(model_dir, {"m": link})

    async def go():
        async with client(app) as c:
            r = await c.post("/v1/completions", json={
                "prompt": "hi", "max_tokens": 4, "presence_penalty": 0.5, "frequency_penalty": -0.25,
                "repetition_penalty": 1.2, "top_k": 5, "min_p": 0.1, "logit_bias": {"7": 3, "9": -200},
                "min_tokens": 2, "truncate_prompt_tokens": 2,
                "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": {
                    "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}})
            assert r.status_code == 200, r.text
            p = SamplingParams.from_dict(link.requests[0]["params"])
            assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.top_k, p.min_p) == (
                0.5, -0.25, 1.2, 5, 0.1)
            assert p.logit_bias == {7: 3.0, 9: -100.0}  # clamped like OpenAI
            assert p.min_tokens == 2 and p.structured.kind == "json"
            assert link.requests[0]["prompt"] == byte_ids("hi")  # the last 2 tokens (BOS cut)
            r = await c.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "a"}], "max_tokens": 3,
                "structured_outputs": {"choice": ["yes", "no"]}})
            assert SamplingParams.from_dict(link.requests[1]["params"]).structured == StructuredSpec(
                "choice", '["yes", "no"]')

    run(go())


def test_include_stop_str_in_output(model_dir):
    app = make_app(model_dir, {"m": FakeLink("m")})

    async def go():
        async with client(app) as c:
            a = (await c.post("/v1/completions", json={"prompt": "a", "max_tokens": 8, "stop": ["de"]})).json()
            b = (await c.post("/v1/completions", json={"prompt": "a", "max_tokens": 8, "stop": ["de"],
                                                       "include_stop_str_in_output": True})).json()
            assert a["choices"][0]["text"] == "bc" and b["choices"][0]["text"] == "bcde"
            assert a["choices"][0]["finish_reason"] == b["choices"][0]["finish_reason"] == "stop"

    run(go())


def test_tokenizer_endpoints(model_dir):
    app = make_app(model_dir, {"m": FakeLink("m", max_model_len=99)})

    async def go():
        async with client(app) as c:
            r = (await c.post("/tokenize", json={"prompt": "hi", "return_token_strs": True})).json()
            assert r["tokens"] == [1] + byte_ids("hi") and r["count"] == 3 and r["max_model_len"] == 99
            assert len(r["token_strs"]) == 3
            r = (await c.post("/tokenize", json={"prompt": "hi", "add_special_tokens": False})).json()
            assert r["tokens"] == byte_ids("hi")
            r = (await c.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})).json()
            assert r["count"] > 3
            assert (await c.post("/detokenize", json={"tokens": byte_ids("hey")})).json() == {"prompt": "hey"}
            bad = await c.post("/detokenize", json={"tokens": [9999]})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
            bad = await c.post("/tokenize", json={})
            assert bad.status_code == 400
            info = (await c.get("/tokenizer_info")).json()
            assert info["tokenizer_class"] and info["model_max_length"] == 99

    run(go())


def test_chat_template_kwargs_reach_the_template():
    from amoe_serve.serving.chat import ChatTemplate, ChatTemplateError

    t = ChatTemplate(source="{% for m in messages %}[{{ m.content }}]{% endfor %}"
                            "{% if enable_thinking %}<think>{% endif %}")
    msgs = [{"role": "user", "content": "hi"}]
    assert t.render(msgs, template_kwargs={"enable_thinking": True}) == "[hi]<think>"
    assert t.render(msgs) == "[hi]"
    with pytest.raises(ChatTemplateError, match="messages"):
        t.render(msgs, template_kwargs={"messages": []})
