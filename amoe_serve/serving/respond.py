"""Answers for /v1/completions and /v1/chat/completions from one or more generations (one per
prompt and sample: `index = prompt * n + sample`, as vLLM numbers them), whole or as SSE.

- Usage counts each prompt once and every choice's tokens.
- Streams interleave the choices' chunks as they come; each choice ends with its own
  finish_reason chunk; the usage chunk (`stream_options.include_usage`) comes last.
- Echo (completions): the choice's text starts with the prompt text, and with `logprobs` its
  logprobs start with the prompt tokens' (the first one's is null).
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

from amoe_serve.sampler import TokenLogprobs
from amoe_serve.serving.errors import APIError
from amoe_serve.serving.generation import Generation, Piece
from amoe_serve.serving.logprobs_out import (CompletionLogprobsBuilder, TokenStr, chat_content,
                                             prompt_logprobs_out)

log = logging.getLogger(__name__)


@dataclass
class Choice:
    index: int
    gen: Generation
    first_of_prompt: bool  # counts the prompt's tokens in usage
    echo_text: Optional[str] = None  # completions with echo: the prompt's text
    logprobs: Optional[int] = None  # completions: top logprobs per token; chat: top_logprobs
    want_prompt_logprobs: bool = False  # vLLM's prompt_logprobs field in the answer


@dataclass
class Shape:
    kind: str  # "completion" | "chat"
    rid: str
    created: int
    model: str
    tstr: TokenStr

    @property
    def object(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat" else "text_completion"


def usage(choices: list[Choice]) -> dict:
    p = sum(len(c.gen.prompt_ids) for c in choices if c.first_of_prompt)
    n = sum(c.gen.completion_tokens for c in choices)
    return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}


def _trim(lp: Optional[TokenLogprobs], k: Optional[int]) -> Optional[TokenLogprobs]:
    if lp is None or k is None or len(lp.top) <= k:
        return lp
    return TokenLogprobs(lp.logprob, lp.rank, lp.top[:k])


class _ChoiceLogprobs:
    """Completion logprobs of one choice, built as its pieces arrive."""

    def __init__(self, c: Choice, tstr: TokenStr):
        self.c = c
        self.b = CompletionLogprobsBuilder(tstr) if c.logprobs is not None else None
        self.echoed = False

    def echo_prompt(self) -> None:
        if self.b is not None and self.c.echo_text is not None and not self.echoed:
            plps = self.c.gen.prompt_logprobs
            self.b.add_prompt(self.c.gen.prompt_ids, None if plps is None else [_trim(p, self.c.logprobs) for p in plps])
        self.echoed = True

    def add(self, p: Piece) -> Optional[dict]:
        if self.b is None:
            return None
        self.echo_prompt()
        for i, t in enumerate(p.token_ids):
            self.b.add(t, p.logprobs[i] if i < len(p.logprobs) else None)
        return self.b.take()


def _prompt_lps(c: Choice, tstr: TokenStr) -> Optional[list]:
    if not c.want_prompt_logprobs:
        return None
    return prompt_logprobs_out(c.gen.prompt_ids, c.gen.prompt_logprobs, tstr)


async def _collect(c: Choice) -> tuple[str, list[int], list, str]:
    text, ids, lps, reason = [], [], [], None
    async for p in c.gen.pieces():
        text.append(p.text)
        ids.extend(p.token_ids)
        lps.extend(p.logprobs or [None] * len(p.token_ids))
        reason = p.finish_reason or reason
    return "".join(text), ids, lps, reason or "stop"


async def final_body(shape: Shape, choices: list[Choice]) -> dict:
    got = await asyncio.gather(*(_collect(c) for c in choices))
    out = []
    for c, (text, ids, lps, reason) in zip(choices, got):
        if shape.kind == "chat":
            lp = None
            if c.logprobs is not None:
                lp = {"content": chat_content(ids, lps, shape.tstr)}
            out.append({"index": c.index, "message": {"role": "assistant", "content": text},
                        "finish_reason": reason, "logprobs": lp, "token_ids": ids})
        else:
            cl = _ChoiceLogprobs(c, shape.tstr)
            lp = cl.add(Piece(text, ids, reason, lps))
            if c.echo_text is not None:
                text = c.echo_text + text
            ch = {"index": c.index, "text": text, "finish_reason": reason, "logprobs": lp, "token_ids": ids}
            if c.want_prompt_logprobs:
                ch["prompt_logprobs"] = _prompt_lps(c, shape.tstr)
            out.append(ch)
    body = {"id": shape.rid, "object": shape.object, "created": shape.created, "model": shape.model,
            "choices": out, "usage": usage(choices)}
    if shape.kind == "chat" and choices and choices[0].want_prompt_logprobs:
        body["prompt_logprobs"] = _prompt_lps(choices[0], shape.tstr)
    return body


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


async def sse_chunks(shape: Shape, choices: list[Choice], include_usage: bool) -> AsyncIterator[bytes]:
    def chunk(c: Choice, text: Optional[str], ids: list[int], reason: Optional[str], lp=None,
              role: bool = False) -> bytes:
        if shape.kind == "chat":
            delta: dict = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": c.index, "delta": delta, "finish_reason": reason, "logprobs": lp, "token_ids": ids}
        else:
            choice = {"index": c.index, "text": text or "", "finish_reason": reason, "logprobs": lp, "token_ids": ids}
        obj = {"id": shape.rid, "object": shape.chunk_object, "created": shape.created, "model": shape.model,
               "choices": [choice]}
        if include_usage:
            obj["usage"] = None
        return _sse(obj)

    def logprobs_of(c: Choice, state: _ChoiceLogprobs, p: Piece):
        if c.logprobs is None:
            return None
        if shape.kind == "chat":
            return {"content": chat_content(p.token_ids, p.logprobs, shape.tstr)}
        return state.add(p)

    queue: asyncio.Queue = asyncio.Queue()

    async def pump(c: Choice) -> None:
        try:
            async for p in c.gen.pieces():
                await queue.put((c, p))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((c, exc))
            return
        await queue.put((c, None))

    tasks = [asyncio.ensure_future(pump(c)) for c in choices]
    states = {c.index: _ChoiceLogprobs(c, shape.tstr) for c in choices}
    first = {c.index: True for c in choices}
    try:
        if shape.kind == "chat":
            for c in choices:
                yield chunk(c, "", [], None, role=True)
        left = len(choices)
        while left:
            c, p = await queue.get()
            if p is None:
                left -= 1
                continue
            if isinstance(p, BaseException):
                raise p
            text = p.text
            if shape.kind == "completion" and first[c.index] and c.echo_text is not None:
                text = c.echo_text + text
            first[c.index] = False
            lp = logprobs_of(c, states[c.index], p)
            if p.finish_reason is None:
                yield chunk(c, text, p.token_ids, None, lp)
                continue
            ids = p.token_ids
            if text:
                yield chunk(c, text, ids, None, lp)
                ids, lp = [], None
            yield chunk(c, None if shape.kind == "chat" else "", ids, p.finish_reason, lp)
        if include_usage:
            yield _sse({"id": shape.rid, "object": shape.chunk_object, "created": shape.created,
                        "model": shape.model, "choices": [], "usage": usage(choices)})
    except APIError as exc:
        log.info("stream %s failed after it started: %s", shape.rid, exc.message)
        yield _sse(exc.body())
    except Exception:
        log.exception("stream %s failed", shape.rid)
        yield _sse(APIError(500, "internal server error").body())
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    yield DONE
