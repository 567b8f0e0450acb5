"""Triton kernels on a real CUDA GPU (fp16/bf16) against the references; skipped without CUDA.

Also checks that CUDA tensors reach the kernels through the dispatcher with no configuration.
"""

import pytest
import torch

import amoe_kernels as K
from amoe_kernels import reference as R

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16]
TOL = {torch.float16: dict(atol=2e-2, rtol=2e-2), torch.bfloat16: dict(atol=6e-2, rtol=6e-2)}


@pytest.fixture(autouse=True)
def _need_triton():
    pytest.importorskip("triton")


def rnd(g, *shape, scale=1.0, dtype=torch.float16):
    return (torch.randn(*shape, generator=g) * scale).to(dtype).cuda()


def test_cuda_tensors_dispatch_to_triton():
    assert K.backend_for(torch.zeros(1, device="cuda")) == "triton"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("counts", [[0, 1, 0, 130], [64, 64, 0, 3], [1, 0, 0, 0]])
def test_grouped_expert_ffn_gpu(dtype, counts):
    g = torch.Generator().manual_seed(0)
    G, D, F = 4, 256, 352
    x = rnd(g, sum(counts), D, dtype=dtype)
    w1, w3 = rnd(g, G, F, D, scale=D**-0.5, dtype=dtype), rnd(g, G, F, D, scale=D**-0.5, dtype=dtype)
    w2 = rnd(g, G, D, F, scale=F**-0.5, dtype=dtype)
    got = K.grouped_expert_ffn(x, counts, w1, w3, w2)
    want = R.grouped_expert_ffn(x.float(), counts, w1.float(), w3.float(), w2.float())
    torch.testing.assert_close(got.float(), want, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_gating_route_permute_combine_gpu(dtype, scoring):
    g = torch.Generator().manual_seed(1)
    T, E, k, D = 300, 64, 8, 200
    logits = rnd(g, T, E, dtype=dtype)
    w, ids, order, counts = K.route(logits, k, True, E, scoring=scoring)
    w_ref, ids_ref, order_ref, counts_ref = R.route(logits.cpu().float(), k, True, E, None, scoring)
    assert torch.equal(ids.cpu(), ids_ref) and torch.equal(order.cpu(), order_ref) and torch.equal(counts.cpu(), counts_ref)
    torch.testing.assert_close(w.cpu(), w_ref, atol=1e-5, rtol=1e-5)
    w2, ids2 = K.topk_gating(logits, k, True, scoring=scoring)
    assert torch.equal(ids2, ids) and torch.equal(w2, w)
    o2, c2 = K.permute(ids, E)
    assert torch.equal(o2, order) and torch.equal(c2, counts)
    x = rnd(g, T, D, dtype=dtype)
    assert torch.equal(K.permute_tokens(x, order, k), x[order // k])
    ys = rnd(g, T * k, D, dtype=dtype)
    torch.testing.assert_close(K.unpermute_combine(ys, order, w), R.unpermute_combine(ys, order, w), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Lmax,H,G,d,S", [(1, 1, 8, 8, 64, 16), (5, 700, 32, 8, 128, 16), (33, 300, 16, 1, 80, 8)])
def test_paged_decode_attention_gpu(dtype, B, Lmax, H, G, d, S):
    g = torch.Generator().manual_seed(2)
    lens = torch.randint(1, Lmax + 1, (B,), generator=g).tolist()
    need = [-(-L // S) for L in lens]
    N = sum(need) + 2
    perm = torch.randperm(N, generator=g).tolist()
    tables, at = [], 0
    for n in need:
        tables.append(perm[at : at + n])
        at += n
    kc, vc, q = rnd(g, N, S, G, d, dtype=dtype), rnd(g, N, S, G, d, dtype=dtype), rnd(g, B, H, d, dtype=dtype)
    got = K.paged_decode_attention(q, kc, vc, tables, lens, d**-0.5)
    want = R.paged_decode_attention(q.cpu().float(), kc.cpu().float(), vc.cpu().float(), tables, lens, d**-0.5)
    torch.testing.assert_close(got.cpu().float(), want, **TOL[dtype])
