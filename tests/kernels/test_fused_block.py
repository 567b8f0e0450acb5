"""The fused decode block step (csrc/attn_block.c), the native top-k gating and the token pool's
native scatter, each against the calls or the PyTorch reference they stand in for."""

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn

import amoe_kernels as K
from amoe_kernels import native
from amoe_kernels import reference as R

g = torch.Generator().manual_seed(11)

needs_fused = pytest.mark.skipif(not native.available(),
                                 reason=f"fused block: {native.unavailable_reason()}")


def rnd(*shape, scale=1.0):
    return scale * torch.randn(*shape, generator=g)


@pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")
@pytest.mark.parametrize("T,E,k,renorm", [(1, 8, 2, True), (37, 8, 2, True), (16, 64, 6, False), (5, 60, 4, True),
                                          (9, 4, 1, False)])
def test_native_topk_gating_matches_reference(T, E, k, renorm):
    logits = rnd(T, E, scale=3.0)
    w_ref, ids_ref = R.topk_gating(logits, k, renorm)
    w, ids = K.topk_gating(logits, k, renorm)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, rtol=2e-6, atol=1e-7)  # exp's last bit and the sum's order
    w_named, _ = K.topk_gating(logits, k, renorm, backend="reference")
    assert torch.equal(w_named, w_ref)


