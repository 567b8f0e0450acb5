"""Safetensors checkpoint loading with per-tensor filtering.

Internal naming (what `load_weights` returns and what `want` is asked about):
  * everything but routed experts keeps its Hugging Face name, except that Mixtral's
    `block_sparse_moe.` is renamed `mlp.` (so the router is always `model.layers.{b}.mlp.gate.weight`);
  * routed experts are `model.layers.{b}.mlp.experts.{e}.w1|w3|w2` (no `.weight`):
    w1 = gate [F, D], w3 = up [F, D], w2 = down [D, F].

Accepted on-disk expert layouts:
  * per-expert (what transformers 5.24 `save_pretrained` writes, and the classic hub layout):
    Mixtral `block_sparse_moe.experts.{e}.w1|w2|w3.weight`,
    Qwen2-MoE / OLMoE `mlp.experts.{e}.gate_proj|up_proj|down_proj.weight`;
  * fused (transformers v5 in-memory layout): `mlp.experts.gate_up_proj` [E, 2F, D] (gate rows
    first, then up) and `mlp.experts.down_proj` [E, D, F], optionally with `.weight`. Only the
    wanted experts' rows are read from disk.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Optional

import torch

from .shard_file import ShardFile
from .spec import CheckpointError, ModelSpec, read_json

_PER_EXPERT = re.compile(
    r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\."
    r"(w1|w2|w3|gate_proj|up_proj|down_proj)(?:\.weight)?$"
)
_FUSED = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(gate_up_proj|down_proj)(?:\.weight)?$")
_INTERNAL_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(w1|w2|w3)$")
_PROJ_TO_W = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2", "w1": "w1", "w2": "w2", "w3": "w3"}


def expert_name(block: int, expert: int, w: str) -> str:
    return f"model.layers.{block}.mlp.experts.{expert}.{w}"


def is_expert_weight(name: str) -> Optional[tuple[int, int]]:
    """(block, expert) if `name` (internal naming) is a routed-expert weight, else None."""
    m = _INTERNAL_EXPERT.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def attention_side_filter() -> Callable[[str], bool]:
    """Accept everything except routed experts (attention ranks)."""
    return lambda name: is_expert_weight(name) is None


def expert_filter(pairs: Iterable[tuple[int, int]]) -> Callable[[str], bool]:
    """Accept only the routed-expert weights of the given (block, expert) pairs (expert ranks)."""
    wanted = {(int(b), int(e)) for b, e in pairs}
    return lambda name: is_expert_weight(name) in wanted


def _normalize(name: str) -> str:
    m = _PER_EXPERT.match(name)
    if m:
        return expert_name(int(m.group(1)), int(m.group(2)), _PROJ_TO_W[m.group(3)])
    return name.replace(".block_sparse_moe.", ".mlp.")


def _shard_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        files = [folder / f for f in sorted(set(weight_map.values()))]
    elif single.is_file():
        files = [single]
    else:
        raise CheckpointError(f"{folder}: neither model.safetensors nor model.safetensors.index.json found")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: safetensors shard listed in the index is missing")
    return files


def _open(file: Path) -> ShardFile:
    return ShardFile(file)


def _cast(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    return t if dtype is None else t.to(dtype)


def load_weights(
    path: str | Path,
    spec: ModelSpec,
    dtype: Optional[torch.dtype],
    want: Callable[[str], bool],
) -> dict[str, torch.Tensor]:
    """Load the tensors whose internal name `want` accepts; dtype=None keeps the checkpoint
    dtype. Tensors it does not accept are never read."""
    out: dict[str, torch.Tensor] = {}
    F = spec.expert_intermediate_size
    for file in _shard_files(Path(path)):
        f = _open(file)
        try:
            for raw in f.keys():
                fused = _FUSED.match(raw)
                if fused:
                    b, kind = int(fused.group(1)), fused.group(2)
                    ws = ("w1", "w3") if kind == "gate_up_proj" else ("w2",)
                    experts = [e for e in range(spec.num_experts) if any(want(expert_name(b, e, w)) for w in ws)]
                    for e in experts:
                        rows = f.read(raw, (e, e + 1))[0]  # reads only expert e's rows
                        if kind == "gate_up_proj":
                            if rows.shape[0] != 2 * F:
                                raise CheckpointError(f"{file}: {raw} has {rows.shape[0]} rows, expected 2*{F}")
                            out[expert_name(b, e, "w1")] = _cast(rows[:F].contiguous(), dtype)
                            out[expert_name(b, e, "w3")] = _cast(rows[F:].contiguous(), dtype)
                        else:
                            out[expert_name(b, e, "w2")] = _cast(rows, dtype)
                    continue
                name = _normalize(raw)
                if want(name):
                    out[name] = _cast(f.read(raw), dtype)
        finally:
            f.close()
    return out


def _header_names(file: Path) -> list[str]:
    """Tensor names of a safetensors file, after checking its header and that the file holds
    every byte the header promises (a truncated file otherwise fails only when a rank reads it)."""
    return ShardFile(file).keys()


def check_checkpoint(path: str | Path, spec: ModelSpec, required: Iterable[str]) -> None:
    """Fail fast, before any rank starts, on a missing, truncated or incomplete checkpoint."""
    have: set[str] = set()
    for file in _shard_files(Path(path)):
        for raw in _header_names(file):
            fused = _FUSED.match(raw)
            if fused:
                b = int(fused.group(1))
                ws = ("w1", "w3") if fused.group(2) == "gate_up_proj" else ("w2",)
                have.update(expert_name(b, e, w) for e in range(spec.num_experts) for w in ws)
            else:
                have.add(_normalize(raw))
    experts = [expert_name(b, e, w) for b in range(spec.num_blocks) for e in range(spec.num_experts)
               for w in ("w1", "w3", "w2")]
    missing = [n for n in [*required, *experts] if n not in have]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{path}: checkpoint is missing tensors {', '.join(missing[:3])}{more}")


class ExpertReader:
    """Reads one expert's (w1_FD, w3_FD, w2_DF) with positioned reads of only that expert's
    bytes (shard_file.py), in the layouts `load_weights` reads. Expert ranks load their experts
    through it, and Expert Buffering reads experts on demand through it. `reads` and
    `bytes_read` count what was read (tests check that nothing else is)."""

    def __init__(self, path: str | Path, spec: ModelSpec):
        self.path = str(path)
        self.F, self.D = spec.expert_intermediate_size, spec.hidden_size
        self._lock = threading.Lock()   # counters: main thread or the prefetcher
        self._files: list[ShardFile] = []
        self.reads: Counter[tuple[int, int]] = Counter()  # (block, expert) -> times read
        self.bytes_read = 0
        # (block, expert, w) -> (file, raw name, flat row range or None for the whole tensor)
        self._where: dict[tuple[int, int, str], tuple[ShardFile, str, Optional[tuple[int, int]]]] = {}
        F, D = self.F, self.D
        for file in _shard_files(Path(path)):
            f = _open(file)
            self._files.append(f)
            for raw in f.keys():
                fused = _FUSED.match(raw)
                if fused:  # [E, 2F, D] (gate rows, then up) or [E, D, F], as 2-D rows
                    b = int(fused.group(1))
                    for e in range(spec.num_experts):
                        if fused.group(2) == "gate_up_proj":
                            self._where[(b, e, "w1")] = (f, raw, (2 * F * e, 2 * F * e + F))
                            self._where[(b, e, "w3")] = (f, raw, (2 * F * e + F, 2 * F * (e + 1)))
                        else:
                            self._where[(b, e, "w2")] = (f, raw, (D * e, D * (e + 1)))
                    continue
                m = _INTERNAL_EXPERT.match(_normalize(raw))
                if m:
                    self._where[(int(m.group(1)), int(m.group(2)), m.group(3))] = (f, raw, None)

    def close(self) -> None:
        for f in self._files:
            f.close()

    def dtype(self, b: int, e: int) -> torch.dtype:
        """The on-disk dtype of an expert's weights, from the header (nothing is read)."""
        f, raw, _ = self._where[(b, e, "w1")]
        return f.entries[raw].dtype

    def has(self, b: int, e: int) -> bool:
        return all((b, e, w) in self._where for w in ("w1", "w3", "w2"))

    def read(self, b: int, e: int, out: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1_FD, w3_FD, w2_DF); into `out` (contiguous, the stored dtype) when given, so an
        expert goes from the page cache into its slot with no copy in between."""
        got = []
        try:
            for i, w in enumerate(("w1", "w3", "w2")):
                where = self._where.get((b, e, w))
                if where is None:
                    raise CheckpointError(f"{self.path}: missing expert tensor {expert_name(b, e, w)}")
                f, raw, rows = where
                dst = None if out is None else out[i]
                t = f.read(raw, rows, dst, flat=True) if rows is not None else f.read(raw, out=dst)
                want = (self.D, self.F) if w == "w2" else (self.F, self.D)
                if tuple(t.shape) != want:
                    raise CheckpointError(f"{self.path}: expert ({b}, {e}) {w} has shape {tuple(t.shape)}, "
                                          f"config implies {want}")
                got.append(t)
        except (CheckpointError, ValueError):
            raise
        except Exception as exc:  # an unreadable or vanished file surfaces only when read
            raise CheckpointError(f"{self.path}: cannot read expert ({b}, {e}) ({exc})") from None
        with self._lock:
            self.reads[(b, e)] += 1
            self.bytes_read += sum(t.numel() * t.element_size() for t in got)
        return got[0], got[1], got[2]
