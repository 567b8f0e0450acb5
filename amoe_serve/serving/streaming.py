"""Answers that outlive the request handler: SSE streams, and waits that end when the client
goes away (the generation's link stream is then closed, which cancels it in the data plane)."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from fastapi import Request
from starlette.responses import Response


async def _forever() -> None:
    await asyncio.Event().wait()


async def wait_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return
        await asyncio.sleep(0.01)  # an odd server answering other messages must not spin us


class ClientGone(Exception):
    """The client went away before its answer was ready (answered 499, which nobody reads)."""


class SSEResponse(Response):
    """Streams `chunks` as server-sent events while watching for the client going away; on any
    exit (done, error, disconnect, cancellation) `cleanup` runs, which closes the link stream."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes], cleanup, watch_disconnect: bool = True):
        # No Response.__init__: it would render an empty body and declare Content-Length: 0.
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.chunks = chunks
        self.cleanup = cleanup
        self.watch_disconnect = watch_disconnect

    async def __call__(self, scope, receive, send) -> None:
        async def pump():
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        pump_task = asyncio.ensure_future(pump())
        watch_task = asyncio.ensure_future(wait_disconnect(receive) if self.watch_disconnect else _forever())
        try:
            done, _ = await asyncio.wait({pump_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
            if pump_task in done:
                exc = pump_task.exception()
                if exc is not None and not isinstance(exc, OSError):  # OSError: the client went away
                    raise exc
        finally:
            for t in (pump_task, watch_task):
                if not t.done():
                    t.cancel()
            await asyncio.gather(pump_task, watch_task, return_exceptions=True)
            try:
                await self.chunks.aclose()  # type: ignore[attr-defined]
            except Exception:
                pass
            await self.cleanup()


async def race_disconnect(request: Request, coro, watch: bool = True):
    """Run coro unless the client goes away first (then coro is cancelled; raises ClientGone
    -> the answer is never read, the generation stream gets closed by the caller)."""
    if not watch:
        return await coro
    task = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(wait_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientGone()
    finally:
        for t in (task, watch):
            if not t.done():
                t.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)