def _block_case(T, D, H, G, d, E, bs=16, max_len=70):
    """A layer's weights, a paged cache with T decode sequences already holding context, and the
    step's RoPE tables."""
    Q = (H + 2 * G) * d
    w = dict(ln1=1 + 0.1 * rnd(D), qkv=rnd(Q, D, scale=D**-0.5), o=rnd(D, H * d, scale=(H * d)**-0.5),
             ln2=1 + 0.1 * rnd(D), gate=rnd(E, D, scale=D**-0.5))
    M = (max_len + bs - 1) // bs
    N = T * M + 2
    kc, vc = rnd(N * bs, G, d), rnd(N * bs, G, d)
    tables = torch.randperm(N, generator=g)[:T * M].view(T, M).contiguous()
    lens = torch.randint(1, max_len + 1, (T,), generator=g)
    pos = lens - 1
    slots = (tables.gather(1, (pos // bs)[:, None])[:, 0] * bs + pos % bs).contiguous()
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    ang = pos[:, None].float() * inv[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], 1).contiguous()
    sin = torch.cat([-ang.sin(), ang.sin()], 1).contiguous()  # rope_tables' signed layout
    return w, kc, vc, tables, lens, slots, cos, sin


def _unfused(x, w, kc, vc, tables, lens, slots, cos, sin, H, G, d, bs, k, renorm, key_E, X, seg, route=None):
    """The same block as the attention side runs it call by call."""
    T, D = x.shape
    a = K.rms_norm(x, w["ln1"], 1e-5)
    qkv = K.linear(a, w["qkv"])
    q = K.rope_kv_write(qkv, cos, sin, H, G, slots, kc, vc)
    o = K.paged_attention(q[:, None], kc.view(-1, bs, G, d), vc.view(-1, bs, G, d), tables, (lens - 1)[:, None],
                          d**-0.5)[:, 0]
    h = x + K.linear(o, w["o"])
    y = K.rms_norm(h, w["ln2"], 1e-5)
    if route is None:
        w_TK, ids_TK = K.topk_gating(K.linear(y, w["gate"]), k, renorm)
    else:
        ids_TK, w_TK = route
    meta, y_RD, counts = K.dispatch_rows(y, key_E[ids_TK.reshape(-1)], k, seg, X)
    return h, y, w_TK, ids_TK, meta, y_RD, counts


@needs_fused
@pytest.mark.parametrize("T,D,H,G,d,E,k,renorm", [
    (32, 128, 4, 1, 32, 8, 2, True),     # the overhead bench's MQA shape
    (1, 64, 4, 2, 16, 8, 2, True),       # one sequence, GQA
    (45, 256, 8, 8, 32, 16, 1, False),   # MHA, top-1, more rows than a GEMM block
    (6, 128, 8, 2, 64, 60, 4, False),    # many experts, no renormalisation
])
@pytest.mark.parametrize("given_route", [False, True])
def test_fused_decode_block_is_the_unfused_calls_bit_for_bit(T, D, H, G, d, E, k, renorm, given_route):
    w, kc, vc, tables, lens, slots, cos, sin = _block_case(T, D, H, G, d, E)
    x = rnd(T, D)
    ranks = 3
    key_E = (torch.randint(0, ranks, (E,), generator=g) * E + torch.arange(E)).contiguous()
    route = None
    if given_route:
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        route = (ids, torch.full((T, k), 1.0 / k))
    kc2, vc2 = kc.clone(), vc.clone()
    want = _unfused(x, w, kc, vc, tables, lens, slots, cos, sin, H, G, d, 16, k, renorm, key_E, ranks * E, 5, route)
    got = K.attn_decode_block(x, w["ln1"], w["qkv"], w["o"], w["ln2"], w["gate"], 1e-5, H, G, d, cos, sin, slots,
                              kc2, vc2, tables, lens, 16, d**-0.5, k, renorm, key_E, ranks * E, 5, route)
    assert got is not None
    for name, a, b in zip(["h", "y", "w", "ids", "meta", "y_RD", "counts"], got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert torch.equal(kc2, kc) and torch.equal(vc2, vc)  # the new K/V written to the same slots


@needs_fused
def test_fused_decode_block_rejects_what_it_cannot_run_and_bad_indices():
    T, D, H, G, d, E = 4, 64, 4, 1, 16, 8
    w, kc, vc, tables, lens, slots, cos, sin = _block_case(T, D, H, G, d, E)
    key_E = torch.arange(E)
    x = rnd(T, D)

    def call(**kw):
        a = dict(x=x, slots=slots, tables=tables, lens=lens, key_E=key_E, backend=None)
        a.update(kw)
        return K.attn_decode_block(a["x"], w["ln1"], w["qkv"], w["o"], w["ln2"], w["gate"], 1e-5, H, G, d, cos, sin,
                                   a["slots"], kc, vc, a["tables"], a["lens"], 16, 0.25, 2, True, a["key_E"], E, 0,
                                   backend=a["backend"])
    assert call() is not None
    assert call(backend="reference") is None            # the reference named: the caller's calls
    assert call(x=x.double()) is None                    # other dtypes
    assert call(slots=slots.int()) is None               # int32 indices
    assert call(x=rnd(T, 2 * D)[:, :D]) is None          # strided rows
    assert call(x=rnd(T, D + 8)) is None                 # rows that do not match the weights
    assert call(tables=tables[:-1]) is None              # a table per sequence
    with pytest.raises(ValueError, match="outside the cache"):
        call(slots=torch.full((T,), kc.shape[0], dtype=torch.int64))
    with pytest.raises(ValueError, match="outside the cache"):
        call(lens=lens + 10_000)
    with pytest.raises(ValueError, match="key outside"):
        call(key_E=torch.full((E,), E, dtype=torch.int64))


@needs_fused
def test_pre_and_post_around_the_attention_are_the_block():
    """attn_pre, the decode attention and attn_post give attn_decode_block's outputs; both parts
    decline caches or weights of the wrong shape instead of reading past them."""
    T, D, H, G, d, E = 9, 64, 4, 2, 16, 8
    w, kc, vc, tables, lens, slots, cos, sin = _block_case(T, D, H, G, d, E)
    x, key_E = rnd(T, D), torch.arange(E)
    kc2, vc2 = kc.clone(), vc.clone()
    whole = K.attn_decode_block(x, w["ln1"], w["qkv"], w["o"], w["ln2"], w["gate"], 1e-5, H, G, d, cos, sin, slots,
                                kc, vc, tables, lens, 16, d**-0.5, 2, True, key_E, E, 3)
    q = K.attn_pre(x, w["ln1"], w["qkv"], 1e-5, H, G, d, cos, sin, slots, kc2, vc2)
    o = K.paged_decode_attention(q, kc2.view(-1, 16, G, d), vc2.view(-1, 16, G, d), tables, lens, d**-0.5)
    parts = K.attn_post(x, o, w["o"], w["ln2"], w["gate"], 1e-5, 2, True, key_E, E, 3)
    for a, b in zip(whole, parts):
        assert torch.equal(a, b)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    assert K.attn_pre(x, w["ln1"], w["qkv"], 1e-5, H, G, d, cos, sin, slots, kc2[:, :1], vc2[:, :1]) is None
    assert K.attn_pre(x, w["ln1"][:-1], w["qkv"], 1e-5, H, G, d, cos, sin, slots, kc2, vc2) is None
    assert K.attn_post(x, o, w["o"][:, :-1], w["ln2"], w["gate"], 1e-5, 2, True, key_E, E, 3) is None
    assert K.attn_post(x, o, w["o"], w["ln2"], w["gate"], 1e-5, 2, True, key_E[:-1], E, 3) is None


@pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")
@pytest.mark.parametrize("T,D,O", [(1, 64, 8), (7, 128, 190), (33, 96, 64), (64, 256, 1003), (5, 1024, 4)])
def test_native_linear_matches_f_linear_and_keeps_row_bits(T, D, O):
    """csrc/linear.c against F.linear (fp32 rounding apart), outputs past the last multiple of 4
    included; a row alone, or in another batch, has the bits it has here."""
    x, w = rnd(T, D), rnd(O, D)
    got = native.linear(x, w)
    torch.testing.assert_close(got, Fn.linear(x, w), rtol=1e-5, atol=1e-4)
    for r in {0, T // 2, T - 1}:
        assert torch.equal(native.linear(x[r:r + 1], w), got[r:r + 1])
    assert torch.equal(native.linear(torch.cat([x, x[:3]]), w)[:T], got)


def test_linear_dispatch_takes_native_for_fp32_cpu_only(monkeypatch):
    calls = []
    real = native.linear
    monkeypatch.setattr(native, "linear", lambda x, w: calls.append(tuple(x.shape)) or real(x, w))
    x, w, b = rnd(3, 16), rnd(5, 16), rnd(5)
    want = Fn.linear(x, w, b)
    torch.testing.assert_close(K.linear(x, w, b), want, rtol=1e-5, atol=1e-5)  # native + bias (if built)
    assert torch.equal(K.linear(x, w, b, backend="reference"), want)
    K.linear(rnd(3, 12), rnd(5, 12))  # D not a multiple of 8
    K.linear(x.double(), w.double())
    K.linear(x.view(1, 3, 16), w)  # not 2-D
    xt = rnd(16, 3).t()  # strided: made contiguous, the same bits as a contiguous copy
    assert torch.equal(K.linear(xt, w), K.linear(xt.contiguous(), w))
    assert calls == ([(3, 16)] * 3 if native.available() else [])


@pytest.mark.parametrize("backend", [None, "reference"])
def test_pool_scatter_writes_marks_and_rejects_like_the_reference(backend):
    T, Kk, D = 5, 2, 8
    dst = torch.zeros(T, Kk, D)
    done = np.zeros(T * Kk, dtype=bool)
    meta = torch.tensor([[0, 3, 1], [0, 0, 0], [0, 4, 1]], dtype=torch.int32)
    out = rnd(3, D)
    assert K.pool_scatter(meta[:, 1], meta[:, 2], done, out, dst, backend=backend) == 3
    assert torch.equal(dst[3, 1], out[0]) and torch.equal(dst[0, 0], out[1]) and torch.equal(dst[4, 1], out[2])
    assert done.nonzero()[0].tolist() == [0, 7, 9]
    before = (dst.clone(), done.copy())
    bad = [
        ("already delivered", torch.tensor([[0, 1, 0], [0, 3, 1]], dtype=torch.int32)),
        ("twice", torch.tensor([[0, 1, 0], [0, 1, 0]], dtype=torch.int32)),
        ("out of range", torch.tensor([[0, 5, 0]], dtype=torch.int32)),
        ("out of range", torch.tensor([[0, 1, 2]], dtype=torch.int32)),
        ("out of range", torch.tensor([[0, -1, 0]], dtype=torch.int32)),
    ]
    for msg, m in bad:
        with pytest.raises(ValueError, match=msg):
            K.pool_scatter(m[:, 1], m[:, 2], done, rnd(m.shape[0], D), dst, backend=backend)
        assert torch.equal(dst, before[0]) and np.array_equal(done, before[1]), msg
