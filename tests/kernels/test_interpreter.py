"""Every Triton kernel under TRITON_INTERPRET=1 on CPU tensors (fp32, fp16) against its reference.

The interpreter must be chosen before triton is imported, so this module only runs in a process
started with TRITON_INTERPRET=1; in the normal suite, test_dispatch.py::test_interpreter_suite
starts that process (the module is skipped here otherwise). Direct run:
    TRITON_INTERPRET=1 pytest tests/kernels/test_interpreter.py
Shapes are small (CI time) but cover empty experts, one token, sizes that are not multiples of
the tiles, split and unsplit KV and uneven sequence lengths. Each comparison also checks that its
tolerance is far below the error of a plausible bug (see `_distinct`).
"""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs in a TRITON_INTERPRET=1 subprocess (test_dispatch.py::test_interpreter_suite)",
                allow_module_level=True)

import amoe_kernels as K  # noqa: E402
from amoe_kernels import reference as R  # noqa: E402
from amoe_kernels import triton_attention, tuning  # noqa: E402

DTYPES = [torch.float32, torch.float16]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-2, rtol=1e-2)}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rnd(g, *shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def close(got, want, dtype):
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


def _distinct(a, b, dtype):
    """A wrong answer (b) must be far outside the tolerance used against the right one (a)."""
    assert not torch.allclose(a.float(), b.float(), **TOL[dtype])


# ---------------------------------------------------------------- grouped expert FFN

FFN_CASES = [
    # counts per expert: empty experts, one token, tails that are not multiples of BLOCK_M=16
    [3, 0, 17, 1],
    [0, 0, 1, 0],
    [0, 33, 0, 0],
    [16, 16, 5, 0],
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("counts", FFN_CASES, ids=lambda c: "-".join(map(str, c)))
def test_grouped_expert_ffn(dtype, counts):
    g = gen(1)
    G, D, F = len(counts), 40, 36  # D, F not multiples of BLOCK_N/BLOCK_K=32
    T = sum(counts)
    x = rnd(g, T, D, dtype=dtype)
    w1, w3 = rnd(g, G, F, D, scale=D**-0.5, dtype=dtype), rnd(g, G, F, D, scale=D**-0.5, dtype=dtype)
    w2 = rnd(g, G, D, F, scale=F**-0.5, dtype=dtype)
    got = K.grouped_expert_ffn(x, counts, w1, w3, w2, backend="triton")
    want = R.grouped_expert_ffn(x, counts, w1, w3, w2)
    assert got.dtype == dtype and got.shape == (T, D)
    close(got, want, dtype)
    # rows sent to the neighbouring expert would be caught
    shifted = R.grouped_expert_ffn(x, counts, w1.roll(1, 0), w3.roll(1, 0), w2.roll(1, 0))
    _distinct(want, shifted, dtype)


def test_grouped_expert_ffn_empty_and_strided():
    g = gen(2)
    G, D, F = 3, 20, 18
    w1, w3, w2 = rnd(g, G, F, D), rnd(g, G, F, D), rnd(g, G, D, F)
    assert K.grouped_expert_ffn(rnd(g, 0, D), [0, 0, 0], w1, w3, w2, backend="triton").shape == (0, D)
    # non-contiguous activations and weights (views, as the expert side passes)
    xb = rnd(g, 9, 2 * D)[:, ::2]
    w1t = rnd(g, G, D, F).transpose(1, 2)
    got = K.grouped_expert_ffn(xb, [4, 0, 5], w1t, w3, w2, backend="triton")
    close(got, R.grouped_expert_ffn(xb, [4, 0, 5], w1t, w3, w2), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 7])
def test_expert_ffn(dtype, T):
    g = gen(3)
    D, F = 24, 50
    x, w1, w3, w2 = rnd(g, T, D, dtype=dtype), rnd(g, F, D, scale=0.2, dtype=dtype), rnd(g, F, D, scale=0.2, dtype=dtype), rnd(g, D, F, scale=0.2, dtype=dtype)
    close(K.expert_ffn(x, w1, w3, w2, backend="triton"), R.expert_ffn(x, w1, w3, w2), dtype)


# ---------------------------------------------------------------- gating / routing / permute


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("T,E,k,renorm", [(1, 8, 2, True), (13, 6, 2, False), (21, 60, 8, True), (0, 4, 1, True)])
def test_topk_gating_and_route(dtype, scoring, T, E, k, renorm):
    logits = rnd(gen(4), T, E, dtype=dtype)
    wd = None if dtype == torch.float32 else dtype
    w, ids = K.topk_gating(logits, k, renorm, scoring=scoring, weight_dtype=wd, backend="triton")
    w_ref, ids_ref = R.topk_gating(logits, k, renorm, wd, scoring)
    assert ids.dtype == torch.int64 and w.dtype == w_ref.dtype
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w.float(), w_ref.float(), atol=1e-6 if wd is None else 1e-3, rtol=1e-5 if wd is None else 1e-3)
    rw, rids, order, counts = K.route(logits, k, renorm, E, scoring=scoring, weight_dtype=wd, backend="triton")
    _, _, order_ref, counts_ref = R.route(logits, k, renorm, E, wd, scoring)
    assert torch.equal(rids, ids_ref) and torch.equal(rw, w)
    assert torch.equal(order, order_ref) and torch.equal(counts, counts_ref)
    assert counts.shape == (E,) and int(counts.sum()) == T * k


