"""Logprobs in the API's shapes, from the data plane's `TokenLogprobs` (raw model logprobs, see
`sampler.logprobs`): completions' {tokens, token_logprobs, top_logprobs, text_offset}, chat's
{content: [{token, logprob, bytes, top_logprobs}]} and vLLM's `prompt_logprobs`.

Token text: each token decoded on its own (special tokens kept); "token_id:<id>" with
`return_tokens_as_token_ids` or for a model without a tokenizer (vLLM's convention).
"""
from __future__ import annotations

from typing import Callable, Optional

from amoe_serve.sampler.logprobs import TokenLogprobs

TokenStr = Callable[[int], str]


def token_str_fn(tokenizer, as_ids: bool) -> TokenStr:
    if as_ids or tokenizer is None:
        return lambda t: f"token_id:{t}"
    cache: dict[int, str] = {}

    def f(t: int) -> str:
        s = cache.get(t)
        if s is None:
            s = cache[t] = tokenizer.token_str(t)
        return s

    return f


def _top_dict(lp: TokenLogprobs, token: int, tstr: TokenStr) -> dict[str, float]:
    top = {}
    for t, v in lp.top:
        top.setdefault(tstr(t), v)
    top.setdefault(tstr(token), lp.logprob)  # vLLM: the sampled token is always listed
    return top


class CompletionLogprobsBuilder:
    """Accumulates one choice's logprobs; `take()` returns the part not yet sent (streaming)."""

    def __init__(self, tstr: TokenStr, offset: int = 0):
        self.tstr = tstr
        self.offset = offset
        self._clear()

    def _clear(self) -> None:
        self.tokens: list[str] = []
        self.token_logprobs: list[Optional[float]] = []
        self.top_logprobs: list[Optional[dict[str, float]]] = []
        self.text_offset: list[int] = []

    def add(self, token: int, lp: Optional[TokenLogprobs], with_top: bool = True) -> None:
        s = self.tstr(token)
        self.tokens.append(s)
        self.token_logprobs.append(None if lp is None else lp.logprob)
        self.top_logprobs.append(None if lp is None or not with_top else _top_dict(lp, token, self.tstr))
        self.text_offset.append(self.offset)
        self.offset += len(s)

    def add_prompt(self, prompt: list[int], plps: Optional[list[Optional[TokenLogprobs]]]) -> None:
        for i, t in enumerate(prompt):
            self.add(t, plps[i] if plps is not None and i < len(plps) else None)

    def take(self) -> dict:
        out = {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
               "top_logprobs": self.top_logprobs, "text_offset": self.text_offset}
        self._clear()
        return out


def chat_content(tokens: list[int], lps: list[Optional[TokenLogprobs]], tstr: TokenStr) -> list[dict]:
    out = []
    for t, lp in zip(tokens, lps):
        s = tstr(t)
        entry = {"token": s, "logprob": lp.logprob if lp is not None else None,
                 "bytes": list(s.encode("utf-8")), "top_logprobs": []}
        if lp is not None:
            entry["top_logprobs"] = [{"token": tstr(i), "logprob": v, "bytes": list(tstr(i).encode("utf-8"))}
                                     for i, v in lp.top]
        out.append(entry)
    return out


def prompt_logprobs_out(prompt: list[int], plps: Optional[list[Optional[TokenLogprobs]]],
                        tstr: TokenStr) -> Optional[list]:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {id: {logprob, rank,
    decoded_token}} for the token itself and the top k."""
    if plps is None:
        return None
    out: list = []
    for t, lp in zip(prompt, plps):
        if lp is None:
            out.append(None)
            continue
        d = {str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": tstr(t)}}
        for r, (i, v) in enumerate(lp.top, start=1):
            d.setdefault(str(i), {"logprob": v, "rank": r, "decoded_token": tstr(i)})
        out.append(d)
    return out
