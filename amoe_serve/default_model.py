"""A small seeded random-weight Mixtral checkpoint with a byte-level tokenizer.

Written directly in Hugging Face format (config.json + model.safetensors in the classic
per-expert naming + tokenizer files) without needing transformers, so the server can
always run without downloading anything. Token ids: 0 <pad>, 1 <s>, 2 </s>, 3 + byte.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

NAME = "default-model-v1"
SEED = 1234
SPECIALS = ("<pad>", "<s>", "</s>")
CONFIG = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "vocab_size": 256 + len(SPECIALS),
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "sliding_window": None,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "dtype": "float32",
    "router_jitter_noise": 0.0,
    "attention_dropout": 0.0,
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte -> printable char map used by the ByteLevel pre-tokenizer/decoder."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers import AddedToken

    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for b, ch in _bytes_to_unicode().items():
        vocab[ch] = len(SPECIALS) + b
    # No merges: every byte is its own token, so any UTF-8 text round-trips.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok.to_str()


def _weights(c: dict, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    D, F, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    H, G, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]

    def lin(out: int, inp: int, gain: float = 1.0) -> torch.Tensor:
        return gain / math.sqrt(inp) * torch.randn(out, inp, generator=gen)

    def norm() -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(D, generator=gen)

    w = {"model.embed_tokens.weight": torch.randn(V, D, generator=gen)}
    for b in range(c["num_hidden_layers"]):
        p = f"model.layers.{b}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "self_attn.q_proj.weight"] = lin(H * d, D)
        w[p + "self_attn.k_proj.weight"] = lin(G * d, D)
        w[p + "self_attn.v_proj.weight"] = lin(G * d, D)
        w[p + "self_attn.o_proj.weight"] = lin(D, H * d)
        w[p + "post_attention_layernorm.weight"] = norm()
        w[p + "block_sparse_moe.gate.weight"] = lin(c["num_local_experts"], D, 3.0)
        for e in range(c["num_local_experts"]):
            q = p + f"block_sparse_moe.experts.{e}."
            w[q + "w1.weight"] = lin(F, D)
            w[q + "w3.weight"] = lin(F, D)
            w[q + "w2.weight"] = lin(D, F)
    w["model.norm.weight"] = norm()
    w["lm_head.weight"] = lin(V, D, 3.0)
    return {k: v.contiguous() for k, v in w.items()}


def write_default_model(out_dir: Path, config: Optional[dict] = None, seed: int = SEED) -> Path:
    """Write all files into out_dir (created if needed); not atomic, see ensure_default_model.
    `config` overrides keys of the default Mixtral config (the bench model is written this way)."""
    cfg = {**CONFIG, **(config or {})}
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(_weights(cfg, seed), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    gen_cfg = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": False}
    (out_dir / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
    (out_dir / "tokenizer.json").write_text(_tokenizer_json())
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "model_max_length": cfg["max_position_embeddings"],
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    return out_dir


def default_cache_root() -> Path:
    env = os.environ.get("AMOE_SERVE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "amoe-serve"


def ensure_default_model(cache_dir: Optional[Path] = None) -> Path:
    """Path of the default model under cache_dir (default $AMOE_SERVE_CACHE or ~/.cache/amoe-serve),
    writing it once: files go to a temp folder that is then renamed into place."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    final = root / NAME
    if (final / "config.json").is_file() and (final / "model.safetensors").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=root))
    try:
        write_default_model(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process won the race (final exists now) or a stale partial folder is there.
            if not (final / "model.safetensors").is_file():
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main_make_default(out_dir) -> Path:
    """CLI helper (`amoe-serve make-default-model OUT`): write the default model into out_dir."""
    return write_default_model(Path(out_dir))
