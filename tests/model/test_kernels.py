"""amoe_kernels reference operators vs naive loops, plus shape checking."""

import pytest
import torch

import amoe_kernels as K

g = torch.Generator().manual_seed(0)


def rnd(*shape):
    return torch.randn(*shape, generator=g)


def naive_ffn(x, w1, w3, w2):
    rows = []
    for t in range(x.shape[0]):
        a = w1 @ x[t]
        u = w3 @ x[t]
        rows.append(w2 @ (a * torch.sigmoid(a) * u))
    return torch.stack(rows) if rows else x.new_zeros(0, w2.shape[0])


def test_expert_ffn_matches_loop():
    x, w1, w3, w2 = rnd(7, 12), rnd(10, 12), rnd(10, 12), rnd(12, 10)
    torch.testing.assert_close(K.expert_ffn(x, w1, w3, w2), naive_ffn(x, w1, w3, w2), atol=1e-5, rtol=1e-5)


def test_grouped_expert_ffn_with_empty_experts():
    G, D, F = 4, 12, 10
    w1, w3, w2 = rnd(G, F, D), rnd(G, F, D), rnd(G, D, F)
    counts = [3, 0, 5, 1]
    x = rnd(sum(counts), D)
    want, s = [], 0
    for gi, n in enumerate(counts):
        want.append(naive_ffn(x[s : s + n], w1[gi], w3[gi], w2[gi]))
        s += n
    torch.testing.assert_close(K.grouped_expert_ffn(x, counts, w1, w3, w2), torch.cat(want), atol=1e-5, rtol=1e-5)
    assert K.grouped_expert_ffn(x[:0], [0] * G, w1, w3, w2).shape == (0, D)


@pytest.mark.parametrize("renorm", [True, False])
def test_topk_gating_matches_loop(renorm):
    logits = rnd(9, 6)
    w, ids = K.topk_gating(logits, 2, renorm)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    for t in range(9):
        p = torch.softmax(logits[t].double(), -1)
        top = sorted(range(6), key=lambda e: -p[e])[:2]
        assert ids[t].tolist() == top
        vals = p[top]
        if renorm:
            vals = vals / vals.sum()
        torch.testing.assert_close(w[t].double(), vals, atol=1e-6, rtol=1e-6)
    w16, _ = K.topk_gating(logits.bfloat16(), 2, renorm, weight_dtype=torch.bfloat16)
    assert w16.dtype == torch.bfloat16


def test_topk_gating_matches_hf_routers():
    tf = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    mcfg = tf.MixtralConfig(hidden_size=8, num_local_experts=6, num_experts_per_tok=2)
    qcfg = tf.Qwen2MoeConfig(hidden_size=8, num_experts=6, num_experts_per_tok=2, norm_topk_prob=False)
    for router, renorm in ((MixtralTopKRouter(mcfg), True), (Qwen2MoeTopKRouter(qcfg), False)):
        with torch.no_grad():
            router.weight.copy_(rnd(6, 8))
        h = rnd(5, 8)
        logits, w_hf, ids_hf = router(h)
        w, ids = K.topk_gating(logits, 2, renorm, backend="reference")
        assert torch.equal(ids, ids_hf) and torch.equal(w, w_hf)
        # fp32 CPU takes the native kernel: the same experts, weights up to exp's last bit.
        w, ids = K.topk_gating(logits.detach(), 2, renorm)
        assert torch.equal(ids, ids_hf)
        torch.testing.assert_close(w, w_hf.detach(), rtol=2e-6, atol=1e-7)


def test_permute_and_unpermute_combine():
    T, Kk, E, D = 6, 2, 5, 3
    ids = torch.randint(0, E, (T, Kk), generator=g)
    order, counts = K.permute(ids, E)
    flat = ids.reshape(-1).tolist()
    assert order.tolist() == sorted(range(T * Kk), key=lambda r: (flat[r], r))  # stable
    assert counts.tolist() == [flat.count(e) for e in range(E)]
    out_TKD = rnd(T, Kk, D)
    w = torch.rand(T, Kk, generator=g)
    sorted_rows = out_TKD.reshape(T * Kk, D)[order]
    got = K.unpermute_combine(sorted_rows, order, w)
    want = torch.stack([sum(w[t, k] * out_TKD[t, k] for k in range(Kk)) for t in range(T)])
    torch.testing.assert_close(got, want)
    assert torch.equal(got, K.combine_slots(out_TKD, w))


def test_bad_shapes_raise_value_error():
    x, w1, w3, w2 = rnd(4, 12), rnd(10, 12), rnd(10, 12), rnd(12, 10)
    with pytest.raises(ValueError, match="expert_ffn"):
        K.expert_ffn(x, w1, w3, w2.T)
    with pytest.raises(ValueError, match="dims"):
        K.expert_ffn(x[0], w1, w3, w2)
    with pytest.raises(ValueError, match="dtypes"):
        K.expert_ffn(x.double(), w1, w3, w2)
    with pytest.raises(ValueError, match="sum to T"):
        K.grouped_expert_ffn(x, [1, 1], w1[None].expand(2, -1, -1), w3[None].expand(2, -1, -1), w2[None].expand(2, -1, -1))
    with pytest.raises(ValueError, match="k=7"):
        K.topk_gating(rnd(3, 6), 7, True)
    with pytest.raises(ValueError, match="scoring"):
        K.topk_gating(rnd(3, 6), 2, True, scoring="tanh")  # sigmoid is supported since the Triton kernels
    with pytest.raises(ValueError, match="expert ids"):
        K.permute(torch.tensor([[0, 9]]), 4)
    with pytest.raises(ValueError, match="disagree"):
        K.combine_slots(rnd(3, 2, 4), rnd(3, 3))


def test_rope_tables_bitwise_equal_rotate_half():
    from amoe_serve.model.layers import apply_rope, apply_rope_tables, rope_cos_sin, rope_inv_freq, rope_tables

    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 3, 16, generator=g).to(dtype)
        cos, sin = rope_cos_sin(torch.tensor([0, 1, 7, 40, 1000]), rope_inv_freq(10000.0, 16), dtype)
        assert torch.equal(apply_rope_tables(x, *rope_tables(cos, sin)), apply_rope(x, cos, sin))
