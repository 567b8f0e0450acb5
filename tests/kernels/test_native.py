"""The native (C) decode attention against the PyTorch reference it stands in for on fp32 CPU
tensors, and the dispatcher's choice between them."""

import subprocess
import sys

import pytest
import torch

import amoe_kernels as K
from amoe_kernels import native
from amoe_kernels import reference as R

g = torch.Generator().manual_seed(3)

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")


def _case(S, H, G, d, bs, max_len, spare=3):
    M = (max_len + bs - 1) // bs
    N = S * M + spare
    kc, vc = torch.randn(N, bs, G, d, generator=g), torch.randn(N, bs, G, d, generator=g)
    tables = torch.randperm(N, generator=g)[:S * M].view(S, M)
    lens = torch.randint(1, max_len + 1, (S,), generator=g)
    lens[0], lens[-1] = max_len, 1  # the longest context and a first token
    q = 3 * torch.randn(S, 1, H, d, generator=g)  # sharp softmaxes, not near-uniform ones
    return q, kc, vc, tables, lens


@needs_native
@pytest.mark.parametrize("S,H,G,d,bs,max_len", [
    (64, 4, 1, 32, 16, 100),   # the overhead bench's MQA shape
    (7, 8, 2, 16, 4, 33),      # GQA, a partial last block
    (5, 4, 4, 64, 16, 7),      # MHA, one block
    (3, 32, 8, 128, 16, 300),  # Mixtral's heads
    (4, 6, 3, 24, 5, 41),      # a head dim without a specialised copy, odd block size
])
def test_native_matches_reference(S, H, G, d, bs, max_len):
    q, kc, vc, tables, lens = _case(S, H, G, d, bs, max_len)
    qpos = (lens - 1)[:, None]
    want = K.paged_attention(q, kc, vc, tables, qpos, d**-0.5, backend="reference")
    got = K.paged_attention(q, kc, vc, tables, qpos, d**-0.5)
    assert got.shape == want.shape == (S, 1, H * d)
    # Only the order of fp32 sums (and exp's last bit) differs.
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # The decode entry point takes the same kernel, with list tables too.
    got2 = K.paged_decode_attention(q[:, 0], kc, vc, tables.tolist(), lens.tolist(), d**-0.5)
    assert torch.equal(got2, got[:, 0])


