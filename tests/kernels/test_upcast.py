"""bf16/fp16 weights at rest, fp32 compute: the widened-per-call kernels equal fp32 compute on
the whole widened weights (the reference), exactly."""

import pytest
import torch

import amoe_kernels as K
from amoe_kernels import dispatch, reference, upcast


@pytest.fixture(autouse=True)
def _small_slices(monkeypatch):
    # Slices much smaller than the weights, so the slice loop takes several turns.
    monkeypatch.setattr(upcast, "SLICE_ELEMS", 64 * 48)
    # bf16 experts go to the C kernel where it builds (tests/kernels/test_native.py); here the
    # widen-then-GEMM path, the one without it, is under test.
    monkeypatch.setattr(dispatch, "_native_experts", lambda *a: False)


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 5, 64])
def test_linear_equals_fp32_on_widened_weight(wdtype, T):
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, 48, generator=g)
    w = torch.randn(1000, 48, generator=g).to(wdtype)
    b = torch.randn(1000, generator=g).to(wdtype)
    want = torch.nn.functional.linear(x, w.float(), b.float())
    assert torch.equal(K.linear(x, w, b), want)
    assert torch.equal(K.linear(x, w), torch.nn.functional.linear(x, w.float()))


def test_linear_same_dtype_is_plain_linear():
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    assert torch.equal(K.linear(x, w), torch.nn.functional.linear(x, w))


@pytest.mark.parametrize("experts", [None, [0, 2, 3, 5, 6, 9], [9, 1, 4]])
def test_grouped_expert_ffn_equals_reference_on_widened_stacks(experts):
    g = torch.Generator().manual_seed(1)
    E, D, F = 10, 32, 16
    w1, w3 = (torch.randn(E, F, D, generator=g).bfloat16() for _ in range(2))
    w2 = torch.randn(E, D, F, generator=g).bfloat16()
    n = E if experts is None else len(experts)
    counts = [(3 * i) % 5 for i in range(n)]  # some experts get no rows
    x = torch.randn(sum(counts), D, generator=g)
    got = K.grouped_expert_ffn(x, counts, w1, w3, w2, experts=experts)
    want = reference.grouped_expert_ffn(x, counts, w1.float(), w3.float(), w2.float(), experts)
    assert torch.equal(got, want)


def test_expert_ffn_mixed_equals_reference():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 32, generator=g)
    w1, w3 = (torch.randn(16, 32, generator=g).bfloat16() for _ in range(2))
    w2 = torch.randn(32, 16, generator=g).bfloat16()
    assert torch.equal(K.expert_ffn(x, w1, w3, w2), reference.expert_ffn(x, w1.float(), w3.float(), w2.float()))


def test_narrow_activations_over_wide_weights_are_refused():
    with pytest.raises(ValueError, match="dtype"):
        K.linear(torch.randn(2, 8).bfloat16(), torch.randn(4, 8))
    with pytest.raises(ValueError, match="dtype"):
        K.grouped_expert_ffn(torch.randn(2, 8).half(), [2], torch.randn(1, 4, 8).bfloat16(),
                             torch.randn(1, 4, 8).bfloat16(), torch.randn(1, 8, 4).bfloat16())
