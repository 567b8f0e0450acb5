"""Random-weight checkpoints in published MoE shapes, written one tensor at a time.

Weights cannot be downloaded here, so full-size runs use checkpoints with the exact published
shapes and seeded random values, in the hub's format: config.json (from transformers' own config
class), sharded bf16 safetensors with model.safetensors.index.json, per-expert tensor names, and
a byte-level BPE tokenizer trained on local text to the model's vocabulary.

The writer streams: each tensor is drawn, cast and appended to its shard, then dropped, so peak
memory is one tensor (the embedding, 412 MB in fp32 for OLMoE-1B-7B), never the model.
"""

from __future__ import annotations

import json
import math
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch

_ST_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


@dataclass(frozen=True)
class Shape:
    """A published checkpoint's shape; `config` holds the transformers config arguments."""

    name: str
    arch: str  # "olmoe" | "mixtral" | "qwen2_moe"
    config: dict = field(default_factory=dict)
    note: str = ""


_OLMOE_1B_7B = dict(
    vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
    num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
    max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, norm_topk_prob=False,
    tie_word_embeddings=False, pad_token_id=1, bos_token_id=None, eos_token_id=50279)

SHAPES: dict[str, Shape] = {s.name: s for s in (
    Shape("olmoe-1b-7b", "olmoe", _OLMOE_1B_7B, "allenai/OLMoE-1B-7B-0924: 6.9B parameters, 1.3B active"),
    # The same architecture scaled down (64 experts, top-8, q/k norm, untied head): CI's stand-in.
    Shape("olmoe-tiny", "olmoe", {**_OLMOE_1B_7B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 32,
                                  "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
                                  "max_position_embeddings": 512, "eos_token_id": 511},
          "OLMoE's architecture at test size"),
    Shape("mixtral-8x7b", "mixtral", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2), "mistralai/Mixtral-8x7B-v0.1: 46.7B parameters"),
    Shape("qwen1.5-moe-a2.7b", "qwen2_moe", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=16, num_experts=60, num_experts_per_tok=4, norm_topk_prob=False,
        max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False,
        qkv_bias=True, bos_token_id=151643, eos_token_id=151643), "Qwen/Qwen1.5-MoE-A2.7B: 14.3B parameters"),
)}


