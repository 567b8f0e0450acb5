"""ModelSpec: one normalized description of the supported MoE architectures.

Reads a Hugging Face `config.json` (transformers v4 or v5 style) for Mixtral, Qwen2-MoE
and OLMoE and refuses, with a clear message, every feature the model code does not
implement (rope scaling, non-SiLU experts, dense layers in Qwen2-MoE, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from amoe_serve.errors import UserInputError

SUPPORTED_ARCHITECTURES = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "OlmoeForCausalLM": "olmoe",
}


class CheckpointError(UserInputError):
    """A checkpoint folder is missing, unreadable, or uses an unsupported feature."""


@dataclass(frozen=True)
class ModelSpec:
    architecture: str  # "mixtral" | "qwen2_moe" | "olmoe"
    vocab_size: int
    hidden_size: int
    num_blocks: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    shared_expert_intermediate_size: int  # 0 = no shared expert
    norm_topk_prob: bool  # renormalize the top-k routing weights to sum to 1
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int  # capped at the sliding window if one is configured
    qk_norm: bool  # OLMoE: RMSNorm over the flat q / k projections
    attention_bias: bool  # bias on q/k/v projections
    o_bias: bool  # bias on o_proj (OLMoE attention_bias)
    clip_qkv: Optional[float]
    tie_word_embeddings: bool
    bos_token_id: Optional[int]
    eos_token_ids: tuple[int, ...]
    # Mixtral keeps routing weights in fp32; Qwen2-MoE / OLMoE cast them to the model dtype.
    route_weights_fp32: bool = False


def _as_id_tuple(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, int):
        return (v,)
    return tuple(int(x) for x in v)


def _rope(cfg: dict, where: str) -> float:
    """rope_theta from v5 `rope_parameters` or v4 `rope_theta`/`rope_scaling`; refuse scaling."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling")
    if scaling:
        rtype = scaling.get("rope_type", scaling.get("type", "default"))
        if rtype != "default":
            raise CheckpointError(f"{where}: rope scaling {scaling!r} is not supported (only plain RoPE)")
    rtype = params.get("rope_type", "default")
    if rtype != "default":
        raise CheckpointError(f"{where}: rope_type {rtype!r} is not supported (only plain RoPE)")
    prf = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if prf not in (None, 1.0, 1):
        raise CheckpointError(f"{where}: partial_rotary_factor={prf} is not supported")
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    if theta is None:
        raise CheckpointError(f"{where}: no rope_theta found")
    return float(theta)


def _req(cfg: dict, key: str, where: str) -> Any:
    if cfg.get(key) is None:
        raise CheckpointError(f"{where}: required field {key!r} is missing")
    return cfg[key]


def spec_from_config(cfg: dict, where: str = "config.json") -> ModelSpec:
    archs = cfg.get("architectures") or []
    arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None and not archs:
        arch = {v: v for v in SUPPORTED_ARCHITECTURES.values()}.get(cfg.get("model_type"))
    if arch is None:
        raise CheckpointError(
            f"{where}: unsupported architecture {archs or cfg.get('model_type')!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported (only silu)")

    hidden = int(_req(cfg, "hidden_size", where))
    heads = int(_req(cfg, "num_attention_heads", where))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    if heads % kv_heads:
        raise CheckpointError(f"{where}: num_attention_heads={heads} not divisible by num_key_value_heads={kv_heads}")
    num_blocks = int(_req(cfg, "num_hidden_layers", where))
    max_pos = int(cfg.get("max_position_embeddings") or 4096)

    if arch == "mixtral":
        num_experts = int(_req(cfg, "num_local_experts", where))
        ffn = int(_req(cfg, "intermediate_size", where))
        shared, norm_topk = 0, True
    else:
        num_experts = int(_req(cfg, "num_experts", where))
        ffn = int(_req(cfg, "moe_intermediate_size" if arch == "qwen2_moe" else "intermediate_size", where))
        shared = int(cfg.get("shared_expert_intermediate_size") or 0) if arch == "qwen2_moe" else 0
        norm_topk = bool(cfg.get("norm_topk_prob", False))

    if arch == "qwen2_moe":
        if cfg.get("mlp_only_layers"):
            raise CheckpointError(f"{where}: Qwen2-MoE mlp_only_layers={cfg['mlp_only_layers']} (dense layers) not supported")
        if int(cfg.get("decoder_sparse_step", 1)) != 1:
            raise CheckpointError(f"{where}: Qwen2-MoE decoder_sparse_step != 1 (dense layers) not supported")
        if num_experts <= 0:
            raise CheckpointError(f"{where}: num_experts must be > 0")
        layer_types = cfg.get("layer_types") or []
        if any(t != "full_attention" for t in layer_types) or (
            not layer_types and cfg.get("use_sliding_window") and cfg.get("max_window_layers", 0) < num_blocks
        ):
            raise CheckpointError(f"{where}: Qwen2-MoE sliding-window attention layers are not supported")
    if arch == "olmoe" and head_dim * heads != hidden:
        raise CheckpointError(f"{where}: OLMoE requires head_dim * num_attention_heads == hidden_size")

    # Sliding-window attention equals full attention while the context fits in the window,
    # so a window only caps the usable context length.
    window = cfg.get("sliding_window") if arch != "qwen2_moe" else None
    if window:
        max_pos = min(max_pos, int(window))

    clip = cfg.get("clip_qkv") if arch == "olmoe" else None
    bias = bool(cfg.get("qkv_bias", True)) if arch == "qwen2_moe" else (
        bool(cfg.get("attention_bias", False)) if arch == "olmoe" else False
    )
    return ModelSpec(
        architecture=arch,
        vocab_size=int(_req(cfg, "vocab_size", where)),
        hidden_size=hidden,
        num_blocks=num_blocks,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        num_experts=num_experts,
        top_k=int(_req(cfg, "num_experts_per_tok", where)),
        expert_intermediate_size=ffn,
        shared_expert_intermediate_size=shared,
        norm_topk_prob=norm_topk,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope(cfg, where),
        max_position_embeddings=max_pos,
        qk_norm=arch == "olmoe",
        attention_bias=bias,
        o_bias=bias if arch == "olmoe" else False,
        clip_qkv=None if clip is None else float(clip),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_as_id_tuple(cfg.get("eos_token_id")),
        route_weights_fp32=arch == "mixtral",
    )


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def load_spec(path: str | Path) -> ModelSpec:
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: config.json is missing from the checkpoint folder")
    spec = spec_from_config(read_json(cfg_path), str(cfg_path))
    # generation_config.json's eos list (e.g. chat models) wins over config.json's.
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        gen = read_json(gen_path)
        eos = _as_id_tuple(gen.get("eos_token_id"))
        if eos:
            from dataclasses import replace

            spec = replace(spec, eos_token_ids=eos)
    return spec