@pytest.mark.parametrize("T,k,E", [(1, 1, 1), (9, 3, 5), (40, 2, 17), (0, 2, 4)])
def test_permute_stable_with_repeats(T, k, E):
    ids = torch.randint(0, E, (T, k), generator=gen(5))  # repeats within a token allowed
    ids[:, 0] = ids[:, -1]
    order, counts = K.permute(ids, E + 2, backend="triton")  # trailing empty experts
    order_ref, counts_ref = R.permute(ids, E + 2)
    assert torch.equal(order, order_ref) and torch.equal(counts, counts_ref)
    order32, _ = K.permute(ids.int(), E + 2, backend="triton")
    assert torch.equal(order32, order_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,k,D", [(1, 1, 8), (11, 2, 40), (6, 4, 33)])
def test_permute_tokens_unpermute_combine(dtype, T, k, D):
    g = gen(6)
    E = 5
    x = rnd(g, T, D, dtype=dtype)
    ids = torch.randint(0, E, (T, k), generator=g)
    order, _ = R.permute(ids, E)
    y = K.permute_tokens(x, order, k, backend="triton")
    assert torch.equal(y, R.permute_tokens(x, order, k))
    out_sorted = rnd(g, T * k, D, dtype=dtype)
    for w in (torch.rand(T, k, generator=g), torch.rand(T, k, generator=g).to(dtype)):  # fp32 and same-dtype weights
        got = K.unpermute_combine(out_sorted, order, w, backend="triton")
        want = R.unpermute_combine(out_sorted, order, w)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=1e-6 if dtype == torch.float32 else 1e-3, rtol=0)
        out_TKD = out_sorted.view(T, k, D)
        torch.testing.assert_close(K.combine_slots(out_TKD, w, backend="triton"), R.combine_slots(out_TKD, w),
                                   atol=1e-6 if dtype == torch.float32 else 1e-3, rtol=0)
        if T * k > 1:
            _distinct(want, R.unpermute_combine(out_sorted, order.roll(1), w), dtype)


# ---------------------------------------------------------------- paged decode attention


def _paged_case(g, lens, S, H, G, d, dtype, extra_blocks=3):
    need = [-(-L // S) for L in lens]
    N = sum(need) + extra_blocks
    perm = torch.randperm(N, generator=g).tolist()  # non-contiguous, shuffled blocks
    tables, at = [], 0
    for n in need:
        tables.append(perm[at : at + n + (1 if n % 2 else 0)])  # some tables longer than needed
        at += n
    kc, vc = rnd(g, N, S, G, d, dtype=dtype), rnd(g, N, S, G, d, dtype=dtype)
    q = rnd(g, len(lens), H, d, dtype=dtype)
    return q, kc, vc, tables


ATTN_CASES = [
    # lens (uneven, 1, non-multiples of S and BLOCK_N=16), S, H, G, d
    ([1], 4, 4, 4, 16),  # MHA, one token
    ([10, 1, 29], 4, 4, 2, 16),  # GQA
    ([37, 5, 16, 3], 16, 8, 1, 24),  # MQA, d not a power of two
    ([70, 2], 5, 6, 2, 32),  # block size 5, rep 3
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens,S,H,G,d", ATTN_CASES)
def test_paged_decode_attention(dtype, lens, S, H, G, d):
    g = gen(7)
    q, kc, vc, tables = _paged_case(g, lens, S, H, G, d, dtype)
    scale = d**-0.5
    want = R.paged_decode_attention(q.float(), kc.float(), vc.float(), tables, lens, scale)
    got = K.paged_decode_attention(q, kc, vc, tables, lens, scale, backend="triton")  # auto splits
    assert got.shape == (len(lens), H * d) and got.dtype == dtype
    close(got, want, dtype)
    # explicit split counts through the launcher with padded tensor tables
    M = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (M - len(t)) for t in tables], dtype=torch.int32)
    lens_t = torch.tensor(lens, dtype=torch.int64)
    base = tuning.config("paged_decode_attention", q.device)
    for splits in (1, 3):
        cfg = dict(base, target_programs=splits * 10**6, max_splits=splits, min_tokens_per_split=1)
        out = triton_attention.paged_decode_attention(q, kc, vc, bt, lens_t, scale, cfg=cfg)
        close(out, want, dtype)
    # one position too few would be caught
    if max(lens) > 1:
        short = [max(1, L - 1) for L in lens]
        _distinct(want, R.paged_decode_attention(q.float(), kc.float(), vc.float(), tables, short, scale), dtype)


def test_bench_interpret_smoke():
    from amoe_kernels import bench

    assert bench.main(["--interpret-smoke", "--op", "permute", "--op", "unpermute_combine"]) == 0


def test_bf16_is_refused_under_the_interpreter():
    x = torch.zeros(2, 4, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="bfloat16"):
        K.permute_tokens(x, torch.arange(2), 1, backend="triton")


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_expert_ffn_subset_of_stack(dtype):
    """experts=[...] picks rows of a larger stacked weight tensor (the expert side's layout)."""
    g = gen(8)
    E, D, F = 6, 24, 20
    w1, w3, w2 = rnd(g, E, F, D, scale=0.2, dtype=dtype), rnd(g, E, F, D, scale=0.2, dtype=dtype), rnd(g, E, D, F, scale=0.2, dtype=dtype)
    experts, counts = [5, 1, 3], [2, 0, 19]
    x = rnd(g, sum(counts), D, dtype=dtype)
    got = K.grouped_expert_ffn(x, counts, w1, w3, w2, experts=experts, backend="triton")
    want = R.grouped_expert_ffn(x, counts, w1[experts], w3[experts], w2[experts])
    close(got, want, dtype)
    assert torch.equal(R.grouped_expert_ffn(x, counts, w1, w3, w2, experts), want)
