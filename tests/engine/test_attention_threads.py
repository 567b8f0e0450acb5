"""runtime.attention_threads: how 0 (auto) resolves, and that the C linear's threads never change
a bit."""

import pytest
import torch

import amoe_kernels as K
from amoe_kernels import native
from amoe_serve.config import ConfigError, load_config
from amoe_serve.engine import job


@pytest.fixture
def two_cores_one_node(monkeypatch):
    monkeypatch.setattr(job, "cores_available", lambda: 2)
    monkeypatch.delenv("MPI_LOCALNRANKS", raising=False)
    monkeypatch.delenv("SLURM_STEP_TASKS_PER_NODE", raising=False)


def test_auto_gives_the_cores_to_a_lone_wave(two_cores_one_node, monkeypatch):
    cfg = load_config(overrides=["deployment.attention_ranks=1", "deployment.expert_ranks=2"])
    assert job.attention_threads(cfg, waves=1) == 2  # experts wait while attention runs
    assert job.attention_threads(cfg, waves=2) == 1  # they run beside it
    assert job.attention_threads(cfg, waves=1, device="cuda:0") == 1
    two = load_config(overrides=["deployment.attention_ranks=2", "deployment.expert_ranks=2"])
    assert job.attention_threads(two, waves=1) == 1  # two attention ranks share the two cores
    pinned = load_config(overrides=["deployment.attention_ranks=1", "runtime.cpu_bind=core"])
    assert job.attention_threads(pinned, waves=1) == 1
    monkeypatch.setenv("MPI_LOCALNRANKS", "2")  # a job over several nodes: no guess
    assert job.attention_threads(cfg, waves=1) == 1
    set3 = load_config(overrides=["runtime.attention_threads=3"])
    assert job.attention_threads(set3, waves=2) == 3


def test_bad_attention_threads_are_refused():
    with pytest.raises(ConfigError, match="attention_threads"):
        load_config(overrides=["runtime.attention_threads=-1"])
    with pytest.raises(ConfigError, match="cpu_bind"):
        load_config(overrides=["runtime.attention_threads=2", "runtime.cpu_bind=core"])


@pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")
@pytest.mark.parametrize("T,D,O", [(16, 256, 1030), (3, 1024, 4096)])
def test_linear_threads_split_outputs_without_changing_bits(T, D, O):
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(T, D, generator=g), torch.randn(O, D, generator=g)
    one = K.linear(x, w)
    try:
        for n in (2, 3, 16):
            K.set_linear_threads(n)
            assert torch.equal(K.linear(x, w), one)
    finally:
        K.set_linear_threads(1)


@pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")
@pytest.mark.parametrize("G,H,d", [(4, 16, 64), (1, 4, 32)])
def test_decode_attention_threads_split_sequences_without_changing_bits(G, H, d):
    """Above the threads' floor (2M multiply-adds) the sequences are split over the threads,
    balanced by context length (uneven lengths here); each output is computed as alone."""
    g = torch.Generator().manual_seed(3)
    S, bs, N = 64, 16, 3000
    k, v = torch.randn(N, bs, G, d, generator=g), torch.randn(N, bs, G, d, generator=g)
    lens = torch.tensor([1 + (997 * s * s) % 700 for s in range(S)], dtype=torch.int64)
    M = int((lens.max() + bs - 1) // bs)
    tables = torch.randperm(N, generator=g)[:S * M].view(S, M)
    q = torch.randn(S, H, d, generator=g)
    assert int(lens.sum()) * H * d >= 1 << 21
    one = K.paged_decode_attention(q, k, v, tables, lens, d**-0.5)
    try:
        for n in (2, 3, 16, 40):
            K.set_linear_threads(n)
            assert torch.equal(K.paged_decode_attention(q, k, v, tables, lens, d**-0.5), one)
    finally:
        K.set_linear_threads(1)
    ref = K.paged_decode_attention(q, k, v, tables, lens, d**-0.5, backend="reference")
    torch.testing.assert_close(one, ref, atol=1e-5, rtol=1e-5)
