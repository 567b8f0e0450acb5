"""Small seeded random Hugging Face MoE checkpoints for tests (needs transformers).

make_checkpoint("mixtral" | "qwen2_moe" | "olmoe", out_dir) -> out_dir with config.json + safetensors.
Odd sizes on purpose (hidden 96, 3 blocks, 6 experts, top-2, vocab 300, head_dim 24, 2 kv heads).
Weights are re-drawn with ~1/sqrt(fan_in) scale so logits and routing have clear margins.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

ARCHS = ("mixtral", "qwen2_moe", "olmoe")

_COMMON = dict(
    vocab_size=300,
    hidden_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def build_config(arch: str, **overrides):
    import transformers as tf

    if arch == "mixtral":
        cfg = dict(_COMMON, num_local_experts=6, intermediate_size=80, rope_theta=10000.0)
        cls = tf.MixtralConfig
    elif arch == "qwen2_moe":
        cfg = dict(_COMMON, num_experts=6, moe_intermediate_size=80, intermediate_size=112,
                   shared_expert_intermediate_size=64, norm_topk_prob=True, qkv_bias=True)
        cls = tf.Qwen2MoeConfig
    elif arch == "olmoe":
        cfg = dict(_COMMON, num_experts=6, intermediate_size=80, norm_topk_prob=False)
        cls = tf.OlmoeConfig
    else:
        raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")
    cfg.update(overrides)
    return cls(**cfg)


def build_model(arch: str, seed: int = 0, **overrides):
    import transformers as tf

    config = build_config(arch, **overrides)
    cls = {"mixtral": tf.MixtralForCausalLM, "qwen2_moe": tf.Qwen2MoeForCausalLM, "olmoe": tf.OlmoeForCausalLM}[arch]
    torch.manual_seed(seed)
    model = cls(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                gain = 3.0 if ("lm_head" in name or name.endswith("gate.weight")) else 1.0
                p.copy_(gain / math.sqrt(p.shape[-1]) * torch.randn(p.shape, generator=gen))
    model.eval()
    return model


def make_checkpoint(arch: str, out_dir: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                    max_shard_size=None, **overrides) -> Path:
    model = build_model(arch, seed, **overrides).to(dtype)
    out_dir = Path(out_dir)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, **kwargs)
    return out_dir


def load_hf(path: Path, dtype: torch.dtype = torch.float32):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    model.eval()
    return model


def write_fused_experts(src: Path, out: Path, moe: str = "mlp") -> Path:
    """A copy of checkpoint src in the transformers-v5 fused expert layout: per block
    `model.layers.{b}.{moe}.experts.gate_up_proj` [E, 2F, D] and `.down_proj` [E, D, F]."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from amoe_serve.model.checkpoint import load_weights
    from amoe_serve.model.spec import load_spec

    spec = load_spec(src)
    ref = load_weights(src, spec, None, lambda n: True)
    with safe_open(str(src / "model.safetensors"), "pt") as h:
        fused = {k: h.get_tensor(k) for k in h.keys() if ".experts." not in k}
    E = range(spec.num_experts)
    for b in range(spec.num_blocks):
        p, q = f"model.layers.{b}.mlp.experts.", f"model.layers.{b}.{moe}.experts."
        fused[q + "gate_up_proj"] = torch.stack([torch.cat([ref[f"{p}{e}.w1"], ref[f"{p}{e}.w3"]]) for e in E])
        fused[q + "down_proj"] = torch.stack([ref[f"{p}{e}.w2"] for e in E])
    out.mkdir()
    shutil.copy(src / "config.json", out / "config.json")
    save_file(fused, str(out / "model.safetensors"))
    return out
