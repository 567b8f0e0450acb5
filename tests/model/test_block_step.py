"""AttentionSide.block_step (the native block step of the attention rank) against the calls it
stands in for: attention, moe_input, route and dispatch_rows, bit for bit, on an all-decode
batch and on one with prompt spans; None where the model has what the native step lacks."""

import pytest
import torch

import amoe_kernels as K
from amoe_kernels import native
from amoe_serve.kv.cache import PagedKVCache
from amoe_serve.model.attention_side import AttentionSide

pytestmark = pytest.mark.skipif(not native.available(), reason="no native fused block step here")


def _calls(attn, b, x, batch, kv, key_E, X, seg, route=None):
    h = attn.attention(b, x, batch, kv)
    y = attn.moe_input(b, h)
    ids, w = attn.route(b, y) if route is None else route
    meta, y_RD, counts = K.dispatch_rows(y, key_E[ids.reshape(-1)], ids.shape[1], seg, X)
    return h, y, w, ids, meta, y_RD, counts


def _prefilled(attn, spans):
    """Two caches holding the same context: each request's first `start` tokens already run."""
    spec = attn.spec
    kvs = [PagedKVCache(spec, 64, 4, torch.float32) for _ in range(2)]
    tables = [torch.arange(8 * i, 8 * i + 8) for i in range(len(spans))]
    g = torch.Generator().manual_seed(0)
    starts = [s for s, _ in spans if s > 0]
    if starts:
        with_ctx = [(t, s) for t, (s, _) in zip(tables, spans) if s > 0]
        x0 = torch.randn(sum(starts), spec.hidden_size, generator=g)
        for kv in kvs:
            batch = kv.batch([t for t, _ in with_ctx], [0] * len(starts), starts)
            for b in range(spec.num_blocks):
                attn.attention(b, x0, batch, kv)
    return kvs, tables


@pytest.mark.parametrize("spans", [
    [(5, 1), (12, 1), (1, 1)],             # all decode: one native call
    [(5, 1), (0, 6), (12, 1), (3, 4)],     # decode and prompt spans: pre, paged_attention, post
    [(0, 9)],                              # one prompt
])
@pytest.mark.parametrize("route_k", [0, 1, 2])  # 0: the model's router; else a synthetic one's top-k
def test_block_step_is_the_four_calls_bit_for_bit(checkpoints, spans, route_k):
    attn = AttentionSide.load(checkpoints("mixtral"), torch.float32)
    spec = attn.spec
    (kv1, kv2), tables = _prefilled(attn, spans)
    T = sum(n for _, n in spans)
    x = torch.randn(T, spec.hidden_size, generator=torch.Generator().manual_seed(1))
    E, X = spec.num_experts, 2 * spec.num_experts
    key_E = torch.tensor([(e % 2) * E + e for e in range(E)])
    route = None
    if route_k:
        ids = torch.stack([torch.randperm(E, generator=torch.Generator().manual_seed(t))[:route_k] for t in range(T)])
        route = (ids, torch.full((T, route_k), 1.0 / route_k))
    for b in range(spec.num_blocks):
        b1 = kv1.batch(tables, [s for s, _ in spans], [n for _, n in spans])
        b2 = kv2.batch(tables, [s for s, _ in spans], [n for _, n in spans])
        got = attn.block_step(b, x, b1, kv1, key_E, X, 7, route)
        want = _calls(attn, b, x, b2, kv2, key_E, X, 7, route)
        assert got is not None
        for name, u, v in zip(["h", "y", "w", "ids", "meta", "y_RD", "counts"], got, want):
            assert u.dtype == v.dtype and torch.equal(u, v), (b, name)
        assert torch.equal(kv1.k_LNSGd, kv2.k_LNSGd) and torch.equal(kv1.v_LNSGd, kv2.v_LNSGd)
        x = got[0]


@pytest.mark.parametrize("name", ["qwen2_moe", "olmoe", "olmoe_clip_bias"])
def test_block_step_declines_what_it_does_not_cover(checkpoints, name):
    """Biases, q/k norms, clipping: the caller's four calls run instead."""
    attn = AttentionSide.load(checkpoints(name), torch.float32)
    kv = PagedKVCache(attn.spec, 16, 4, torch.float32)
    batch = kv.batch([torch.arange(4)], [0], [3])
    x = torch.randn(3, attn.spec.hidden_size)
    assert attn.block_step(0, x, batch, kv, torch.arange(attn.spec.num_experts), attn.spec.num_experts, 0) is None
