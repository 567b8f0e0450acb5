"""KV addressing of one attention batch, built once and reused by every block.

A batch is a list of spans, one per request: n new tokens at positions start..start+n-1 (a
prompt chunk, or one decode token). Every block of a step writes and reads the same cache
slots, so the index tensors are computed once when the batch forms, in a handful of vectorized
ops, and each block's attention is one write and one or two batched attention calls.

Legend: S spans, T new tokens (rows of x), M blocks per table, L context positions, n query rows
per span (padded to the longest), P prefill spans, bs block size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch.nn.utils.rnn import pad_sequence


@dataclass
class QueryGroup:
    """Spans whose queries run as one paged_attention call: rows_Sn picks their query rows out
    of the batch (padding repeats a valid row), valid_Sn marks the real ones. Padding past a
    table's end holds block 0: a valid block, masked by causality."""
    rows_Sn: Optional[torch.Tensor]  # None: the rows are the whole batch, in order (n = 1)
    valid_Sn: Optional[torch.Tensor]
    blocks_SM: torch.Tensor  # the first M blocks of each table, M = blocks of the longest context
    qpos_Sn: torch.Tensor
    tables_SM: torch.Tensor  # whole tables, for the Triton decode kernel on CUDA
    klen_S: torch.Tensor
    future_SnL: Optional[torch.Tensor] = None  # causal mask over the gathered blocks (True: masked)


@dataclass
class PagedBatch:
    num_tokens: int
    pos_T: torch.Tensor        # absolute position of each new token (RoPE)
    write_slots_T: torch.Tensor  # flat cache row of each new token
    max_pos: int
    groups: list[QueryGroup]
    memo: dict = field(default_factory=dict)  # per-step values the model derives once (RoPE)

    def once(self, key, make: Callable[[], Any]) -> Any:
        """make() on the first call for key, its result after that (every block of a step)."""
        got = self.memo.get(key)
        if got is None:
            got = self.memo[key] = make()
        return got

    @classmethod
    def build(cls, tables: list[torch.Tensor], start_S: list[int], n_S: list[int], block_size: int,
              num_cache_blocks: int, device: torch.device | str = "cpu") -> "PagedBatch":
        """tables: each span's block table (int64 tensor, already long enough for start + n)."""
        S, bs = len(n_S), block_size
        if S == 0 or len(tables) != S or len(start_S) != S:
            raise ValueError(f"need one table, start and length per span, got {len(tables)}, {len(start_S)}, {S}")
        need = [(s + n + bs - 1) // bs for s, n in zip(start_S, n_S)]
        if any(n < 1 or s < 0 for s, n in zip(start_S, n_S)) or any(t.numel() < m for t, m in zip(tables, need)):
            raise ValueError(f"spans (start, n) {list(zip(start_S, n_S))[:4]} do not fit their block tables")
        widths = {t.numel() for t in tables}  # equal tables stack in a tenth of pad_sequence's time
        tables_SM = (torch.stack(tables) if len(widths) == 1 else pad_sequence(tables, batch_first=True)).to(device)
        if int(tables_SM.min()) < 0 or int(tables_SM.max()) >= num_cache_blocks:
            raise ValueError(f"block ids must be in [0, {num_cache_blocks})")
        start_t = torch.tensor(start_S, dtype=torch.int64, device=device)
        n_t = torch.tensor(n_S, dtype=torch.int64, device=device)
        klen_S = start_t + n_t
        T = int(sum(n_S))
        first_S = torch.cumsum(n_t, 0) - n_t  # each span's first row in the batch
        if all(n == 1 for n in n_S):
            pos_T, span_T = start_t, None
        else:
            span_T = torch.repeat_interleave(torch.arange(S, device=device), n_t)
            pos_T = start_t[span_T] + torch.arange(T, device=device) - first_S[span_T]
        write_T = cls._slots(tables_SM, pos_T, bs, span_T)
        groups = []
        dec = [i for i, n in enumerate(n_S) if n == 1]
        if len(dec) == S:
            groups.append(cls._group(tables_SM, klen_S, bs, None, None, start_t[:, None]))
        else:
            for idx in (dec, [i for i, n in enumerate(n_S) if n > 1]):
                if not idx:
                    continue
                sel = torch.tensor(idx, dtype=torch.int64, device=device)
                nmax = max(n_S[i] for i in idx)
                i_n = torch.arange(nmax, device=device)[None, :]
                valid = i_n < n_t[sel, None]
                rows = first_S[sel, None] + torch.minimum(i_n, n_t[sel, None] - 1)
                qpos = start_t[sel, None] + torch.minimum(i_n, n_t[sel, None] - 1)
                groups.append(cls._group(tables_SM[sel], klen_S[sel], bs, rows, valid, qpos))
        return cls(T, pos_T, write_T, int(klen_S.max()) - 1, groups)

    @staticmethod
    def _slots(tables_SM: torch.Tensor, pos: torch.Tensor, bs: int, span: Optional[torch.Tensor]) -> torch.Tensor:
        if span is None:  # one position per span
            return tables_SM.gather(1, (pos // bs)[:, None])[:, 0] * bs + pos % bs
        return tables_SM[span, pos // bs] * bs + pos % bs

    @classmethod
    def _group(cls, tables_SM, klen_S, bs, rows, valid, qpos) -> QueryGroup:
        M = (int(klen_S.max()) + bs - 1) // bs  # blocks of the longest context
        future_SnL = torch.arange(M * bs, device=qpos.device)[None, None, :] > qpos[:, :, None]
        return QueryGroup(rows, valid, tables_SM[:, :M].contiguous(), qpos, tables_SM, klen_S, future_SnL)