def _hf_config(shape: Shape, overrides: dict) -> dict:
    import transformers as tf

    cls = {"olmoe": tf.OlmoeConfig, "mixtral": tf.MixtralConfig, "qwen2_moe": tf.Qwen2MoeConfig}[shape.arch]
    arch = {"olmoe": "OlmoeForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
    cfg = cls(**{**shape.config, **overrides}).to_dict()
    cfg["architectures"] = [arch[shape.arch]]
    return cfg


def tensor_shapes(arch: str, c: dict) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, in the hub's names and order (block by block)."""
    D, V, L = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    H = c["num_attention_heads"]
    G = c.get("num_key_value_heads") or H
    d = c.get("head_dim") or D // H
    yield "model.embed_tokens.weight", (V, D)
    for b in range(L):
        p = f"model.layers.{b}."
        yield p + "input_layernorm.weight", (D,)
        for x, rows in (("q", H * d), ("k", G * d), ("v", G * d)):
            yield p + f"self_attn.{x}_proj.weight", (rows, D)
            if arch == "qwen2_moe":
                yield p + f"self_attn.{x}_proj.bias", (rows,)
        yield p + "self_attn.o_proj.weight", (D, H * d)
        if arch == "olmoe":
            yield p + "self_attn.q_norm.weight", (H * d,)
            yield p + "self_attn.k_norm.weight", (G * d,)
        yield p + "post_attention_layernorm.weight", (D,)
        if arch == "mixtral":
            E, F = c["num_local_experts"], c["intermediate_size"]
            yield p + "block_sparse_moe.gate.weight", (E, D)
            for e in range(E):
                q = p + f"block_sparse_moe.experts.{e}."
                yield q + "w1.weight", (F, D)
                yield q + "w2.weight", (D, F)
                yield q + "w3.weight", (F, D)
            continue
        E = c["num_experts"]
        F = c["moe_intermediate_size"] if arch == "qwen2_moe" else c["intermediate_size"]
        yield p + "mlp.gate.weight", (E, D)
        for e in range(E):
            q = p + f"mlp.experts.{e}."
            yield q + "gate_proj.weight", (F, D)
            yield q + "up_proj.weight", (F, D)
            yield q + "down_proj.weight", (D, F)
        if arch == "qwen2_moe":
            S = c["shared_expert_intermediate_size"]
            yield p + "mlp.shared_expert.gate_proj.weight", (S, D)
            yield p + "mlp.shared_expert.up_proj.weight", (S, D)
            yield p + "mlp.shared_expert.down_proj.weight", (D, S)
            yield p + "mlp.shared_expert_gate.weight", (1, D)
    yield "model.norm.weight", (D,)
    if not c.get("tie_word_embeddings"):
        yield "lm_head.weight", (V, D)


def _draw(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    # Scales as in tests/model/hf_factory.py: unit-ish activations, routers and head with clear
    # margins so greedy tokens and top-k choices are not decided by rounding.
    if name.endswith("norm.weight"):
        return 1.0 + 0.2 * torch.randn(shape, generator=gen)
    if name.endswith("bias"):
        return 0.1 * torch.randn(shape, generator=gen)
    if "embed_tokens" in name:
        return torch.randn(shape, generator=gen)
    gain = 3.0 if ("lm_head" in name or name.endswith("gate.weight")) else 1.0
    return torch.randn(shape, generator=gen).mul_(gain / math.sqrt(shape[-1]))


def _plan_shards(entries: list[tuple[str, tuple[int, ...]]], itemsize: int, shard_bytes: int) -> list[list[int]]:
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape) in enumerate(entries):
        n = math.prod(shape) * itemsize
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


def _write_shard(path: Path, entries: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                 gen: torch.Generator) -> int:
    """One safetensors file, header first, then each tensor as it is drawn."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in entries:
        n = math.prod(shape) * itemsize
        header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # tensors start 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name, shape in entries:
            t = _draw(name, shape, gen).to(dtype).contiguous()
            fh.write(t.view(torch.uint8).numpy().data)
    return off


def _corpus(max_bytes: int) -> Iterator[str]:
    """Local text to train the tokenizer on: the Python standard library's sources, sorted so
    the tokenizer is the same on every machine with the same Python."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for f in sorted(root.rglob("*.py")):
        if "site-packages" in f.parts or "test" in f.parts:
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        total += len(text)
        yield text
        if total >= max_bytes:
            return


def write_tokenizer(out: Path, cfg: dict) -> None:
    """Byte-level BPE over the vocabulary the config declares: regular tokens fill the ids below
    eos; pad and eos sit where the config puts them."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    V, eos, pad = cfg["vocab_size"], cfg["eos_token_id"], cfg.get("pad_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    specials = {eos: "<|endoftext|>"}
    if pad is not None and pad != eos:
        specials[pad] = "<|padding|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Train to eos's id (the hub's OLMoE tokenizer: 50280 tokens in a 50304-row embedding). The
    # trainer numbers its special tokens first, so ids below eos that the config names (pad: 1
    # in OLMoE) are reached by listing them, with reserved fillers, in id order.
    below = [i for i in specials if i < eos]
    first = [specials.get(i, f"<|reserved_{i}|>") for i in range(max(below) + 1)] if below else []
    trainer = trainers.BpeTrainer(vocab_size=eos, special_tokens=first, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(16_000_000 if V > 4096 else 200_000), trainer=trainer)

    if tok.get_vocab_size() < eos:  # a small corpus may not fill the vocabulary (one call: each rebuilds a trie)
        tok.add_tokens([f"<|reserved_{i}|>" for i in range(tok.get_vocab_size(), eos)])
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    got = {name: tok.token_to_id(name) for name in specials.values()}
    if got["<|endoftext|>"] != eos or (pad is not None and pad != eos and got["<|padding|>"] != pad):
        raise RuntimeError(f"tokenizer special ids {got} do not match the config (eos {eos}, pad {pad})")
    tok.save(str(out / "tokenizer.json"))
    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
            "pad_token": "<|padding|>" if pad is not None else None, "add_bos_token": False,
            "model_max_length": cfg["max_position_embeddings"]}
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))


@dataclass
class WriteReport:
    folder: Path
    parameters: int
    bytes: int
    shards: int
    seconds: float
    peak_rss_mb: float

    def line(self) -> str:
        return (f"{self.folder}: {self.parameters / 1e9:.2f}B parameters, {self.bytes / 2**30:.2f} GiB in "
                f"{self.shards} shard(s), {self.seconds:.0f} s, peak RSS {self.peak_rss_mb:.0f} MB")


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_checkpoint(shape: str | Shape, out: str | Path, dtype: torch.dtype = torch.bfloat16,
                     shard_gb: float = 5.0, seed: int = 0, overrides: Optional[dict] = None) -> WriteReport:
    """Write `shape` (a name in SHAPES) into `out`; `overrides` change config keys (e.g. fewer
    blocks). The folder must not hold a checkpoint already."""
    t0 = time.perf_counter()
    s = SHAPES[shape] if isinstance(shape, str) else shape
    out = Path(out)
    if (out / "config.json").exists():
        raise FileExistsError(f"{out} already holds a checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    cfg = _hf_config(s, overrides or {})
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    entries = list(tensor_shapes(s.arch, cfg))
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = _plan_shards(entries, itemsize, int(shard_gb * 2**30))
    gen = torch.Generator().manual_seed(seed)
    total = 0
    weight_map = {}
    for k, idx in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        part = [entries[i] for i in idx]
        total += _write_shard(out / fname, part, dtype, gen)
        weight_map.update({name: fname for name, _ in part})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen_cfg = {"eos_token_id": cfg["eos_token_id"], "pad_token_id": cfg.get("pad_token_id"), "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
    write_tokenizer(out, cfg)
    params = sum(math.prod(shape) for _, shape in entries)
    return WriteReport(out, params, total, len(shards), time.perf_counter() - t0, _peak_rss_mb())
