"""NCCL backend: needs CUDA GPUs (skipped otherwise)."""

from __future__ import annotations

import pytest
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_nccl_module_imports_without_gpu():
    from amoe_transport import nccl
    assert hasattr(nccl, "NcclTransport")
    if not torch.cuda.is_available():
        from amoe_transport import TransportError
        with pytest.raises(TransportError, match="CUDA"):
            nccl.NcclTransport(comm=None)


def test_make_transport_auto_picks_backend(monkeypatch):
    import amoe_transport
    from amoe_transport import mpi, nccl
    calls = []
    monkeypatch.setattr(mpi, "MPITransport", lambda comm: calls.append(("mpi", comm)) or "M")
    monkeypatch.setattr(mpi, "mpi_world", lambda expected_size=None: "WORLD")
    monkeypatch.setattr(nccl, "NcclTransport",
                        lambda comm, device=None: calls.append(("nccl", comm, device)) or "N")
    assert amoe_transport.make_transport("auto", device="cpu") == "M"
    assert amoe_transport.make_transport("auto", device="cuda:0") == "N"
    assert calls == [("mpi", "WORLD"), ("nccl", "WORLD", "cuda:0")]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.mpi(ranks=1)
def test_nccl_single_rank_loopback():
    """Single-rank NCCL transport: self-sends go through the loopback path."""
    from amoe_transport.mpi import mpi_world
    from amoe_transport.nccl import NcclTransport
    t = NcclTransport(mpi_world(), device="cuda:0")
    try:
        t.warmup()
        x = [torch.randn(4, 8, device="cuda").bfloat16(), torch.zeros(0, 3, device="cuda"),
             torch.ones(5, dtype=torch.bool, device="cuda")]
        t.isend(0, 2, {"k": 1}, x)
        msgs = t.wait(10.0)
        assert msgs and msgs[0].header == {"k": 1} and msgs[0].tag == 2
        for a, b in zip(x, msgs[0].tensors):
            assert b.device.type == "cuda" and a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a, b)
    finally:
        t.close()
