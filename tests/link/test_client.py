"""LinkClient against a scripted gateway: what it does with a version it does not speak and with
the reason a gateway gives before it closes the link."""

from __future__ import annotations

import asyncio

import pytest

from amoe_serve.link import wire
from amoe_serve.link.api import DataPlaneError, ModelInfo
from amoe_serve.link.client import LinkClient
from amoe_serve.link.messages import Challenge, ErrorNotice, Ready

TOKEN = "t0ken"


async def _gateway(script):
    """A one-connection gateway on 127.0.0.1 that runs `script(reader, writer, frames)`."""
    async def handle(r, w):
        try:
            await script(r, w, wire.FrameReader())
        finally:
            w.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _next(r, frames):
    while True:
        data = await r.read(1 << 16)
        assert data, "the client closed the link"
        got = frames.feed(data)
        if got:
            return got[0]


async def _handshake(r, w, frames, version=wire.VERSION):
    w.write(wire.encode(Challenge("n0nce", version).encode()))
    await w.drain()
    auth = await _next(r, frames)
    assert auth["mac"] == wire.mac(TOKEN, "n0nce")
    w.write(wire.encode(Ready(ModelInfo("m", 64, 100, [0])).encode()))
    await w.drain()


def test_a_gateway_of_another_link_version_is_refused_with_both_versions():
    async def script(r, w, frames):
        w.write(wire.encode(Challenge("n0nce", wire.VERSION + 1).encode()))
        await w.drain()
        await asyncio.sleep(1.0)

    async def main():
        server, port = await _gateway(script)
        async with server:
            with pytest.raises(DataPlaneError, match=f"version {wire.VERSION + 1} .* version {wire.VERSION}"):
                await LinkClient("127.0.0.1", port, TOKEN).connect()
    asyncio.run(asyncio.wait_for(main(), 20))


def test_the_gateways_reason_for_closing_reaches_the_streams():
    async def script(r, w, frames):
        await _handshake(r, w, frames)
        gen = await _next(r, frames)
        assert gen["type"] == "generate"
        w.write(wire.encode(ErrorNotice("peer does not read: over 64 bytes queued").encode()))
        await w.drain()

    async def main():
        server, port = await _gateway(script)
        async with server:
            client = LinkClient("127.0.0.1", port, TOKEN)
            await client.connect()
            with pytest.raises(DataPlaneError, match="peer does not read") as e:
                async for _ in client.generate([1, 2, 3], {"max_tokens": 4}):
                    pass
            assert e.value.status == 503
            assert client.notice == "peer does not read: over 64 bytes queued"
    asyncio.run(asyncio.wait_for(main(), 20))
