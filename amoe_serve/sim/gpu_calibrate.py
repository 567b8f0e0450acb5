"""Calibrate a GPU device table (`scripts/gpu-calibrate.sh`): time the ranks' own code at the real
Mixtral-8x7B layer size on one GPU and write configs/sim/<gpu>-calibrated.yaml.

A random-weight checkpoint of a few Mixtral-8x7B blocks (hidden 4096, FFN 14336, 8 experts, the
paper's MQA: 1 KV head) is written once; `calibrate.measure_engine` then times an expert step per
rows, an attention step per (tokens, context) and the LM head + sampler, synchronizing the GPU
around every call. The table keeps the spec-sheet peaks of the closest built-in table (for the
memory size and links) and replaces the compute model with the measurements, plus op_cv, the
measured spread of repeated operations (the noise model's cv).

    python -m amoe_serve.sim.gpu_calibrate --out configs/sim/h100-calibrated.yaml [--blocks 2]
    python -m amoe_serve.sim.gpu_calibrate --dry-run      # CPU-safe: print the plan and the name
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

from .calibrate import write_table
from .cost import TABLES, DeviceTable
from amoe_serve.sim.calibrate import measure_engine

MIXTRAL_LAYER = {"hidden_size": 4096, "intermediate_size": 14336, "num_local_experts": 8, "num_experts_per_tok": 2,
                 "num_attention_heads": 32, "num_key_value_heads": 1, "head_dim": 128, "vocab_size": 32000,
                 "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 1e6}


def gpu_slug(name: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "h100"; unknown names -> their first lowercase word with digits."""
    low = name.lower()
    m = re.search(r"\b([abhlv]\d{2,3}[a-z]?|gh200|gb200|b200|rtx\s?\d{4})\b", low)
    slug = m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", low).strip("-") or "gpu"
    return slug.replace(" ", "")


def base_table(slug: str) -> DeviceTable:
    """The spec-sheet table the measurements go into (memory, links); A100's when unknown."""
    key = "h100" if slug in ("h100", "h200", "gh200") else "a100" if slug.startswith("a100") else "a100"
    t = DeviceTable(**asdict(TABLES[key]))
    t.name = slug
    if slug == "h200":
        t.memory_bytes, t.mem_bw = 141e9, 4.8e12   # H200 datasheet: 141 GB HBM3e, 4.8 TB/s
    return t


def write_checkpoint(path: Path, blocks: int) -> Path:
    """Random bf16 weights of `blocks` Mixtral-8x7B blocks (once; reused when present)."""
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM
    cfg = MixtralConfig(num_hidden_layers=blocks, torch_dtype="bfloat16", **MIXTRAL_LAYER)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = MixtralForCausalLM(cfg).to(torch.bfloat16)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    return path


def table_from(measured: dict, slug: str) -> DeviceTable:
    t = base_table(slug)
    t.expert_points, t.attention_fit = measured["expert_points"], measured["attention_fit"]
    t.lm_head_fit = measured.get("lm_head_fit", [])
    t.op_cv = measured.get("op_cv", -1.0)
    t.step_overhead_s = 0.0        # measured steps include the host work of the ranks' code
    t.kernel_launch_s = 0.0
    t.source = (f"measured on one {slug} with the ranks' code at the Mixtral-8x7B layer size "
                "(amoe_serve.sim.gpu_calibrate); peaks, memory and links from the spec sheet")
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="table to write (default configs/sim/<gpu>-calibrated.yaml)")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--checkpoint", default="out/gpu-calibrate/mixtral-layers")
    ap.add_argument("--gpu-name", help="override the detected GPU name")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="print what would run and exit")
    a = ap.parse_args(argv)
    name = a.gpu_name
    if name is None:
        try:
            import torch
            name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        except Exception:  # noqa: BLE001 - no torch / no driver: same answer
            name = None
    if name is None and not a.dry_run:
        print("gpu-calibrate: no CUDA GPU visible; nothing measured", file=sys.stderr)
        return 3
    slug = gpu_slug(name or "none")
    out = Path(a.out or f"configs/sim/{slug}-calibrated.yaml")
    plan = {"gpu": name, "slug": slug, "table": str(out), "checkpoint": a.checkpoint, "blocks": a.blocks,
            "layer": MIXTRAL_LAYER}
    if a.dry_run:
        print(json.dumps(plan))
        return 0
    ckpt = write_checkpoint(Path(a.checkpoint), a.blocks)
    measured = measure_engine(str(ckpt), quick=a.quick, device="cuda:0", dtype="bfloat16")
    write_table(table_from(measured, slug), out)
    (out.with_suffix(".samples.json")).write_text(json.dumps(measured, indent=1))
    print(f"gpu-calibrate: wrote {out} (op_cv {measured.get('op_cv', -1):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
