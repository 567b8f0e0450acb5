"""Reading request JSONL and writing result JSONL for `amoe-serve generate`.

A malformed line fails that line alone (its error names the line number); the rest are served.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from amoe_serve.sampler import SamplingParams

SAMPLING_KEYS = ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
                 "frequency_penalty", "repetition_penalty", "logit_bias", "seed", "stop_token_ids", "ignore_eos",
                 "logprobs", "prompt_logprobs")
REQUEST_KEYS = ("id", "prompt", "prompt_token_ids", *SAMPLING_KEYS)


@dataclass
class GenerateRequest:
    id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: Optional[str] = None


@dataclass
class GenerateResult:
    id: str
    output_token_ids: list[int] = field(default_factory=list)
    text: Optional[str] = None
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    # With `logprobs` / `prompt_logprobs` in the request: per output token and per prompt token
    # (None for the first) its logprob and top [[id, logprob], ...].
    logprobs: Optional[list] = None
    prompt_logprobs: Optional[list] = None

    def record(self, ev) -> None:
        """Take one token event (token_events.TokenEvent) into the result."""
        if ev.token is not None:
            self.output_token_ids.append(ev.token)
            if ev.logprobs is not None:
                if self.logprobs is None:
                    self.logprobs = []
                self.logprobs.append({"logprob": ev.logprobs.logprob, "rank": ev.logprobs.rank,
                                      "top": [list(t) for t in ev.logprobs.top]})
        if ev.prompt_logprobs is not None:
            self.prompt_logprobs = [None if p is None else {"logprob": p.logprob, "rank": p.rank,
                                                            "top": [list(t) for t in p.top]}
                                    for p in ev.prompt_logprobs]
        if ev.finish_reason is not None:
            self.finish_reason, self.error = ev.finish_reason, ev.error

    def to_json(self) -> str:
        d: dict[str, Any] = {"id": self.id, "output_token_ids": self.output_token_ids,
                             "text": self.text, "finish_reason": self.finish_reason}
        if self.logprobs is not None:
            d["logprobs"] = self.logprobs
        if self.prompt_logprobs is not None:
            d["prompt_logprobs"] = self.prompt_logprobs
        if self.error is not None:
            d = {"id": self.id, "error": self.error, "finish_reason": "error"}
        return json.dumps(d, ensure_ascii=False)


def parse_request(obj: Any, line_no: int, tokenizer, vocab_size: int) -> GenerateRequest:
    """Validate one decoded JSON object; ValueError carries a message for the user."""
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    unknown = sorted(set(obj) - set(REQUEST_KEYS))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(REQUEST_KEYS)}")
    rid = obj.get("id", f"line-{line_no}")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise ValueError("'id' must be a string or an integer")
    rid = str(rid)
    has_prompt, has_ids = "prompt" in obj, "prompt_token_ids" in obj
    if has_prompt == has_ids:
        raise ValueError("give exactly one of 'prompt' or 'prompt_token_ids'")
    prompt = None
    if has_ids:
        ids = obj["prompt_token_ids"]
        if (not isinstance(ids, list) or not ids
                or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
            raise ValueError("'prompt_token_ids' must be a non-empty list of integers")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    else:
        prompt = obj["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("'prompt' must be a non-empty string")
        if tokenizer is None:
            raise ValueError("this model has no tokenizer.json: send 'prompt_token_ids' instead of 'prompt'")
        ids = tokenizer.encode(prompt)
        if not ids:
            raise ValueError("the prompt encodes to zero tokens")
    params = SamplingParams.from_dict({k: obj[k] for k in SAMPLING_KEYS if k in obj})
    params.validate()
    return GenerateRequest(rid, list(ids), params, prompt)


def read_requests(lines: Iterable[str], tokenizer, vocab_size: int
                  ) -> list[GenerateRequest | GenerateResult]:
    """One entry per non-blank line: a request, or a result that already carries the line's error."""
    out: list[GenerateRequest | GenerateResult] = []
    seen: set[str] = set()
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        rid = f"line-{line_no}"
        try:
            obj = json.loads(line)
            if isinstance(obj, dict) and isinstance(obj.get("id"), (str, int)):
                rid = str(obj["id"])
            req = parse_request(obj, line_no, tokenizer, vocab_size)
            if req.id in seen:
                raise ValueError(f"duplicate id {req.id!r}")
            seen.add(req.id)
            out.append(req)
        except json.JSONDecodeError as e:
            out.append(GenerateResult(rid, error=f"line {line_no}: invalid JSON ({e.msg} at column {e.colno})"))
        except ValueError as e:
            out.append(GenerateResult(rid, error=f"line {line_no}: {e}"))
    return out
