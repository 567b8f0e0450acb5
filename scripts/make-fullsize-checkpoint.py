#!/usr/bin/env python3
"""Write the OLMoE-1B-7B-shaped checkpoint (random bf16 weights, hub layout) used by the
full-size bench. Same as `amoe-serve make-checkpoint --shape olmoe-1b-7b --output DIR`; other
published shapes: `--shape mixtral-8x7b | qwen1.5-moe-a2.7b` (see --help).

    .venv/bin/python scripts/make-fullsize-checkpoint.py /data/olmoe-1b-7b
"""
import sys

from amoe_serve.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if args and not args[0].startswith("-"):
        args = ["--output", args[0], *args[1:]]
    if "--shape" not in args:
        args = ["--shape", "olmoe-1b-7b", *args]
    sys.exit(main(["make-checkpoint", *args]))
