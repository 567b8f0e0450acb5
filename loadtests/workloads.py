"""The AMoE paper's serving workloads, as data, plus seeded request and arrival generators.

Three workloads draw the prompt (input) length and the generation (output) length independently and
uniformly from inclusive integer ranges:

=============  ============  =============
workload       input tokens  output tokens
=============  ============  =============
short          30 - 70       70 - 130
medium         50 - 150      50 - 250
reasonable     100 - 300     100 - 500
=============  ============  =============

The prompt is plain ASCII text.  The default model uses a byte-level tokenizer (about one token per
byte), so a prompt of N characters is about N tokens; ``tokens_per_char`` rescales that for other
tokenizers (e.g. ~0.25 for a BPE tokenizer on English text).  ``max_tokens`` is the drawn output
length and ``ignore_eos`` is set so that every request generates exactly that many tokens.

Everything here is pure stdlib and deterministic given a seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Iterator

__all__ = [
    "Workload",
    "WORKLOADS",
    "get_workload",
    "make_prompt",
    "CompletionRequest",
    "make_request",
    "request_stream",
    "poisson_interarrivals",
    "poisson_arrival_times",
    "PoissonClock",
]


@dataclass(frozen=True)
class Workload:
    """Uniform input/output length ranges (inclusive, in tokens)."""

    name: str
    input_min: int
    input_max: int
    output_min: int
    output_max: int

    def __post_init__(self) -> None:
        if not (0 < self.input_min <= self.input_max):
            raise ValueError(f"bad input range {self.input_min}..{self.input_max}")
        if not (0 < self.output_min <= self.output_max):
            raise ValueError(f"bad output range {self.output_min}..{self.output_max}")

    @property
    def mean_input(self) -> float:
        return (self.input_min + self.input_max) / 2

    @property
    def mean_output(self) -> float:
        return (self.output_min + self.output_max) / 2

    def draw_lengths(self, rng: random.Random) -> tuple[int, int]:
        """One (input_tokens, output_tokens) pair, each uniform over its inclusive range."""
        return rng.randint(self.input_min, self.input_max), rng.randint(self.output_min, self.output_max)


WORKLOADS: dict[str, Workload] = {
    "short": Workload("short", 30, 70, 70, 130),
    "medium": Workload("medium", 50, 150, 50, 250),
    "reasonable": Workload("reasonable", 100, 300, 100, 500),
}


def get_workload(name: str) -> Workload:
    try:
        return WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; choose one of {sorted(WORKLOADS)}") from None


# A fixed ASCII vocabulary: prompts look like (meaningless) English and stay 1 byte per character.
_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there one all we their has been if more when will would who so no "
    "expert mixture model token route gate layer serve batch queue latency throughput parallel "
    "attention kernel memory cache request stream device rank shard weight compute network time "
    "river mountain garden window paper orange music simple quiet rapid golden winter summer forest"
).split()


def make_prompt(n_tokens: int, rng: random.Random, tokens_per_char: float = 1.0) -> str:
    """ASCII text of ``round(n_tokens / tokens_per_char)`` characters (at least 1).

    With the default byte-level tokenizer (``tokens_per_char == 1.0``) that is ~``n_tokens`` tokens.
    """
    if tokens_per_char <= 0:
        raise ValueError("tokens_per_char must be > 0")
    n_chars = max(1, int(round(n_tokens / tokens_per_char)))
    parts: list[str] = []
    size = -1  # length of " ".join(parts)
    while size < n_chars:
        w = rng.choice(_WORDS)
        parts.append(w)
        size += len(w) + 1
    text = " ".join(parts)[:n_chars]
    # Never end on a space (some tokenizers/servers strip it, shifting the length by one).
    if text.endswith(" "):
        text = text[:-1] + "."
    return text


@dataclass(frozen=True)
class CompletionRequest:
    """One drawn request: the JSON body for ``POST /v1/completions`` plus the drawn lengths."""

    body: dict[str, Any]
    input_tokens: int  # drawn (target) prompt length in tokens
    output_tokens: int  # drawn output length == max_tokens


def make_request(
    workload: Workload | str,
    rng: random.Random | int,
    *,
    model: str = "default",
    tokens_per_char: float = 1.0,
    stream: bool = True,
    include_usage: bool = True,
    temperature: float | None = 0.0,
) -> CompletionRequest:
    """Draw one request of ``workload``.

    ``rng`` is a ``random.Random`` (advanced in place) or an int seed.  The body carries
    ``max_tokens`` = drawn output length and the vLLM-style ``ignore_eos: true`` so the output runs
    its full length; with ``stream`` it asks for SSE, and ``include_usage`` adds OpenAI's
    ``stream_options.include_usage`` so the last chunk reports ``usage.completion_tokens``.
    """
    wl = get_workload(workload) if isinstance(workload, str) else workload
    if not isinstance(rng, random.Random):
        rng = random.Random(rng)
    n_in, n_out = wl.draw_lengths(rng)
    body: dict[str, Any] = {
        "model": model,
        "prompt": make_prompt(n_in, rng, tokens_per_char),
        "max_tokens": n_out,
        "ignore_eos": True,
        "stream": stream,
    }
    if temperature is not None:
        body["temperature"] = float(temperature)  # strict servers reject an int here
    if stream and include_usage:
        body["stream_options"] = {"include_usage": True}
    return CompletionRequest(body=body, input_tokens=n_in, output_tokens=n_out)


def request_stream(workload: Workload | str, seed: int, **kwargs: Any) -> Iterator[CompletionRequest]:
    """An endless, reproducible sequence of requests (same seed -> same sequence)."""
    rng = random.Random(seed)
    while True:
        yield make_request(workload, rng, **kwargs)


# ---------------------------------------------------------------------------------------------
# Poisson arrivals
# ---------------------------------------------------------------------------------------------


def poisson_interarrivals(rate: float, n: int, seed: int | random.Random = 0) -> list[float]:
    """``n`` exponential inter-arrival gaps (seconds) of a Poisson process with ``rate`` req/s."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    return [rng.expovariate(rate) for _ in range(n)]


