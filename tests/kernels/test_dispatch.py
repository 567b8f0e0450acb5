"""Dispatcher, shape checks, tuning tables, bench on CPU, and the interpreter suite launcher."""

import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

import amoe_kernels as K
from amoe_kernels import dispatch, tuning

ROOT = Path(__file__).resolve().parents[2]
g = torch.Generator().manual_seed(0)


def rnd(*shape):
    return torch.randn(*shape, generator=g)


@pytest.mark.slow  # over ~3 s here: left out of scripts/test.sh --fast
def test_interpreter_suite():
    """Run test_interpreter.py in a fresh process with TRITON_INTERPRET=1 (it must be set before
    triton is imported, which this process may already have done)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("already interpreting: test_interpreter.py runs directly in this session")
    env = dict(os.environ, TRITON_INTERPRET="1")
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels/test_interpreter.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    out = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, f"interpreter suite failed ({time.monotonic() - t0:.0f}s):\n{out}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], out


def test_backend_selection(monkeypatch):
    x = rnd(2, 3)
    monkeypatch.delenv("AMOE_KERNELS_BACKEND", raising=False)
    assert K.backend_for(x) == "reference"  # CPU tensors: always the reference
    assert K.backend_for(x, "reference") == "reference"
    with pytest.raises(ValueError, match="backend"):
        K.backend_for(x, "cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET|triton"):
            K.backend_for(x, "triton")
    monkeypatch.setenv("AMOE_KERNELS_BACKEND", "reference")
    assert K.backend_for(x) == "reference"


def test_cuda_tensors_pick_triton_when_it_imports(monkeypatch):
    class FakeCuda:
        is_cuda = True
        device = torch.device("cuda", 0)
        dtype = torch.float16

    monkeypatch.delenv("AMOE_KERNELS_BACKEND", raising=False)
    want = "triton" if dispatch.triton_available() else "reference"
    assert K.backend_for(FakeCuda()) == want
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert K.backend_for(FakeCuda()) == "reference"


def test_paged_reference_bit_identical_to_model_attention():
    """The reference decode path must give the exact bits of the per-segment loop it replaced
    (gather + causal_gqa_attention); fp32 on CPU runs the native kernel unless the reference is
    named (tests/kernels/test_native.py compares the two)."""
    from amoe_serve.model.attention import causal_gqa_attention

    for dtype in (torch.float32, torch.bfloat16):
        N, S, G, d, H = 9, 4, 2, 8, 6
        kc, vc = rnd(N, S, G, d).to(dtype), rnd(N, S, G, d).to(dtype)
        tables = [[4, 2, 7], [0], [8, 1, 3, 5, 6]]
        lens = [11, 1, 17]
        q = rnd(3, H, d).to(dtype)
        got = K.paged_decode_attention(q, kc, vc, tables, lens, d**-0.5, backend="reference")
        for b, (tbl, L) in enumerate(zip(tables, lens)):
            pos = torch.arange(L)
            slots = torch.tensor(tbl)[pos // S] * S + pos % S
            want = causal_gqa_attention(q[b : b + 1], kc.view(-1, G, d)[slots], vc.view(-1, G, d)[slots], L - 1, d**-0.5)
            assert torch.equal(got[b : b + 1], want)
        # tensor tables / lengths take the same reference path
        bt = torch.tensor([t + [0] * (5 - len(t)) for t in tables])
        assert torch.equal(K.paged_decode_attention(q, kc, vc, bt, torch.tensor(lens), d**-0.5, backend="reference"), got)


def test_sigmoid_scoring_and_route_reference():
    logits = rnd(7, 5)
    w, ids = K.topk_gating(logits, 2, False, scoring="sigmoid")
    p = torch.sigmoid(logits)
    assert torch.equal(ids, p.topk(2).indices) and torch.equal(w, p.topk(2).values)
    w2, ids2, order, counts = K.route(logits, 2, True)
    wr, idsr = K.topk_gating(logits, 2, True)
    assert torch.equal(w2, wr) and torch.equal(ids2, idsr)
    o, c = K.permute(idsr, 5)
    assert torch.equal(order, o) and torch.equal(counts, c)
    x = rnd(7, 3)
    assert torch.equal(K.permute_tokens(x, order, 2), x[order // 2])


def test_new_ops_raise_clear_errors():
    q, kc = rnd(2, 4, 8), rnd(5, 4, 2, 8)
    with pytest.raises(ValueError, match="paged_decode_attention: q_BHd must have 3 dims"):
        K.paged_decode_attention(q[0], kc, kc, [[0], [1]], [1, 1], 1.0)
    with pytest.raises(ValueError, match="not a multiple"):
        K.paged_decode_attention(rnd(2, 3, 8), kc, kc, [[0], [1]], [1, 1], 1.0)
    with pytest.raises(ValueError, match="head dim"):
        K.paged_decode_attention(rnd(2, 4, 6), rnd(5, 4, 2, 6)[..., :5].contiguous(), rnd(5, 4, 2, 5), [[0], [1]], [1, 1], 1.0)
    with pytest.raises(ValueError, match="block ids"):
        K.paged_decode_attention(q, kc, kc, [[0], [9]], [1, 1], 1.0)
    with pytest.raises(ValueError, match=r"seq_lens\[1\]=5"):
        K.paged_decode_attention(q, kc, kc, [[0], [1]], [1, 5], 1.0)
    with pytest.raises(ValueError, match="seq_lens"):
        K.paged_decode_attention(q, kc, kc, [[0], [1]], [1, 0], 1.0)
    with pytest.raises(ValueError, match="dtypes differ"):
        K.paged_decode_attention(q, kc, kc.half(), [[0], [1]], [1, 1], 1.0)
    with pytest.raises(ValueError, match="block_tables must be int32/int64"):
        K.paged_decode_attention(q, kc, kc, torch.zeros(2, 1), torch.ones(2, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="scoring"):
        K.topk_gating(rnd(3, 6), 2, True, scoring="tanh")
    with pytest.raises(ValueError, match="num_experts=4"):
        K.route(rnd(3, 6), 2, True, 4)
    with pytest.raises(ValueError, match="permute_tokens"):
        K.permute_tokens(rnd(3, 4), torch.arange(5), 2)


def test_tuning_tables_are_data():
    cfg_dir = ROOT / "amoe_kernels" / "configs"
    ops = {"grouped_expert_ffn", "topk_gating", "route", "permute", "permute_tokens", "unpermute_combine",
           "paged_decode_attention"}
    for f in cfg_dir.glob("*.json"):
        assert ops <= set(json.loads(f.read_text())) | set(json.loads((cfg_dir / "default.json").read_text())), f
    cpu = torch.device("cpu")
    assert tuning.device_key(cpu) == "interpreter"
    assert tuning.config("grouped_expert_ffn", cpu, m=3)["BLOCK_M"] == 16
    assert tuning.table("some_unknown_gpu")["route"] == json.loads((cfg_dir / "default.json").read_text())["route"]
    rows = tuning.table("default")["grouped_expert_ffn"]
    assert rows[-1]["max_m"] is None and all("BLOCK_M" in r for r in rows)
    # Every kernel source and header ships with the package (they are built where it runs).
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["amoe_kernels"]
    shipped = ROOT / "amoe_kernels"
    for f in list(cfg_dir.glob("*.json")) + list((shipped / "csrc").iterdir()):
        assert any(f.relative_to(shipped).match(g) for g in globs), f


@pytest.mark.slow  # over ~3 s here: left out of scripts/test.sh --fast
def test_bench_without_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "amoe_kernels.bench"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "no GPU present" in proc.stdout, proc.stdout + proc.stderr


def test_grouped_expert_ffn_experts_argument_checked():
    w1, w2 = rnd(3, 5, 4), rnd(3, 4, 5)
    with pytest.raises(ValueError, match="must index"):
        K.grouped_expert_ffn(rnd(2, 4), [1, 1], w1, w1, w2, experts=[0, 3])
    with pytest.raises(ValueError, match="2 counts for 1 experts"):
        K.grouped_expert_ffn(rnd(2, 4), [1, 1], w1, w1, w2, experts=[0])
    x = rnd(3, 4)
    assert torch.equal(K.grouped_expert_ffn(x, [1, 2], w1, w1, w2, experts=[2, 0]),
                       K.grouped_expert_ffn(x, [1, 0, 2], w1[[2, 1, 0]], w1[[2, 1, 0]], w2[[2, 1, 0]]))
