"""The ingress <-> gateway link: framing, authentication, streaming, cancellation, limits.
A real serving gateway with real attention/expert ranks (as threads) behind a real socket."""

import asyncio
import socket
import struct

import pytest

from amoe_serve.link import wire
from amoe_serve.config import load_config
from amoe_serve.engine.inproc import serve_inproc
from amoe_serve.link.api import DataPlaneError
from amoe_serve.link.client import LinkClient
from tests.support import PROMPTS

TOKEN = "s3cret-link-token"


def test_frames_round_trip_in_pieces_and_reject_garbage():
    r = wire.FrameReader(max_frame=64)
    data = wire.encode({"type": "a", "x": 1}) + wire.encode({"type": "b"})
    got = []
    for i in range(len(data)):  # one byte at a time
        got += r.feed(data[i:i + 1])
    assert got == [{"type": "a", "x": 1}, {"type": "b"}]
    with pytest.raises(wire.LinkProtocolError, match="exceeds"):
        wire.FrameReader(max_frame=64).feed(struct.pack(">I", 65) + b"x" * 65)
    for body in (b"\xff\xfe", b"[1,2]", b'{"no_type": 1}', b"{bad"):
        with pytest.raises(wire.LinkProtocolError):
            wire.FrameReader().feed(struct.pack(">I", len(body)) + body)
    assert wire.verify(TOKEN, "n1", wire.mac(TOKEN, "n1"))
    assert not wire.verify(TOKEN, "n1", wire.mac("other", "n1"))
    assert not wire.verify(TOKEN, "n1", None)


def _cfg(path, *extra):
    return load_config(overrides=[f"model.path={path}", "deployment.mode=aep", "deployment.attention_ranks=2",
                                  "deployment.expert_ranks=2", f"link.token={TOKEN}", "link.model_name=tiny", *extra])


@pytest.fixture(scope="module")
def served(checkpoints):
    with serve_inproc(_cfg(checkpoints["mixtral"], "link.max_queued_requests=4", "engine.max_running_requests=2",
                           "kv_cache.num_blocks=64")) as g:
        yield g


def _client(g, token=TOKEN):
    host, port = g.server.address
    return LinkClient(host, port, token)


async def _collect(client, ids, **params):
    toks, reasons = [], []
    async for ev in client.generate(ids, {"max_tokens": 8, **params}):
        if ev.token is not None:
            toks.append(ev.token)
        reasons.append(ev.finish_reason)
    return toks, reasons


def test_streams_the_same_tokens_as_local_mode(served, checkpoints, hf_reference):
    async def main():
        c = _client(served)
        info = await c.connect()
        assert info.name == "tiny" and info.vocab_size == 300
        outs = await asyncio.gather(*[_collect(c, p) for p in PROMPTS])
        assert await c.healthy()
        await c.close()
        return outs
    outs = asyncio.run(main())
    assert [t for t, _ in outs] == hf_reference["mixtral"]
    for _, reasons in outs:  # one event per token, the finish on the last
        assert reasons[:-1] == [None] * (len(reasons) - 1) and reasons[-1] in ("length", "stop")


def test_wrong_token_and_garbage_are_refused_and_the_server_survives(served):
    async def wrong():
        with pytest.raises(DataPlaneError, match="refused|closed|failed"):
            await _client(served, token="wrong").connect()
    asyncio.run(wrong())
    host, port = served.server.address
    for junk in (b"\x00\x00\x00\x05hello", b"\xff\xff\xff\xff" + b"x" * 10, b"GET / HTTP/1.1\r\n\r\n"):
        with socket.create_connection((host, port), timeout=5) as s:
            s.recv(4096)  # the challenge
            s.sendall(junk)
            s.settimeout(5)
            tail = b""
            while True:  # the server closes the connection
                chunk = s.recv(4096)
                if not chunk:
                    break
                tail += chunk
    # an authenticated client that then sends garbage is dropped too
    with socket.create_connection((host, port), timeout=5) as s:
        ch = wire.FrameReader().feed(s.recv(4096))[0]
        s.sendall(wire.encode({"type": "auth", "mac": wire.mac(TOKEN, ch["nonce"])}))
        assert wire.FrameReader().feed(s.recv(4096))[0]["type"] == "ready"
        s.sendall(struct.pack(">I", 10 << 20))
        s.settimeout(5)
        assert b"exceeds" in s.recv(4096)
    async def still_ok():
        c = _client(served)
        toks, _ = await _collect(c, PROMPTS[0])
        await c.close()
        return toks
    assert len(asyncio.run(still_ok())) >= 1


def test_bad_requests_get_400_with_a_reason(served):
    async def main():
        c = _client(served)
        for ids, params, msg in [([], {}, "non-empty"), ([1, 9999], {}, "token ids"), ([1, 2], {"temperature": -1}, "temperature"),
                                 ([1, 2], {"max_tokens": 5000}, "context limit"), ([1, 2], {"colour": 1}, "colour")]:
            with pytest.raises(DataPlaneError, match=msg) as ei:
                await _collect(c, ids, **params)
            assert ei.value.status == 400
        await c.close()
    asyncio.run(main())


@pytest.mark.slow  # over ~3 s here: left out of scripts/test.sh --fast
def test_overload_gets_429_and_disconnect_frees_kv(served):
    async def main():
        c = _client(served)
        await c.connect()
        # 2 attention ranks x 2 running + 4 queued fit; the rest must be refused with 429.
        streams = [c.generate(PROMPTS[1], {"max_tokens": 200, "ignore_eos": True}) for _ in range(12)]
        firsts = await asyncio.gather(*[s.__anext__() for s in streams], return_exceptions=True)
        ok = [f for f in firsts if not isinstance(f, BaseException)]
        refused = [f for f in firsts if isinstance(f, DataPlaneError)]
        assert len(ok) + len(refused) == 12
        assert len(ok) >= 8 and len(refused) >= 1
        assert all(e.status == 429 and e.retry_after for e in refused)
        await c.close()  # drop the connection with 8 requests in flight
        c2 = _client(served)
        for _ in range(100):  # everything the dropped connection held is cancelled and freed
            st = await c2.stats()
            if st["gateway"]["running"] == 0 and st["gateway"]["waiting"] == 0:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.6)
        st = await c2.stats()
        await c2.close()
        return st
    st = asyncio.run(main())
    assert st["gateway"] == {"waiting": 0, "running": 0, "kv_free_blocks": {"1": 64, "2": 64}}
    att = [v for v in st["ranks"].values() if v["role"] == "attention"]
    assert len(att) == 2 and all(v["kv_free_blocks"] == 64 and v["running"] == 0 for v in att)
    exp = [v for v in st["ranks"].values() if v["role"] == "expert"]
    assert len(exp) == 2 and sum(v["total_tokens"] for v in exp) > 0