def poisson_arrival_times(rate: float, n: int, seed: int | random.Random = 0, start: float = 0.0) -> list[float]:
    """Absolute arrival times (cumulative sums of the gaps), starting after ``start``."""
    t = start
    out = []
    for gap in poisson_interarrivals(rate, n, seed):
        t += gap
        out.append(t)
    return out


class PoissonClock:
    """A shared, open-loop Poisson arrival schedule that many concurrent users draw slots from.

    Each call to :meth:`claim` hands out the next arrival time ``t_k = t_{k-1} + Exp(rate)`` and
    returns how long the caller should sleep until it.  Because the schedule is global (not per
    user), the aggregate arrival process is Poisson with the given rate regardless of how many
    users share it -- as long as a free user is available at every arrival.  When all users are
    busy, a slot is claimed late; it then fires immediately (delay 0) and the schedule is *not*
    shifted, so the long-run rate is kept; ``late``/``total_lag`` count how often and by how much
    (if ``late`` is large, raise the number of users ``-u``).

    Not thread-safe on purpose: under Locust's gevent users ``claim`` never yields, so it is
    atomic.  ``now`` is injected so it is testable without sleeping.
    """

    def __init__(self, rate: float, seed: int = 0, late_tolerance_s: float = 0.010) -> None:
        if rate <= 0 or not math.isfinite(rate):
            raise ValueError("rate must be a positive finite number")
        self.rate = rate
        self._rng = random.Random(seed)
        self._next: float | None = None
        self.late_tolerance_s = late_tolerance_s
        self.claimed = 0
        self.late = 0
        self.total_lag = 0.0

    def claim(self, now: float) -> float:
        """Reserve the next arrival slot; return the delay (>= 0) until it, from ``now``."""
        if self._next is None:
            self._next = now + self._rng.expovariate(self.rate)
        slot = self._next
        self._next = slot + self._rng.expovariate(self.rate)
        self.claimed += 1
        delay = slot - now
        if delay < -self.late_tolerance_s:
            self.late += 1
            self.total_lag += -delay
        return max(0.0, delay)
