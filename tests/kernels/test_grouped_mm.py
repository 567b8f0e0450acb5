"""The CPU grouped-GEMM expert FFN equals the per-expert reference bit for bit."""

import pytest
import torch

import amoe_kernels as K
from amoe_kernels import dispatch, grouped_mm, reference

pytestmark = pytest.mark.skipif(not grouped_mm.supports(32, 48, torch.float32), reason="this torch has no CPU _grouped_mm")


@pytest.fixture(autouse=True)
def _no_native_experts(monkeypatch):
    """These shapes are small enough for the C kernel (tests/kernels/test_native.py); here the
    grouped-GEMM path is under test."""
    monkeypatch.setattr(dispatch, "_native_experts", lambda *a: False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("counts,experts", [([3, 0, 5, 1], None), ([4, 2], [1, 3]), ([0, 7], [0, 2]),
                                             ([6], [2]), ([2, 2, 2], [0, 1, 3])])
def test_bit_identical_to_reference(dtype, counts, experts):
    g = torch.Generator().manual_seed(7)
    G, D, F = 4, 32, 48
    w1, w3 = (torch.randn(G, F, D, generator=g).to(dtype) for _ in range(2))
    w2 = torch.randn(G, D, F, generator=g).to(dtype)
    x = torch.randn(sum(counts), D, generator=g).to(dtype)
    want = reference.grouped_expert_ffn(x, counts, w1, w3, w2, experts)
    got = K.grouped_expert_ffn(x, counts, w1, w3, w2, experts=experts)
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_unsorted_experts_fall_back_to_the_loop():
    assert grouped_mm.offsets([1, 2], [3, 1], 4) is None
    assert grouped_mm.offsets([1, 2], [1, 3], 4).tolist() == [0, 1, 1, 3]
    g = torch.Generator().manual_seed(1)
    w1, w3 = torch.randn(4, 16, 8, generator=g), torch.randn(4, 16, 8, generator=g)
    w2 = torch.randn(4, 8, 16, generator=g)
    x = torch.randn(3, 8, generator=g)
    assert torch.equal(K.grouped_expert_ffn(x, [1, 2], w1, w3, w2, experts=[3, 1]),
                       reference.grouped_expert_ffn(x, [1, 2], w1, w3, w2, [3, 1]))


def test_reference_by_name_still_loops(monkeypatch):
    calls = []
    monkeypatch.setattr(grouped_mm, "grouped_expert_ffn", lambda *a: calls.append(a))
    x, w1, w3, w2 = torch.randn(2, 8), torch.randn(1, 16, 8), torch.randn(1, 16, 8), torch.randn(1, 8, 16)
    K.grouped_expert_ffn(x, [2], w1, w3, w2, backend="reference")
    assert not calls
    K.grouped_expert_ffn(x, [2], w1, w3, w2)
    assert len(calls) == 1


def test_shapes_it_cannot_take_use_the_loop():
    assert not grouped_mm.supports(6, 5, torch.float32)  # strides not a multiple of 16 bytes
    g = torch.Generator().manual_seed(2)
    w1, w3, w2 = torch.randn(2, 5, 6, generator=g), torch.randn(2, 5, 6, generator=g), torch.randn(2, 6, 5, generator=g)
    x = torch.randn(4, 6, generator=g)
    assert torch.equal(K.grouped_expert_ffn(x, [1, 3], w1, w3, w2), reference.grouped_expert_ffn(x, [1, 3], w1, w3, w2))
