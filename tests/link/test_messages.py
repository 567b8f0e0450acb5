"""Link messages (amoe_serve/link/messages.py): every one survives encode -> frame -> decode
unchanged, keeps the wire shape the other side reads, and a malformed one raises MessageError
naming what is wrong."""

import json
import socket
import time

import pytest

from amoe_serve.link import wire
from amoe_serve.link.api import ModelInfo
from amoe_serve.link.messages import (FROM_CLIENT, FROM_GATEWAY, Auth, Cancel, Challenge, ErrorNotice, GatewayState,
                                      Generate, MessageError, Ping, Pong, Ready, Rejected, ServingState, StatsQuery,
                                      StatsReply, Tokens, UnknownMessage, decode)
from amoe_serve.link.server import LinkServer
from amoe_serve.sampler import TokenLogprobs
from amoe_serve.token_events import TokenEvent

INFO = ModelInfo("tiny", 4096, 300, [2, 7], 16, True)
LPS = TokenLogprobs(-0.25, 1, [(5, -0.25), (9, -1.5)])
STATS = StatsReply(3, {"1": {"role": "attention", "running": 0}, "2": {"role": "expert"}},
                   GatewayState(1, 2, {"1": 60, "2": 64}), ServingState(64, 3, False))

# Each message with the JSON object it must encode to (what peers of older versions read).
CASES = [
    (Challenge("ab12", 1), {"type": "challenge", "nonce": "ab12", "version": 1}),
    (Auth("f00d"), {"type": "auth", "mac": "f00d"}),
    (Ready(INFO), {"type": "ready", "info": {"name": "tiny", "max_model_len": 4096, "vocab_size": 300,
                                             "eos_token_ids": [2, 7], "max_queued_requests": 16,
                                             "structured_output": True}}),
    (Generate("r1", [5, 17, 42], {"max_tokens": 8, "temperature": 0.5}),
     {"type": "generate", "id": "r1", "prompt_token_ids": [5, 17, 42], "params": {"max_tokens": 8, "temperature": 0.5}}),
    (Cancel("r1"), {"type": "cancel", "id": "r1"}),
    (StatsQuery(4), {"type": "stats", "seq": 4}),
    (Ping(5), {"type": "ping", "seq": 5}),
    (Tokens((TokenEvent("r1", 11, None), TokenEvent("r2", None, "error", "boom"),
             TokenEvent("r3", 12, "stop", None, LPS, [None, LPS]))),
     {"type": "tokens", "events": [["r1", 11, None, None], ["r2", None, "error", "boom"],
                                   ["r3", 12, "stop", None, LPS.to_wire(), [None, LPS.to_wire()]]]}),
    (Rejected("r1", 429, "full", 1.0), {"type": "rejected", "id": "r1", "status": 429, "error": "full", "retry_after": 1.0}),
    (Rejected(None, 400, "bad id"), {"type": "rejected", "id": None, "status": 400, "error": "bad id"}),
    (STATS, {"type": "stats", "seq": 3, "data": {
        "ranks": {"1": {"role": "attention", "running": 0}, "2": {"role": "expert"}},
        "gateway": {"waiting": 1, "running": 2, "kv_free_blocks": {"1": 60, "2": 64}},
        "serving": {"kv_blocks_per_rank": 64, "connections": 3, "draining": False}}}),
    (Pong(6, True, False), {"type": "pong", "seq": 6, "healthy": True, "draining": False}),
    (ErrorNotice("nope"), {"type": "error", "error": "nope"}),
]


def _kinds(msg):
    if type(msg) in FROM_CLIENT.values():
        return FROM_CLIENT
    if type(msg) in FROM_GATEWAY.values():
        return FROM_GATEWAY
    return {msg.TYPE: type(msg)}


@pytest.mark.parametrize("msg, obj", CASES, ids=lambda x: type(x).__name__ if not isinstance(x, dict) else "")
def test_round_trip_through_a_frame_with_the_wire_shape(msg, obj):
    assert msg.encode() == obj
    data = wire.encode(msg.encode())
    assert data[4:] == json.dumps(obj, separators=(",", ":")).encode()  # key order too
    (back,) = wire.FrameReader().feed(data)
    assert decode(back, _kinds(msg)) == msg


def test_optional_fields_and_unknown_keys():
    # An older gateway's ready without the optional fields: no grammar masks.
    r = decode({"type": "ready", "info": {"name": "m", "max_model_len": 8, "vocab_size": 9}}, {"ready": Ready})
    assert r.info == ModelInfo("m", 8, 9, [], 0, False)
    g = Generate.decode({"type": "generate", "id": "a", "prompt_token_ids": [1], "future_key": 1})
    assert g == Generate("a", [1], {})
    assert Generate.decode({"type": "generate", "id": "a", "prompt_token_ids": [1], "params": None}).params == {}
    assert Rejected.decode({"type": "rejected", "id": "a", "status": 503, "error": "x"}).retry_after is None
    assert STATS.as_dict() == STATS.encode()["data"]


