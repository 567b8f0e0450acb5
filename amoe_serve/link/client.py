"""The ingress end of the link: an asyncio client of one data plane's gateway.

One connection per (replica, model) carries every request of that replica, multiplexed by
request id. If the connection drops, in-flight requests fail with 503 and the next call
reconnects, so a restarted data plane is picked up without restarting the ingress.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import AsyncIterator, Optional

from amoe_serve.link import wire
from amoe_serve.link.api import DataPlaneError, GenEvent, ModelInfo
from amoe_serve.token_events import TokenEvent


class LinkClient:
    def __init__(self, host: str, port: int, token: str, *, connect_timeout: float = 5.0,
                 reply_timeout: float = 10.0):
        self.host, self.port, self.token = host, int(port), token
        self.connect_timeout = connect_timeout
        self.reply_timeout = reply_timeout
        self.info: Optional[ModelInfo] = None
        self._reader: Optional[asyncio.StreamReader] = None
        self._writer: Optional[asyncio.StreamWriter] = None
        self._task: Optional[asyncio.Task] = None
        self._streams: dict[str, asyncio.Queue] = {}
        self._replies: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()

    @property
    def connected(self) -> bool:
        return self._task is not None and not self._task.done()

    async def connect(self) -> ModelInfo:
        async with self._lock:
            if self.connected:
                return self.info  # type: ignore[return-value]
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), self.connect_timeout)
            except (OSError, asyncio.TimeoutError) as e:
                raise DataPlaneError(f"data plane at {self.host}:{self.port} is unreachable: {e or 'timed out'}") from None
            try:
                frames = wire.FrameReader()
                challenge = await asyncio.wait_for(self._read_one(r, frames), self.connect_timeout)
                if challenge.get("type") != "challenge":
                    raise DataPlaneError(f"unexpected greeting from the gateway: {challenge.get('type')!r}")
                w.write(wire.encode({"type": "auth", "mac": wire.mac(self.token, challenge["nonce"])}))
                await w.drain()
                ready = await asyncio.wait_for(self._read_one(r, frames), self.connect_timeout)
                if ready.get("type") != "ready":
                    raise DataPlaneError(f"the gateway refused the link: {ready.get('error', ready.get('type'))}")
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, wire.LinkProtocolError) as e:
                w.close()
                raise DataPlaneError(f"link handshake with {self.host}:{self.port} failed: {e or 'timed out'}") from None
            except DataPlaneError:
                w.close()
                raise
            i = ready["info"]
            self.info = ModelInfo(i["name"], i["max_model_len"], i["vocab_size"], list(i.get("eos_token_ids", [])),
                                  i.get("max_queued_requests", 0), bool(i.get("structured_output", False)))
            self._reader, self._writer = r, w
            self._task = asyncio.create_task(self._pump(r, frames))
            return self.info

    @staticmethod
    async def _read_one(r: asyncio.StreamReader, frames: wire.FrameReader) -> dict:
        while True:
            data = await r.read(1 << 16)
            if not data:
                raise DataPlaneError("the gateway closed the link")
            got = frames.feed(data)
            if got:
                return got[0]

    async def _pump(self, r: asyncio.StreamReader, frames: wire.FrameReader) -> None:
        why = "the data plane closed the link (it stopped or crashed; requests in flight are lost)"
        try:
            while True:
                data = await r.read(1 << 16)
                if not data:
                    break
                for msg in frames.feed(data):
                    self._dispatch(msg)
        except (OSError, wire.LinkProtocolError, ValueError, KeyError, TypeError) as e:
            why = f"link to the data plane failed: {e}"
        finally:
            err = DataPlaneError(why, 503)
            for q in self._streams.values():
                q.put_nowait(err)
            for f in self._replies.values():
                if not f.done():
                    f.set_exception(err)
            self._streams.clear()
            self._replies.clear()
            if self._writer is not None:
                self._writer.close()

    def _dispatch(self, msg: dict) -> None:
        kind = msg["type"]
        if kind == "tokens":
            for w in msg["events"]:
                ev = TokenEvent.from_wire(w)
                q = self._streams.get(ev.request_id)
                if q is not None:
                    q.put_nowait(GenEvent(ev.token, ev.finish_reason, ev.error, ev.logprobs, ev.prompt_logprobs))
        elif kind == "rejected":
            q = self._streams.get(msg.get("id"))
            if q is not None:
                q.put_nowait(DataPlaneError(msg.get("error", "rejected"), msg.get("status", 400), msg.get("retry_after")))
        elif kind in ("stats", "pong"):
            f = self._replies.pop(msg.get("seq"), None)
            if f is not None and not f.done():
                f.set_result(msg)

    async def _send(self, obj: dict) -> None:
        if not self.connected:
            await self.connect()
        assert self._writer is not None
        try:
            self._writer.write(wire.encode(obj))
            await self._writer.drain()
        except OSError as e:
            raise DataPlaneError(f"link to the data plane failed: {e}") from None

    async def generate(self, prompt_token_ids: list[int], params: dict) -> AsyncIterator[GenEvent]:
        rid = f"r{next(self._ids)}"
        q: asyncio.Queue = asyncio.Queue()
        if not self.connected:
            await self.connect()
        self._streams[rid] = q
        finished = False
        try:
            await self._send({"type": "generate", "id": rid, "prompt_token_ids": list(prompt_token_ids),
                              "params": params})
            while True:
                item = await q.get()
                if isinstance(item, DataPlaneError):
                    finished = True
                    raise item
                if item.finish_reason is not None:
                    finished = True
                    if item.finish_reason == "error":
                        raise DataPlaneError(f"the data plane failed the request: {item.error}", 503)
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished and self.connected:
                try:  # the consumer went away: free the request's KV in the data plane
                    await self._send({"type": "cancel", "id": rid})
                except DataPlaneError:
                    pass

    async def _ask(self, obj: dict) -> dict:
        seq = next(self._ids)
        f = asyncio.get_running_loop().create_future()
        if not self.connected:
            await self.connect()
        self._replies[seq] = f
        await self._send({**obj, "seq": seq})
        try:
            return await asyncio.wait_for(f, self.reply_timeout)
        except asyncio.TimeoutError:
            self._replies.pop(seq, None)
            raise DataPlaneError("the data plane did not answer in time", 503) from None

    async def stats(self) -> dict:
        return (await self._ask({"type": "stats"}))["data"]

    async def health_state(self) -> str:
        """"ok", "draining" (shutting down: finishing in-flight requests, refusing new ones) or "down"."""
        try:
            pong = await self._ask({"type": "ping"})
        except DataPlaneError:
            return "down"
        if pong.get("healthy"):
            return "ok"
        return "draining" if pong.get("draining") else "down"

    async def healthy(self) -> bool:
        return await self.health_state() == "ok"

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._writer is not None:
            self._writer.close()
        self._task = None
