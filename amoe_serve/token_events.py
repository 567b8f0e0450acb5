"""The token event: what the attention rank says about a request after a step, carried unchanged
attention rank -> gateway (transport header) -> ingress (link frame).

On the wire it is a list, `[id, token, finish_reason, error]`, with two more entries only when the
request asked for logprobs (`[..., logprobs, prompt_logprobs]`, see `TokenLogprobs.to_wire`), so a
request without logprobs pays nothing for them.
"""
from __future__ import annotations

import reprlib
from dataclasses import dataclass, replace
from typing import Optional

from amoe_serve.sampler.logprobs import TokenLogprobs


FINISH_REASONS = ("stop", "length", "abort", "error")


# Not frozen, unlike the link messages: one is built per request per step on the attention
# rank's hot path, and a frozen dataclass's __init__ costs about twice as much.
@dataclass
class TokenEvent:
    request_id: str
    token: Optional[int]
    finish_reason: Optional[str]  # one of FINISH_REASONS on the last event, else None
    error: Optional[str] = None
    logprobs: Optional[TokenLogprobs] = None  # of `token`
    prompt_logprobs: Optional[list[Optional[TokenLogprobs]]] = None  # on a request's first event

    def to_wire(self) -> list:
        w = [self.request_id, self.token, self.finish_reason, self.error]
        if self.logprobs is not None or self.prompt_logprobs is not None:
            w.append(None if self.logprobs is None else self.logprobs.to_wire())
            w.append(None if self.prompt_logprobs is None else
                     [None if p is None else p.to_wire() for p in self.prompt_logprobs])
        return w

    @classmethod
    def from_wire(cls, w: list) -> "TokenEvent":
        """The event `w` is; ValueError, naming what is wrong, if it is no token event."""
        if not isinstance(w, list) or len(w) not in (4, 6):
            raise ValueError(f"a token event is a list of 4 or 6 entries, got {reprlib.repr(w)}")
        rid, tok, reason, err = w[0], w[1], w[2], w[3]
        if (not isinstance(rid, str) or not (tok is None or (isinstance(tok, int) and not isinstance(tok, bool)))
                or not (reason is None or reason in FINISH_REASONS) or not (err is None or isinstance(err, str))):
            raise ValueError("a token event is [id: str, token: int | null, finish_reason: "
                             f"{' | '.join(FINISH_REASONS)} | null, error: str | null, ...], got {reprlib.repr(w)}")
        if len(w) == 4:
            return cls(rid, tok, reason, err)
        try:
            lps = None if w[4] is None else TokenLogprobs.from_wire(w[4])
            plps = None if w[5] is None else [None if p is None else TokenLogprobs.from_wire(p) for p in w[5]]
        except (TypeError, ValueError) as e:  # wrong shapes: unpacking, int(), float(), iterating
            raise ValueError(f"malformed logprobs in the token event of {rid!r}: {e}") from None
        return cls(rid, tok, reason, err, lps, plps)

    def renamed(self, request_id: str) -> "TokenEvent":
        return replace(self, request_id=request_id)
