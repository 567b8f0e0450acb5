"""An in-memory `DataPlaneLink` for tests and demos (no data plane needed).

Tokens are deterministic: each next token is `(last + 1) % vocab_size` where `last` starts at
the prompt's last token, unless `script` gives the exact tokens to emit. It honours max_tokens,
eos (unless ignore_eos) and stop_token_ids like the real engine, and can simulate delays,
429/503 refusals (`fail_status`), a data plane going down (`down`), and a mid-stream error
(`error_after`). Every request is recorded in `requests`; requests closed before they finished
(the `aclose()` of the ingress) are recorded in `cancels`.

With `logprobs` / `prompt_logprobs` in the params it sends made-up logprobs of a fixed shape:
token t has logprob -0.5 (rank 1), and the top k are t, t+1, ... with -0.5, -1.5, ...
"""

from __future__ import annotations

import asyncio
import itertools
from typing import AsyncIterator, Optional

from amoe_serve.sampler.logprobs import TokenLogprobs
from amoe_serve.link.api import DataPlaneError, GenEvent, ModelInfo


class FakeLink:
    def __init__(
        self,
        name: str = "fake",
        max_model_len: int = 2048,
        vocab_size: int = 259,
        eos_token_ids: tuple[int, ...] | list[int] = (2,),
        *,
        script: Optional[list[int]] = None,
        token_delay_s: float = 0.0,
        first_token_delay_s: float = 0.0,
        fail_status: Optional[int] = None,
        retry_after: Optional[float] = None,
        error_after: Optional[int] = None,
        down: bool = False,
        stats: Optional[dict] = None,
    ):
        self.info = ModelInfo(name=name, max_model_len=max_model_len, vocab_size=vocab_size,
                              eos_token_ids=list(eos_token_ids))
        self.script = script
        self.token_delay_s = token_delay_s
        self.first_token_delay_s = first_token_delay_s
        self.fail_status = fail_status
        self.retry_after = retry_after
        self.error_after = error_after
        self.down = down
        self._stats = stats
        self.connected = False
        self.closed = False
        self.requests: list[dict] = []   # {"id", "prompt", "params"}
        self.started: list[int] = []
        self.finished: list[int] = []
        self.cancels: list[int] = []
        self.active = 0
        self._ids = itertools.count()

    async def connect(self) -> ModelInfo:
        if self.down:
            raise DataPlaneError(f"gateway of {self.info.name} is down", status=503)
        self.connected = True
        return self.info

    def generate(self, prompt_token_ids: list[int], params: dict) -> AsyncIterator[GenEvent]:
        rid = next(self._ids)
        self.requests.append({"id": rid, "prompt": list(prompt_token_ids), "params": dict(params)})
        return self._gen(rid, list(prompt_token_ids), dict(params))

    async def _gen(self, rid: int, prompt: list[int], params: dict) -> AsyncIterator[GenEvent]:
        if self.down:
            raise DataPlaneError(f"gateway of {self.info.name} is down", status=503)
        if self.fail_status is not None:
            raise DataPlaneError(f"fake refusal {self.fail_status}", status=self.fail_status,
                                 retry_after=self.retry_after)
        self.started.append(rid)
        self.active += 1
        done = False
        try:
            max_tokens = int(params.get("max_tokens", 16))
            stop_ids = set(params.get("stop_token_ids") or [])
            eos = set() if params.get("ignore_eos") else set(self.info.eos_token_ids)
            last = prompt[-1] if prompt else 0
            for i in range(max_tokens):
                delay = self.first_token_delay_s if i == 0 else self.token_delay_s
                await asyncio.sleep(delay)  # also a scheduling point, as a socket read would be
                if self.down:
                    yield GenEvent(None, "error", "data plane went down")
                    done = True
                    return
                if self.error_after is not None and i >= self.error_after:
                    yield GenEvent(None, "error", "simulated data-plane failure")
                    done = True
                    return
                if self.script is not None:
                    if i >= len(self.script):
                        yield GenEvent(None, "stop")
                        done = True
                        return
                    tok = self.script[i]
                else:
                    tok = (last + 1) % self.info.vocab_size
                last = tok
                if tok in stop_ids or tok in eos:
                    reason = "stop"
                elif i + 1 >= max_tokens:
                    reason = "length"
                else:
                    reason = None
                if reason is not None:
                    done = True
                ev = GenEvent(tok, reason)
                if params.get("logprobs") is not None:
                    ev.logprobs = self.fake_logprobs(tok, params["logprobs"])
                if i == 0 and params.get("prompt_logprobs") is not None:
                    ev.prompt_logprobs = [None] + [self.fake_logprobs(t, params["prompt_logprobs"]) for t in prompt[1:]]
                yield ev
                if reason is not None:
                    return
            done = True
        finally:
            self.active -= 1
            (self.finished if done else self.cancels).append(rid)

    def fake_logprobs(self, tok: int, k: int) -> TokenLogprobs:
        V = self.info.vocab_size
        return TokenLogprobs(-0.5, 1, [((tok + j) % V, -0.5 - j) for j in range(k)])

    async def stats(self) -> dict:
        if self.down:
            raise DataPlaneError("down", status=503)
        if self._stats is not None:
            return self._stats
        return {
            "ranks": {
                "0": {"role": "attention", "idle_fraction": 0.25, "busy_s": 3.0, "idle_s": 1.0,
                      "batch_hist": {"1": 5, "2-3": 2}},
                "1": {"role": "expert", "queue_depth_mean": [[0.5, 1.5], [2.0, 0.0]],
                      "queue_depth_max": [[1, 3], [4, 0]], "tokens_per_layer": [[10, 20], [30, 40]],
                      "batch_hist": {"1": 7, "4-7": 1}, "idle_fraction": 0.5, "busy_s": 2.0, "idle_s": 2.0},
            },
            "gateway": {"waiting": 1, "running": self.active, "kv_free_blocks": {"0": 1000}},
        }

    async def health_state(self) -> str:
        return "down" if self.down else "ok"

    async def healthy(self) -> bool:
        return not self.down

    async def close(self) -> None:
        self.closed = True


def fake_link_factory(spec: dict) -> FakeLink:
    """Link factory for `deployment.build_serve_app(..., link_factory=...)` in tests: builds a
    FakeLink from `spec["fake"]` (keyword arguments) named after `spec["name"]`."""
    kwargs = dict(spec.get("fake") or {})
    kwargs.setdefault("name", spec.get("name", "fake"))
    return FakeLink(**kwargs)
