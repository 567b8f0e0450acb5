"""One safetensors file read with positioned reads (os.preadv) straight into tensors.

Not through a memory map: pages a map touches count toward the process's RSS until it is
unmapped, so a rank reading its 6 GB of experts through one would peak at twice that. Here
each tensor (or row range of a tensor, for fused expert stacks) is one preadv into its
destination's bytes: the page cache is read once and nothing else stays resident.
Thread-safe: preadv takes its own offset (Expert Buffering's prefetch thread reads too).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .spec import CheckpointError

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


@dataclass(frozen=True)
class Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offsets
    end: int


class ShardFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: Optional[int] = None
        size = self.path.stat().st_size
        try:
            with open(self.path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > size - 8:
                    raise ValueError("header length exceeds the file")
                header = json.loads(fh.read(n))
        except (ValueError, struct.error, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{self.path}: not a safetensors file ({exc})") from None
        self.entries: dict[str, Entry] = {}
        base = 8 + n
        for name, v in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = DTYPES[v["dtype"]]
                shape = tuple(int(x) for x in v["shape"])
                a, b = (int(x) for x in v["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: bad header entry for {name!r}") from None
            if b - a != math.prod(shape) * torch.empty((), dtype=dtype).element_size():
                raise CheckpointError(f"{self.path}: {name} has {b - a} bytes for shape {list(shape)}")
            self.entries[name] = Entry(dtype, shape, base + a, base + b)
        end = max((e.end for e in self.entries.values()), default=base)
        if end > size:
            raise CheckpointError(f"{self.path}: truncated: the header describes {end} bytes, the file has {size}")

    def keys(self) -> list[str]:
        return list(self.entries)

    def _fileno(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()

    def row_shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape[1:]

    def read(self, name: str, rows: Optional[tuple[int, int]] = None, out: Optional[torch.Tensor] = None,
             flat: bool = False) -> torch.Tensor:
        """The tensor, or rows [lo, hi) of its first dimension (flat=True: of its 2-D view
        [-1, last dim]), read into `out` when given (stored dtype, the read's shape) or into a
        new tensor."""
        e = self.entries[name]
        if rows is None:
            return self._read(name, e.start, e.shape, e.dtype, out)
        full = (math.prod(e.shape[:-1]), e.shape[-1]) if flat else e.shape
        lo, hi = rows
        if not full or not 0 <= lo <= hi <= full[0]:
            raise CheckpointError(f"{self.path}: rows {lo}:{hi} of {name} {list(e.shape)}")
        row_bytes = (e.end - e.start) // max(full[0], 1)
        return self._read(name, e.start + lo * row_bytes, (hi - lo, *full[1:]), e.dtype, out)

    def _read(self, name: str, start: int, shape: tuple[int, ...], dtype: torch.dtype,
              out: Optional[torch.Tensor]) -> torch.Tensor:
        if out is None:
            out = torch.empty(shape, dtype=dtype)
        elif out.dtype != dtype or tuple(out.shape) != tuple(shape) or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"read into {out.dtype} {tuple(out.shape)}: expected contiguous CPU {dtype} {tuple(shape)}")
        if not out.numel():
            return out
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        got, fd = 0, self._fileno()
        while got < len(view):  # preadv may return short reads
            n = os.preadv(fd, [view[got:]], start + got)
            if n <= 0:
                raise CheckpointError(f"{self.path}: short read of {name} at byte {start + got}")
            got += n
        return out
