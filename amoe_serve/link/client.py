"""The ingress end of the link: an asyncio client of one data plane's gateway.

One connection per (replica, model) carries every request of that replica, multiplexed by
request id. If the connection drops, in-flight requests fail with 503 and the next call
reconnects, so a restarted data plane is picked up without restarting the ingress.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import AsyncIterator, Callable, Optional

from amoe_serve.link import wire
from amoe_serve.link.api import DataPlaneError, GenEvent, ModelInfo
from amoe_serve.link.messages import (FROM_GATEWAY, Auth, Cancel, Challenge, ErrorNotice, GatewayMessage, Generate,
                                      MessageError, Ping, Pong, Ready, Rejected, StatsQuery, StatsReply, Tokens,
                                      UnknownMessage, decode)


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
        self.notice: Optional[str] = None  # the gateway's last ErrorNotice (why it is closing, or a bad frame)

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
                first = await asyncio.wait_for(self._read_one(r, frames), self.connect_timeout)
                if first.get("type") != Challenge.TYPE:
                    raise DataPlaneError(f"unexpected greeting from the gateway: {first.get('type')!r}")
                challenge = Challenge.decode(first)
                if challenge.version != wire.VERSION:
                    raise DataPlaneError(f"the gateway speaks link version {challenge.version} and this ingress "
                                         f"version {wire.VERSION}: run the same amoe-serve release on both")
                w.write(wire.encode(Auth(wire.mac(self.token, challenge.nonce)).encode()))
                await w.drain()
                ready = decode(await asyncio.wait_for(self._read_one(r, frames), self.connect_timeout),
                               {Ready.TYPE: Ready, ErrorNotice.TYPE: ErrorNotice})
                if isinstance(ready, ErrorNotice):
                    raise DataPlaneError(f"the gateway refused the link: {ready.error}")
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, wire.LinkProtocolError,
                    MessageError) as e:
                w.close()
                raise DataPlaneError(f"link handshake with {self.host}:{self.port} failed: {e or 'timed out'}") from None
            except DataPlaneError:
                w.close()
                raise
            self.info = ready.info
            self.notice = None  # a notice belongs to the connection that got it
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
                for obj in frames.feed(data):
                    try:
                        msg = decode(obj, FROM_GATEWAY)
                    except UnknownMessage:  # a newer gateway's kind of message: not for this client
                        continue
                    self._dispatch(msg)  # a malformed known one fails the link (below)
        except (OSError, wire.LinkProtocolError, ValueError, KeyError, TypeError) as e:
            why = f"link to the data plane failed: {e}"
        finally:
            if self.notice is not None:  # the gateway said why before it closed
                why = f"{why}: {self.notice}"
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

    def _dispatch(self, msg: GatewayMessage) -> None:
        if isinstance(msg, Tokens):
            for ev in msg.events:
                q = self._streams.get(ev.request_id)
                if q is not None:
                    q.put_nowait(GenEvent(ev.token, ev.finish_reason, ev.error, ev.logprobs, ev.prompt_logprobs))
        elif isinstance(msg, Rejected):
            q = self._streams.get(msg.id) if msg.id is not None else None
            if q is not None:
                q.put_nowait(DataPlaneError(msg.error, msg.status, msg.retry_after))
        elif isinstance(msg, (StatsReply, Pong)):
            f = self._replies.pop(msg.seq, None)
            if f is not None and not f.done():
                f.set_result(msg)
        elif isinstance(msg, ErrorNotice):
            # Why the gateway is closing the link (the close then fails every stream with it), or
            # a frame of ours it could not use (the reply waiting on that one times out).
            self.notice = msg.error

    async def _send(self, msg) -> None:
        if not self.connected:
            await self.connect()
        assert self._writer is not None
        try:
            self._writer.write(wire.encode(msg.encode()))
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
            await self._send(Generate(rid, list(prompt_token_ids), params))
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
                    await self._send(Cancel(rid))
                except DataPlaneError:
                    pass

    async def _ask(self, query: Callable[[int], StatsQuery | Ping]):
        """Send query(seq) and wait for the reply with that seq."""
        seq = next(self._ids)
        f = asyncio.get_running_loop().create_future()
        if not self.connected:
            await self.connect()
        self._replies[seq] = f
        await self._send(query(seq))
        try:
            return await asyncio.wait_for(f, self.reply_timeout)
        except asyncio.TimeoutError:
            self._replies.pop(seq, None)
            raise DataPlaneError("the data plane did not answer in time", 503) from None

    async def stats(self) -> dict:
        reply: StatsReply = await self._ask(StatsQuery)
        return reply.as_dict()

    async def health_state(self) -> str:
        """"ok", "draining" (shutting down: finishing in-flight requests, refusing new ones) or "down"."""
        try:
            pong: Pong = await self._ask(Ping)
        except DataPlaneError:
            return "down"
        if pong.healthy:
            return "ok"
        return "draining" if pong.draining else "down"

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