def test_directions_are_separate():
    with pytest.raises(UnknownMessage, match="unknown message type 'tokens'"):
        decode(Tokens(()).encode(), FROM_CLIENT)
    with pytest.raises(UnknownMessage, match="'generate'"):
        decode(Generate("a", [1], {}).encode(), FROM_GATEWAY)
    for obj in ({"type": "auth", "mac": "x"}, {"type": 5}, {}, {"type": "pong", "seq": 1}):
        with pytest.raises(UnknownMessage):
            decode(obj, FROM_CLIENT)
    # "stats" means a query one way and a reply the other.
    assert isinstance(decode({"type": "stats", "seq": 1}, FROM_CLIENT), StatsQuery)
    with pytest.raises(MessageError, match="'data'"):
        decode({"type": "stats", "seq": 1}, FROM_GATEWAY)


def _gen(**kw):
    return {"type": "generate", "id": "r1", "prompt_token_ids": [1, 2], "params": {}, **kw}


@pytest.mark.parametrize("obj, kinds, match", [
    (_gen(id=""), FROM_CLIENT, "'id' must be a non-empty string"),
    (_gen(id="x" * 257), FROM_CLIENT, "at most 256"),
    (_gen(id=7), FROM_CLIENT, "'id'"),
    (_gen(prompt_token_ids=[]), FROM_CLIENT, "non-empty list of token ids"),
    (_gen(prompt_token_ids=[1, True]), FROM_CLIENT, "token ids"),
    (_gen(prompt_token_ids=[1, 2.0]), FROM_CLIENT, "token ids"),
    (_gen(prompt_token_ids="12"), FROM_CLIENT, "token ids"),
    (_gen(params=[1]), FROM_CLIENT, "'params' must be an object"),
    ({"type": "cancel"}, FROM_CLIENT, "'id' must be a string"),
    ({"type": "cancel", "id": ["a"]}, FROM_CLIENT, "'id'"),
    ({"type": "ping", "seq": "1"}, FROM_CLIENT, "'seq' must be an integer"),
    ({"type": "ping", "seq": True}, FROM_CLIENT, "'seq'"),
    ({"type": "stats"}, FROM_CLIENT, "'seq'"),
    ({"type": "tokens"}, FROM_GATEWAY, "'events' must be a list"),
    ({"type": "tokens", "events": [["r1", 1, None]]}, FROM_GATEWAY, "4 or 6 entries"),
    ({"type": "tokens", "events": [[1, 1, None, None]]}, FROM_GATEWAY, "id: str"),
    ({"type": "tokens", "events": [["r1", True, None, None]]}, FROM_GATEWAY, "token"),
    ({"type": "tokens", "events": [["r1", 1, "done", None]]}, FROM_GATEWAY, "finish_reason"),
    ({"type": "tokens", "events": [["r1", 1, "error", 3]]}, FROM_GATEWAY, "error"),
    ({"type": "tokens", "events": [["r1", 1, None, None, [1, 2], None]]}, FROM_GATEWAY, "logprobs"),
    ({"type": "tokens", "events": [["r1", 1, None, None, None, 5]]}, FROM_GATEWAY, "logprobs"),
    ({"type": "rejected", "id": 1, "status": 400, "error": "x"}, FROM_GATEWAY, "'id'"),
    ({"type": "rejected", "id": "a", "status": 200, "error": "x"}, FROM_GATEWAY, "'status'"),
    ({"type": "rejected", "id": "a", "status": 429}, FROM_GATEWAY, "'error'"),
    ({"type": "rejected", "id": "a", "status": 429, "error": "x", "retry_after": "soon"}, FROM_GATEWAY, "retry_after"),
    ({"type": "stats", "seq": 1, "data": {"ranks": {}, "serving": {}}}, FROM_GATEWAY, "'gateway'"),
    ({"type": "stats", "seq": 1, "data": {"ranks": {"1": 5}, "gateway": {}, "serving": {}}}, FROM_GATEWAY, "'ranks'"),
    ({"type": "stats", "seq": 1, "data": {"ranks": {}, "gateway": {"waiting": 0, "running": 0,
                                                                    "kv_free_blocks": {"1": "x"}},
                                          "serving": {}}}, FROM_GATEWAY, "kv_free_blocks"),
    ({"type": "stats", "seq": 1, "data": {"ranks": {}, "gateway": {"waiting": 0, "running": 0, "kv_free_blocks": {}},
                                          "serving": {"kv_blocks_per_rank": 1, "connections": 1, "draining": 0}}},
     FROM_GATEWAY, "'draining' must be a boolean"),
    ({"type": "pong", "seq": 1, "healthy": "yes", "draining": False}, FROM_GATEWAY, "'healthy'"),
    ({"type": "error"}, FROM_GATEWAY, "'error' must be a string"),
    ({"type": "challenge", "nonce": 5, "version": 1}, {"challenge": Challenge}, "'nonce'"),
    ({"type": "auth", "mac": None}, {"auth": Auth}, "'mac'"),
    ({"type": "ready", "info": {"name": "m", "vocab_size": 9}}, {"ready": Ready}, "'max_model_len'"),
    ({"type": "ready", "info": []}, {"ready": Ready}, "'info'"),
    ({"type": "ready", "info": {"name": "m", "max_model_len": 8, "vocab_size": 9, "eos_token_ids": ["2"]}},
     {"ready": Ready}, "eos_token_ids"),
])
def test_malformed_messages_raise_a_clear_error(obj, kinds, match):
    with pytest.raises(MessageError, match=match) as ei:
        decode(obj, kinds)
    assert str(ei.value).startswith(f"malformed {obj['type']!r} message: ")


