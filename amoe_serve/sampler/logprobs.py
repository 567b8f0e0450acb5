"""Log-probabilities for the API's `logprobs` / `prompt_logprobs`.

They are the model's own distribution: log_softmax of the raw fp32 logits, before temperature,
penalties, bias or a grammar mask (vLLM's default `logprobs_mode=raw_logprobs`), from the same
logits the sampler draws from. Rows that do not ask for logprobs cost nothing.

Legend: b rows, n prompt positions, V vocab, k top logprobs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class TokenLogprobs:
    """One position: the chosen token's logprob, its rank (1 = most likely) and the top k."""
    logprob: float
    rank: int
    top: list[tuple[int, float]] = field(default_factory=list)

    def to_wire(self) -> list:
        return [self.logprob, self.rank, [[t, lp] for t, lp in self.top]]

    @classmethod
    def from_wire(cls, w: list) -> "TokenLogprobs":
        lp, rank, top = w
        return cls(float(lp), int(rank), [(int(t), float(v)) for t, v in top])


def _finite(x: float) -> float:
    return x if x != float("-inf") else -9999.0  # JSON has no -inf; vLLM answers -9999.0 too


def token_logprobs(logits_bV: torch.Tensor, tokens_b: torch.Tensor, k_b: list[int]) -> list[TokenLogprobs]:
    """Per row: logprob and rank of tokens_b[i] and the k_b[i] most likely tokens."""
    lp_bV = torch.log_softmax(logits_bV.to(torch.float32), dim=-1)
    chosen_b = lp_bV.gather(1, tokens_b.view(-1, 1).to(torch.long)).view(-1)
    rank_b = (lp_bV > chosen_b[:, None]).sum(dim=1) + 1
    kmax = max(k_b, default=0)
    top_v = top_i = None
    if kmax > 0:
        top_v, top_i = torch.topk(lp_bV, kmax, dim=-1)
        top_v, top_i = top_v.tolist(), top_i.tolist()
    out = []
    for i, (lp, rank) in enumerate(zip(chosen_b.tolist(), rank_b.tolist())):
        k = k_b[i]
        top = [(top_i[i][j], _finite(top_v[i][j])) for j in range(k)] if k else []
        out.append(TokenLogprobs(_finite(lp), int(rank), top))
    return out


def prompt_logprobs(logits_nV: torch.Tensor, prompt: list[int], k: int) -> list[Optional[TokenLogprobs]]:
    """Logprob of each prompt token given the ones before it (row j of logits_nV predicts token
    j+1); the first token has none (None), as in vLLM."""
    n = len(prompt)
    if n < 2:
        return [None] * n
    nxt = torch.tensor(prompt[1:], dtype=torch.long, device=logits_nV.device)
    return [None, *token_logprobs(logits_nV[: n - 1], nxt, [k] * (n - 1))]
