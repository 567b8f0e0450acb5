"""Shared fixtures: one small random checkpoint per architecture variant, built once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # make hf_factory importable as a plain module

# name -> (arch, overrides)
VARIANTS = {
    "mixtral": ("mixtral", {}),
    "qwen2_moe": ("qwen2_moe", {}),
    "qwen2_moe_nonorm": ("qwen2_moe", {"norm_topk_prob": False}),
    "olmoe": ("olmoe", {}),
    "olmoe_clip_bias": ("olmoe", {"clip_qkv": 0.6, "attention_bias": True, "norm_topk_prob": True}),
}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    pytest.importorskip("transformers")
    from hf_factory import make_checkpoint

    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            arch, over = VARIANTS[name]
            cache[name] = make_checkpoint(arch, tmp_path_factory.mktemp(name), seed=len(cache), **over)
        return cache[name]

    return get
