"""One admitted data-plane request as the ingress sees it: iterates the link, decodes text,
applies stop strings, keeps each token's logprobs beside it, records metrics."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

from amoe_serve.link.wire import LinkProtocolError
from amoe_serve.sampler import SamplingParams, TokenLogprobs
from amoe_serve.serving.errors import APIError, from_dataplane
from amoe_serve.link.api import DataPlaneError
from amoe_serve.serving.output_text import OutputText

log = logging.getLogger(__name__)

class _LinkStream:
    """The link's generate iterator, closed exactly once (closing cancels the data-plane request)."""

    def __init__(self, it: AsyncIterator):
        self.it = it
        self.closed = False

    async def next(self):
        return await self.it.__anext__()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        aclose = getattr(self.it, "aclose", None)
        if aclose is None:
            return

        async def _do():
            try:
                await aclose()
            except Exception:
                log.exception("closing a data-plane stream failed")

        # Shielded: a cancellation of the caller (client gone) must not cut the cancel short.
        task = asyncio.ensure_future(_do())
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            pass


@dataclass
class Piece:
    text: str
    token_ids: list[int]
    finish_reason: Optional[str] = None
    logprobs: list[Optional[TokenLogprobs]] = field(default_factory=list)  # per token id, when asked


class Generation:
    """One admitted request: iterates the link, decodes text, applies stop strings, records metrics."""

    def __init__(self, app_state, entry, endpoint: str, prompt_ids: list[int], params: SamplingParams,
                 stops: list[str], include_stop: bool = False, skip_special_tokens: bool = True):
        self.s = app_state
        self.entry = entry
        self.endpoint = endpoint
        self.prompt_ids = prompt_ids
        self.params = params
        self.out = OutputText(entry.tokenizer, stops, include_stop, skip_special_tokens)
        self.prompt_logprobs: Optional[list[Optional[TokenLogprobs]]] = None
        self._pending_lps: list[Optional[TokenLogprobs]] = []
        self.t0 = time.monotonic()
        self.deadline = self.t0 + app_state.settings.request_timeout_s if app_state.settings.request_timeout_s > 0 else None
        self.t_last: Optional[float] = None
        self.stream: Optional[_LinkStream] = None
        self.finish_reason: Optional[str] = None
        self._released = False
        self._first: Optional[Any] = None
        m = app_state.metrics
        m.in_flight.labels(entry.name).inc()
        m.prompt_tokens.labels(entry.name).inc(len(prompt_ids))

    @property
    def completion_tokens(self) -> int:
        return len(self.out.token_ids)

    def usage(self) -> dict:
        n, c = len(self.prompt_ids), self.completion_tokens
        return {"prompt_tokens": n, "completion_tokens": c, "total_tokens": n + c}

    async def _next_event(self):
        if self.deadline is None:
            return await self.stream.next()
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        async with asyncio.timeout(remaining):
            return await self.stream.next()

    async def start(self) -> None:
        """Submit and wait for the first event, so that refusals (429/503/400) happen before any
        response byte is sent. Raises APIError."""
        try:
            it = self.entry.link.generate(self.prompt_ids, self.params.to_dict())
            if not hasattr(it, "__anext__") and inspect.isawaitable(it):  # an `async def` returning one
                it = await it
            self.stream = _LinkStream(it)
            self._first = await self._next_event()
        except StopAsyncIteration:
            self._first = None
        except DataPlaneError as exc:
            raise from_dataplane(exc, self.s.settings) from None
        except LinkProtocolError as exc:  # e.g. the request does not fit in one link frame
            raise APIError(400, f"the request is too large for the data-plane link: {exc}",
                           code="request_too_large") from None
        except TimeoutError:
            raise APIError(504, f"request timed out after {self.s.settings.request_timeout_s:g} s",
                           code="timeout") from None

    async def pieces(self) -> AsyncIterator[Piece]:
        """Text/id deltas; the last piece has finish_reason. Raises APIError on failures."""
        m = self.s.metrics
        name = self.entry.name
        ev = self._first
        first = True
        try:
            while True:
                if not first:
                    try:
                        ev = await self._next_event()
                    except StopAsyncIteration:
                        ev = None
                first = False
                if ev is None:  # iterator ended without a finish event
                    self.finish_reason = "stop" if self.out.token_ids else "abort"
                    yield self._piece(self.out.finish(), self.out.take_ids(), self.finish_reason)
                    return
                if ev.token is not None:
                    t = time.monotonic()
                    if self.t_last is None:
                        m.ttft.labels(name).observe(t - self.t0)
                    else:
                        m.itl.labels(name).observe(t - self.t_last)
                    self.t_last = t
                    m.generated_tokens.labels(name).inc()
                    if ev.prompt_logprobs is not None:
                        self.prompt_logprobs = ev.prompt_logprobs
                    if self.params.logprobs is not None:
                        self._pending_lps.append(ev.logprobs)
                    text = self.out.add(int(ev.token))
                    if self.out.stopped:
                        await self.stream.close()  # cancel the rest in the data plane
                        self.finish_reason = "stop"
                        yield self._piece(text, self.out.take_ids(), "stop")
                        return
                    if ev.finish_reason is None:
                        # Without a tokenizer there is no text to wait for: stream the ids.
                        if text or self.entry.tokenizer is None:
                            yield self._piece(text, self.out.take_ids())
                        continue
                else:
                    text = ""
                if ev.finish_reason == "error":
                    raise APIError(503, f"data plane error: {ev.error or 'unknown'}", code="data_plane_error")
                if ev.finish_reason is not None:
                    text += self.out.finish()
                    reason = "stop" if self.out.stopped else ev.finish_reason
                    self.finish_reason = reason
                    yield self._piece(text, self.out.take_ids(), reason)
                    return
        except DataPlaneError as exc:
            raise from_dataplane(exc, self.s.settings) from None
        except TimeoutError:
            raise APIError(504, f"request timed out after {self.s.settings.request_timeout_s:g} s",
                           code="timeout") from None

    def _piece(self, text: str, ids: list[int], reason: Optional[str] = None) -> Piece:
        lps, self._pending_lps = self._pending_lps, []
        return Piece(text, ids, reason, lps)

    async def release(self) -> None:
        """Close the link stream (cancels an unfinished request) and free the admission slot."""
        if self._released:
            return
        self._released = True
        try:
            if self.stream is not None:
                await self.stream.close()
        finally:
            m = self.s.metrics
            m.in_flight.labels(self.entry.name).dec()
            m.latency.labels(self.endpoint, self.entry.name).observe(time.monotonic() - self.t0)
            m.finished.labels(self.entry.name, self.finish_reason or "cancelled").inc()
            self.s.active -= 1
