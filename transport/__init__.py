"""AMoE-serve transport layer: barrier-free tagged messaging between ranks.

Backends share one interface (:class:`Transport`):

* ``InProcHub(size).transport(rank)`` - ranks as threads in one process
  (reference implementation / test oracle);
* ``MPITransport(comm)`` - mpi4py point-to-point (host memory);
* ``NcclTransport(...)`` - headers over MPI, tensor payloads over
  torch.distributed (NCCL) on the GPU.

``import amoe_transport`` does not import or initialise MPI; the MPI and NCCL
modules are loaded lazily on first use.
"""

from __future__ import annotations

from .base import Message, Transport, TransportError
from .inproc import InProcHub, InProcTransport

__all__ = [
    "Message", "Transport", "TransportError", "InProcHub", "InProcTransport",
    "MPITransport", "NcclTransport", "mpi_world", "make_transport",
]


def __getattr__(name):  # lazy: importing MPI initialises it
    if name in ("MPITransport", "mpi_world"):
        from . import mpi
        return getattr(mpi, name)
    if name == "NcclTransport":
        from . import nccl
        return nccl.NcclTransport
    raise AttributeError(f"module 'amoe_transport' has no attribute {name!r}")


def make_transport(kind: str, comm=None, device=None) -> Transport:
    """Build a transport.

    kind:
      * ``"inproc"``: ``comm`` may be an existing in-process transport (returned
        as is); otherwise a 1-rank hub is created.
      * ``"mpi"``: ``MPITransport(comm or COMM_WORLD)``.
      * ``"nccl"``: ``NcclTransport(comm or COMM_WORLD, device)``.
      * ``"auto"``: ``"nccl"`` if ``device`` is a CUDA device, else ``"mpi"``.
    """
    if kind == "auto":
        import torch
        is_cuda = device is not None and torch.device(device).type == "cuda"
        kind = "nccl" if is_cuda else "mpi"
    if kind == "inproc":
        if isinstance(comm, Transport):
            return comm
        if comm is not None:
            raise TransportError("make_transport('inproc', comm=...) expects an "
                                 "in-process Transport or None")
        return InProcHub(1).transport(0)
    if kind == "mpi":
        from .mpi import MPITransport, mpi_world
        return MPITransport(comm if comm is not None else mpi_world())
    if kind == "nccl":
        from .mpi import mpi_world
        from .nccl import NcclTransport
        return NcclTransport(comm if comm is not None else mpi_world(), device=device)
    raise TransportError(f"unknown transport kind {kind!r} "
                         "(expected 'inproc', 'mpi', 'nccl' or 'auto')")
