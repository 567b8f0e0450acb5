"""Launch parameters as data: amoe_kernels/configs/<device>.json over configs/default.json.

Lookup order for a CUDA tensor: $AMOE_KERNELS_CONFIGS/<device>.json, configs/<device>.json, then
configs/default.json (keys missing from a device table fall back to the default). CPU tensors run
under the Triton interpreter and use configs/interpreter.json.
"""

from __future__ import annotations

import functools
import json
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

import torch


def device_key(device: torch.device) -> str:
    if device.type != "cuda":
        return "interpreter"
    return re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(device)).strip("_")


def _read(name: str) -> dict[str, Any] | None:
    extra = os.environ.get("AMOE_KERNELS_CONFIGS")
    if extra and (Path(extra) / f"{name}.json").is_file():
        return json.loads((Path(extra) / f"{name}.json").read_text())
    f = resources.files("amoe_kernels").joinpath("configs", f"{name}.json")
    return json.loads(f.read_text()) if f.is_file() else None


@functools.lru_cache(maxsize=None)
def table(key: str) -> dict[str, Any]:
    base = _read("default")
    if base is None:
        raise FileNotFoundError("amoe_kernels/configs/default.json is missing (package data not installed?)")
    own = _read(key) if key != "default" else None
    return {**base, **(own or {})}


def config(op: str, device: torch.device, m: int | None = None) -> dict[str, Any]:
    """Launch parameters of `op` on `device`; for list-valued entries, m selects the row."""
    entry = table(device_key(device))[op]
    if isinstance(entry, list):
        for row in entry:
            if row.get("max_m") is None or (m is not None and m <= row["max_m"]):
                return {k: v for k, v in row.items() if k != "max_m"}
        return {k: v for k, v in entry[-1].items() if k != "max_m"}
    return dict(entry)