def test_a_bad_generate_keeps_its_id_for_the_rejection():
    with pytest.raises(MessageError) as ei:
        Generate.decode(_gen(prompt_token_ids=[]))
    assert ei.value.kind == "generate" and ei.value.request_id == "r1"
    with pytest.raises(MessageError) as ei:
        Generate.decode(_gen(id=["r1"]))
    assert ei.value.request_id is None
    with pytest.raises(MessageError, match="expected a 'cancel'"):
        Cancel.decode({"type": "ping", "seq": 1})


# ----------------------------------------------------------------------------- the server


def _read(s, reader, srv):
    """The next frame the server sends on `s`, polling the server (one thread) meanwhile."""
    s.settimeout(0.01)
    frames, deadline = [], time.monotonic() + 5
    while not frames:
        assert time.monotonic() < deadline, "no frame from the server"
        srv.poll(0.01)
        try:
            data = s.recv(1 << 16)
        except TimeoutError:
            continue
        assert data, "the server closed the connection"
        frames = reader.feed(data)
    assert len(frames) == 1
    return frames[0]


def _poll(srv, n=1, timeout=5.0):
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += srv.poll(0.01)
    return got


def test_server_hands_the_gateway_decoded_messages_and_bad_ones_apart():
    srv = LinkServer("127.0.0.1", 0, "tok", INFO)
    try:
        with socket.create_connection(srv.address, timeout=5) as s:
            r = wire.FrameReader()
            ch = Challenge.decode(_read(s, r, srv))
            assert srv.connection_count == 1
            s.sendall(wire.encode(Auth(wire.mac("tok", ch.nonce)).encode()))
            assert decode(_read(s, r, srv), {"ready": Ready}) == Ready(INFO)
            s.sendall(wire.encode(Ping(9).encode()) + wire.encode(_gen(prompt_token_ids=[]))
                      + wire.encode({"type": "nope"}))
            ping, bad, unknown = _poll(srv, 3)
            assert ping.msg == Ping(9) and ping.bad is None and not ping.closed
            assert bad.msg is None and bad.bad.request_id == "r1" and "non-empty" in bad.bad.detail
            assert isinstance(unknown.bad, UnknownMessage)
            assert srv.send(ping.cid, Pong(9, True, False))
            srv.flush(1.0)
            assert Pong.decode(_read(s, r, srv)) == Pong(9, True, False)
        (gone,) = _poll(srv, 1)
        assert gone.closed and srv.connection_count == 0
        assert not srv.send(gone.cid, ErrorNotice("late"))
    finally:
        srv.close()


# ----------------------------------------------------------------------------- the client


def test_client_skips_unknown_kinds_and_fails_on_a_malformed_message():
    """A kind the client does not know (a newer gateway's) is skipped; a malformed known one
    fails the stream with 503, naming what was wrong."""
    import asyncio
    import threading

    from amoe_serve.link.api import DataPlaneError
    from amoe_serve.link.client import LinkClient

    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.settimeout(10)

    def gateway():
        conn, _ = lsock.accept()
        with conn:
            conn.settimeout(10)
            r = wire.FrameReader()
            conn.sendall(wire.encode(Challenge("n0", wire.VERSION).encode()))
            Auth.decode(_recv(conn, r))
            conn.sendall(wire.encode(Ready(INFO).encode()))
            g = Generate.decode(_recv(conn, r))
            conn.sendall(wire.encode({"type": "from_the_future", "x": 1})
                         + wire.encode(Tokens((TokenEvent(g.id, 7, None),)).encode())
                         + wire.encode({"type": "tokens", "events": [[g.id, "8", None, None]]}))
            conn.recv(1 << 16)  # until the client goes

    th = threading.Thread(target=gateway, daemon=True)
    th.start()

    async def main():
        c = LinkClient("127.0.0.1", lsock.getsockname()[1], "tok")
        assert await c.connect() == INFO
        toks = []
        with pytest.raises(DataPlaneError, match="malformed 'tokens' message") as ei:
            async for ev in c.generate([1, 2], {}):
                toks.append(ev.token)
        await c.close()
        return toks, ei.value

    try:
        toks, err = asyncio.run(asyncio.wait_for(main(), 20))
    finally:
        lsock.close()
    assert toks == [7] and err.status == 503
    th.join(5)


def _recv(conn, reader):
    frames = []
    while not frames:
        data = conn.recv(1 << 16)
        assert data
        frames = reader.feed(data)
    return frames[0]