@needs_native
def test_native_reads_only_the_context():
    """Positions past a sequence's length, and blocks it does not own, may hold anything."""
    q, kc, vc, tables, lens = _case(6, 4, 2, 16, 4, 21)
    want = K.paged_attention(q, kc, vc, tables, (lens - 1)[:, None], 0.25)
    for s in range(6):
        L = int(lens[s])
        blocks = tables[s, (L + 3) // 4:]
        kc[blocks] = float("nan")
        vc[blocks] = float("nan")
        if L % 4:
            kc[tables[s, L // 4], L % 4:] = float("inf")
    got = K.paged_attention(q, kc, vc, tables, (lens - 1)[:, None], 0.25)
    assert torch.equal(got, want)


@needs_native
def test_native_rejects_out_of_range_tables_and_lengths():
    q, kc, vc, tables, lens = _case(2, 4, 1, 16, 4, 8)
    bad = tables.clone()
    bad[1, 0] = kc.shape[0]
    with pytest.raises(ValueError, match="outside the cache"):
        K.paged_decode_attention(q[:, 0], kc, vc, bad, lens, 0.25)
    with pytest.raises(ValueError, match="outside"):
        K.paged_decode_attention(q[:, 0], kc, vc, tables, torch.tensor([9, 1]), 0.25)


def test_reference_named_or_other_dtypes_skip_native():
    q, kc, vc, tables, lens = _case(3, 4, 2, 16, 4, 10)
    assert not native.supports(q.bfloat16(), kc.bfloat16(), vc.bfloat16())
    assert not native.supports(q, kc[:, :2], vc[:, :2])  # a non-contiguous cache view
    # bf16 and the named reference go through the PyTorch path: bit-identical to it.
    qb, kb, vb = q.bfloat16(), kc.bfloat16(), vc.bfloat16()
    qpos = (lens - 1)[:, None]
    assert torch.equal(K.paged_attention(qb, kb, vb, tables, qpos, 0.25),
                       R.paged_attention(qb, kb, vb, tables, qpos, 0.25))
    assert torch.equal(K.paged_attention(q, kc, vc, tables, qpos, 0.25, backend="reference"),
                       R.paged_attention(q, kc, vc, tables, qpos, 0.25))


def test_native_off_by_environment(tmp_path):
    """AMOE_NATIVE=0: nothing is built, the reason is given, and the reference runs."""
    code = ("from amoe_kernels import native; import sys; "
            "print(native.available(), native.unavailable_reason()); sys.exit(0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={"AMOE_NATIVE": "0", "AMOE_NATIVE_CACHE": str(tmp_path), "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False AMOE_NATIVE=0"
    assert not any(tmp_path.iterdir())


def test_native_builds_into_its_cache(tmp_path):
    """A fresh cache folder gets one library (keyed by source, flags and CPU); no compiler on
    PATH means the reference, with the reason."""
    import os
    import shutil
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler here")
    code = "from amoe_kernels import native; print(native.available(), native.unavailable_reason())"
    env = {**os.environ, "AMOE_NATIVE_CACHE": str(tmp_path / "c")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.stdout.strip() == "True None", out.stderr
    assert [p.suffix for p in (tmp_path / "c").iterdir() if not p.name.startswith(".")] == [".so"]
    env = {**env, "AMOE_NATIVE_CACHE": str(tmp_path / "d"), "PATH": "", "CC": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.stdout.strip().startswith("False no C compiler"), out.stdout + out.stderr


@needs_native
@pytest.mark.parametrize("T,D", [(1, 128), (64, 128), (13, 2048), (5, 24)])
def test_native_rms_norm_matches_reference(T, D):
    x, w = torch.randn(T, D, generator=g), torch.randn(D, generator=g)
    got = K.rms_norm(x, w, 1e-5)
    torch.testing.assert_close(got, R.rms_norm(x, w, 1e-5), atol=1e-6, rtol=1e-6)
    assert torch.equal(K.rms_norm(x, w, 1e-5, backend="reference"), R.rms_norm(x, w, 1e-5))
    # bf16 rows, and a strided view, take the reference
    xb = x.bfloat16()
    assert torch.equal(K.rms_norm(xb, w.bfloat16(), 1e-5), R.rms_norm(xb, w.bfloat16(), 1e-5))
    xs = torch.randn(T, 2 * D, generator=g)[:, ::2]
    assert torch.equal(K.rms_norm(xs, w, 1e-5), R.rms_norm(xs, w, 1e-5))


@needs_native
@pytest.mark.parametrize("T,K_,D", [(64, 2, 128), (3, 8, 2048), (1, 1, 16), (7, 6, 24)])
def test_native_moe_combine_is_bit_identical(T, K_, D):
    h, out = torch.randn(T, D, generator=g), torch.randn(T, K_, D, generator=g)
    w = torch.rand(T, K_, generator=g)
    assert torch.equal(K.moe_combine(h, out, w), R.moe_combine(h, out, w))
    s = torch.randn(T, D, generator=g)  # a shared expert's output: the reference adds it
    assert torch.equal(K.moe_combine(h, out, w, s), R.moe_combine(h, out, w, s))


def test_rms_norm_and_moe_combine_check_shapes():
    with pytest.raises(ValueError, match="rms_norm"):
        K.rms_norm(torch.zeros(2, 8), torch.zeros(7), 1e-5)
    with pytest.raises(ValueError, match="moe_combine"):
        K.moe_combine(torch.zeros(3, 8), torch.zeros(2, 1, 8), torch.zeros(2, 1))


@needs_native
@pytest.mark.parametrize("T,k,X,dtype", [(64, 2, 16, torch.float32), (7, 8, 128, torch.bfloat16), (1, 1, 3, torch.float32),
                                         (33, 6, 5, torch.float16)])
def test_native_dispatch_rows_is_the_reference_exactly(T, k, X, dtype):
    """A stable sort by key (many ties), labels and the copied rows: the same bytes."""
    y = torch.randn(T, 24, generator=g).to(dtype)
    key = torch.randint(0, X, (T * k,), generator=g)
    got = K.dispatch_rows(y, key, k, 7, X)
    want = R.dispatch_rows(y, key, k, 7, X)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
    with pytest.raises(ValueError, match="outside"):
        K.dispatch_rows(y, torch.full((T * k,), X), k, 7, X)
    with pytest.raises(ValueError, match="dispatch_rows"):
        K.dispatch_rows(y, key[:-1], k, 7, X)


@needs_native
@pytest.mark.parametrize("T,H,G,d", [(64, 4, 1, 32), (5, 32, 8, 128), (3, 6, 3, 24), (1, 2, 2, 16)])
def test_native_rope_kv_write_is_the_reference_exactly(T, H, G, d):
    from amoe_serve.model.layers import rope_cos_sin, rope_inv_freq, rope_tables
    qkv = torch.randn(T, (H + 2 * G) * d, generator=g)
    cos, sin = rope_tables(*rope_cos_sin(torch.randint(0, 500, (T,), generator=g), rope_inv_freq(1e6, d), torch.float32))
    cos, sin = cos.view(T, d), sin.view(T, d)
    X = 4 * T + 3
    slots = torch.randperm(X, generator=g)[:T]
    caches = [torch.randn(X, G, d, generator=g) for _ in range(2)]
    k1, v1 = (c.clone() for c in caches)
    k2, v2 = (c.clone() for c in caches)
    q1 = K.rope_kv_write(qkv, cos, sin, H, G, slots, k1, v1)
    q2 = R.rope_kv_write(qkv, cos, sin, H, G, slots, k2, v2)
    assert torch.equal(q1, q2) and torch.equal(k1, k2) and torch.equal(v1, v2)
    assert not torch.equal(k1, caches[0]) and torch.equal(k1[~torch.isin(torch.arange(X), slots)],
                                                          caches[0][~torch.isin(torch.arange(X), slots)])
    with pytest.raises(ValueError, match="outside"):
        K.rope_kv_write(qkv, cos, sin, H, G, torch.full((T,), X), k1, v1)
    with pytest.raises(ValueError, match="rope_kv_write"):
        K.rope_kv_write(qkv[:, 1:], cos, sin, H, G, slots, k1, v1)
    # a bf16 cache under fp32 compute takes the reference (it casts on the write)
    kb, vb = (c.bfloat16() for c in caches)
    kr, vr = (c.bfloat16() for c in caches)
    assert torch.equal(K.rope_kv_write(qkv, cos, sin, H, G, slots, kb, vb), R.rope_kv_write(qkv, cos, sin, H, G, slots, kr, vr))
    assert torch.equal(kb, kr) and torch.equal(vb, vr)


def _experts(E, D, F, seed=3):
    g = torch.Generator().manual_seed(seed)
    w1, w3 = (torch.randn(E, F, D, generator=g) * D ** -0.5 for _ in range(2))
    w2 = torch.randn(E, D, F, generator=g) * F ** -0.5
    return g, w1, w3, w2


@needs_native
@pytest.mark.parametrize("D,F,counts,experts", [(128, 256, [3, 0, 5, 1], [0, 1, 2, 3]), (32, 48, [4, 2], [1, 3]),
                                                (16, 8, [1], [2]), (128, 256, [33, 7], [3, 0]), (64, 512, [2, 2, 2], [0, 1, 3])])
def test_native_grouped_swiglu_matches_reference(D, F, counts, experts):
    g, w1, w3, w2 = _experts(4, D, F)
    x = torch.randn(sum(counts), D, generator=g)
    got = native.grouped_swiglu(x, counts, w1, w3, w2, experts)
    want = R.grouped_expert_ffn(x, counts, w1, w3, w2, experts)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_native
def test_native_grouped_swiglu_rows_do_not_depend_on_their_batch():
    """A row's output has the same bits alone, in a pair, in an odd-sized group or beside other
    groups: AEP and lockstep batch the same token differently and must agree exactly."""
    g, w1, w3, w2 = _experts(4, 128, 256)
    x = torch.randn(9, 128, generator=g)
    whole = native.grouped_swiglu(x, [9], w1, w3, w2, [2])
    for i in range(9):
        assert torch.equal(native.grouped_swiglu(x[i:i + 1], [1], w1, w3, w2, [2])[0], whole[i])
    mixed = native.grouped_swiglu(torch.cat([x[:4], x[4:]]), [4, 5], w1, w3, w2, [2, 2])
    assert torch.equal(mixed, whole)


@needs_native
def test_native_grouped_swiglu_rejects_bad_groups():
    _, w1, w3, w2 = _experts(2, 16, 8)
    x = torch.zeros(3, 16)
    for counts, experts in (([2], [0]), ([1, 2], [0, 2]), ([4, -1], [0, 1])):
        with pytest.raises(ValueError, match="grouped_swiglu"):
            native.grouped_swiglu(x, counts, w1, w3, w2, experts)
    with pytest.raises(ValueError, match="multiple of 8"):
        native.grouped_swiglu(torch.zeros(1, 12), [1], torch.zeros(1, 8, 12), torch.zeros(1, 8, 12),
                              torch.zeros(1, 12, 8), [0])


@needs_native
def test_dispatch_sends_fp32_experts_to_native_by_shape_only(monkeypatch):
    calls = []
    real = native.grouped_swiglu
    monkeypatch.setattr(native, "grouped_swiglu", lambda *a: calls.append(a[0].shape) or real(*a))
    g, w1, w3, w2 = _experts(4, 128, 256)
    for rows in (1, 64):  # the same path whatever the rows
        K.grouped_expert_ffn(torch.randn(rows, 128, generator=g), [rows], w1, w3, w2, experts=[1])
    K.grouped_expert_ffn(torch.randn(2, 128, generator=g), [2], w1, w3, w2, experts=[1], backend="reference")
    _, b1, b3, b2 = _experts(1, 256, 512)  # and whatever the size
    K.grouped_expert_ffn(torch.randn(2, 256, generator=g), [2], b1, b3, b2)
    _, c1, c3, c2 = _experts(1, 12, 8)  # D not a multiple of 8: torch's GEMMs
    K.grouped_expert_ffn(torch.randn(2, 12, generator=g), [2], c1, c3, c2)
    assert calls == [(1, 128), (64, 128), (2, 256)]


@needs_native
@pytest.mark.parametrize("D,F,rows", [(1024, 2816, 8), (256, 1024, 70), (64, 4096, 5)])
def test_native_grouped_swiglu_large_experts_match_reference_and_keep_row_bits(D, F, rows):
    # Weight blocks that every row tile passes over (rows_dot.h): more than one block of outputs
    # at these sizes, and rows that fill 3-, 2- and 1-row tiles.
    g, w1, w3, w2 = _experts(2, D, F, seed=11)
    x = torch.randn(rows, D, generator=g)
    got = native.grouped_swiglu(x, [rows - 2, 2], w1, w3, w2, [1, 0])
    want = R.grouped_expert_ffn(x, [rows - 2, 2], w1, w3, w2, [1, 0])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    for r in (0, rows - 3):  # a row alone has the bits it has in the batch
        assert torch.equal(native.grouped_swiglu(x[r:r + 1], [1], w1, w3, w2, [1]), got[r:r + 1])


@needs_native
@pytest.mark.parametrize("D,F,counts,experts", [(128, 256, [3, 0, 5, 1], [0, 1, 2, 3]), (256, 64, [9, 1], [3, 0]),
                                                (16, 8, [2], [1])])
def test_native_grouped_swiglu_bf16_weights_match_fp32_on_widened_weights(D, F, counts, experts):
    g, w1, w3, w2 = _experts(4, D, F, seed=5)
    w1, w3, w2 = w1.bfloat16(), w3.bfloat16(), w2.bfloat16()
    x = torch.randn(sum(counts), D, generator=g)
    got = native.grouped_swiglu(x, counts, w1, w3, w2, experts)
    want = R.grouped_expert_ffn(x, counts, w1.float(), w3.float(), w2.float(), experts)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # and the row of a lone token has the bits it has in the batch
    assert torch.equal(native.grouped_swiglu(x[:1], [1], w1, w3, w2, experts[:1]), got[:1])


@needs_native
def test_dispatch_sends_bf16_experts_to_native_at_every_size(monkeypatch):
    calls = []
    real = native.grouped_swiglu
    monkeypatch.setattr(native, "grouped_swiglu", lambda *a: calls.append(a[2].dtype) or real(*a))
    g, w1, w3, w2 = _experts(2, 256, 512)
    x = torch.randn(3, 256, generator=g)
    K.grouped_expert_ffn(x, [3], w1.bfloat16(), w3.bfloat16(), w2.bfloat16(), experts=[1])
    K.expert_ffn(x, w1[1].bfloat16(), w3[1].bfloat16(), w2[1].bfloat16())
    K.grouped_expert_ffn(x, [3], w1.half(), w3.half(), w2.half(), experts=[1])  # fp16: widened by upcast.py
    K.grouped_expert_ffn(x, [3], w1.bfloat16(), w3.bfloat16(), w2.bfloat16(), experts=[1], backend="reference")
    assert len(calls) == 2 and all(c == torch.bfloat16 for c in calls)
