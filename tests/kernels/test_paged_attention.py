"""Batched paged attention (one call per batch, prefill and decode) against the per-sequence
reference it replaced, and the KV addressing a batch builds once per step."""

import pytest
import torch

import amoe_kernels as K
from amoe_kernels import reference as R
from amoe_serve.kv.batch import PagedBatch

g = torch.Generator().manual_seed(1)


def _cache(N, bs, G, d, dtype):
    return torch.randn(N, bs, G, d, generator=g).to(dtype), torch.randn(N, bs, G, d, generator=g).to(dtype)


def _per_query(q_SnHd, kc, vc, tables_SM, qpos_Sn, scale):
    """Each query on its own: gather its context position by position, then gqa_attention."""
    S, n, H, d = q_SnHd.shape
    _, bs, G, _ = kc.shape
    out = torch.empty(S, n, H * d, dtype=q_SnHd.dtype)
    for s in range(S):
        for i in range(n):
            P = int(qpos_Sn[s, i])
            pos = torch.arange(P + 1)
            slots = tables_SM[s, pos // bs] * bs + pos % bs
            out[s, i] = R.gqa_attention(q_SnHd[s, i:i + 1], kc.view(-1, G, d)[slots].to(q_SnHd.dtype),
                                        vc.view(-1, G, d)[slots].to(q_SnHd.dtype), P, scale)[0]
    return out


@pytest.mark.parametrize("G,H", [(1, 4), (2, 4), (4, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_matches_per_sequence_reference(G, H, dtype):
    S, n, d, N, bs = 5, 3, 16, 40, 4
    kc, vc = _cache(N, bs, G, d, dtype)
    tables = torch.randperm(N, generator=g)[:S * 6].view(S, 6)
    qpos = torch.randint(0, 24, (S, n), generator=g)
    q = torch.randn(S, n, H, d, generator=g).to(dtype)
    got = K.paged_attention(q, kc, vc, tables, qpos, d**-0.5)
    want = _per_query(q, kc, vc, tables, qpos, d**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    # fp32 on CPU: a prompt row gets the bits of the same query decoded alone (one kernel for both).
    for i in range(n if dtype == torch.float32 else 0):
        assert torch.equal(got[:, i:i + 1], K.paged_attention(q[:, i:i + 1], kc, vc, tables, qpos[:, i:i + 1], d**-0.5))


def test_paged_attention_checks_shapes():
    kc, vc = _cache(4, 4, 1, 8, torch.float32)
    q = torch.randn(2, 1, 2, 8)
    with pytest.raises(ValueError, match="paged_attention"):
        K.paged_attention(q, kc, vc, torch.zeros(3, 1, dtype=torch.int64), torch.zeros(2, 1, dtype=torch.int64), 1.0)
    with pytest.raises(ValueError, match="int64"):
        K.paged_attention(q, kc, vc, torch.zeros(2, 1, dtype=torch.int32), torch.zeros(2, 1, dtype=torch.int64), 1.0)


def test_paged_batch_mixed_prefill_and_decode():
    """A batch of decode spans and prompt chunks: every token's write slot and position, and one
    query group for the decode spans and one (padded) for the prompts."""
    bs = 4
    tables = [torch.tensor([7, 2, 5]), torch.tensor([0]), torch.tensor([3, 4, 6, 1])]
    start, n = [9, 0, 5], [1, 3, 6]
    pb = PagedBatch.build(tables, start, n, bs, num_cache_blocks=8)
    assert pb.num_tokens == 10 and pb.max_pos == 10
    pos = [9, 0, 1, 2, 5, 6, 7, 8, 9, 10]
    assert pb.pos_T.tolist() == pos
    span = [0, 1, 1, 1, 2, 2, 2, 2, 2, 2]
    assert pb.write_slots_T.tolist() == [int(tables[s][p // bs]) * bs + p % bs for s, p in zip(span, pos)]
    dec, pre = pb.groups
    assert dec.rows_Sn.tolist() == [[0]] and dec.qpos_Sn.tolist() == [[9]]
    assert pre.rows_Sn[pre.valid_Sn].tolist() == list(range(1, 10))
    assert pre.qpos_Sn[1].tolist() == [5, 6, 7, 8, 9, 10]
    with pytest.raises(ValueError, match="fit"):
        PagedBatch.build([torch.tensor([0])], [3], [2], bs, num_cache_blocks=8)  # 5 tokens, 1 block
    with pytest.raises(ValueError, match="block ids"):
        PagedBatch.build([torch.tensor([9])], [0], [1], bs, num_cache_blocks=8)


def test_batched_model_attention_equals_one_request_at_a_time(tmp_path):
    """The model's attention over a mixed batch (decodes + prompts in one call) gives each
    request what it gets alone."""
    from amoe_serve.default_model import write_default_model
    from amoe_serve.kv.cache import PagedKVCache
    from amoe_serve.model import AttentionSide, AttnSegment, load_spec

    write_default_model(tmp_path, {"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 1,
                                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                                   "vocab_size": 64}, seed=0)
    spec = load_spec(tmp_path)
    attn = AttentionSide.load(tmp_path, torch.float32)
    reqs = [([3, 5, 7, 9, 11], [0, 1]), ([2], [2]), ([4, 6, 8], [3]), ([1, 2, 3, 4, 5, 6, 7], [4, 5])]
    kv_one, kv_all = (PagedKVCache(spec, 8, 4, torch.float32) for _ in range(2))
    # Everything but each request's last token is cached first (request by request, both caches).
    for ids, table in reqs:
        if len(ids) > 1:
            for kv in (kv_one, kv_all):
                attn.attention(0, attn.embed(torch.tensor(ids[:-1])), [AttnSegment(0, len(ids) - 1, table)], kv)
    # Then: two requests decode their last token, the other two prefill a fresh prompt from 0.
    spans = [(0, 4, reqs[0]), (0, 1, reqs[1]), (2, 1, reqs[2]), (0, 7, reqs[3])]  # (start, n, req)
    segs, x = [], []
    for start, n_, (ids, table) in spans:
        segs.append(AttnSegment(start, n_, table))
        x.append(attn.embed(torch.tensor(ids[start:start + n_])))
    got = attn.attention(0, torch.cat(x), segs, kv_all)
    off = 0
    for seg, x_i in zip(segs, x):
        want = attn.attention(0, x_i, [seg], kv_one)
        torch.testing.assert_close(got[off:off + seg.num_tokens], want, atol=1e-5, rtol=1e-5)
        off += seg.num_tokens
