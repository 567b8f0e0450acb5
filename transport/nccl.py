"""NCCL backend: headers over MPI (host), tensor payloads over NCCL (GPU).

Protocol for one message ``src -> dst``:

1. ``src`` copies the tensors to private contiguous device buffers (so the
   caller may mutate its tensors after ``isend`` returns), sends a host
   message over the wrapped :class:`MPITransport` with the same tag whose
   header is ``{"h": user_header, "nccl": [[dtype, shape], ...]}``, then posts
   one ``torch.distributed.isend`` per non-empty tensor.
2. ``dst`` reads host headers in arrival order (MPI keeps per-pair order),
   allocates ``torch.empty`` buffers on its device and posts the matching
   ``irecv`` calls immediately, in the same order.  NCCL matches p2p
   operations per peer pair in posting order, so payloads pair up.
3. A message is delivered once all its irecv works are complete
   (``work.is_completed()``, nonblocking); delivery per source is in header
   order, so per-(src, tag) order is kept.  ``work.wait()`` on delivery only
   makes the current CUDA stream wait for the NCCL stream (no host block).

Zero-element tensors are never sent over NCCL; ``bool`` travels as uint8.

Caveat: NCCL creates communicators lazily on the first p2p op between two
ranks, which blocks the host until the peer joins.  Call :meth:`warmup`
(collective, all ranks) once after construction to set them all up.
"""

from __future__ import annotations

import json
import os
import socket
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .base import Message, Transport, TransportError
from .mpi import MPITransport
from .wire import DTYPES, dtype_name

__all__ = ["NcclTransport"]


@dataclass
class _PendingRecv:
    src: int
    tag: int
    header: dict
    tensors: list
    works: list = field(default_factory=list)


def _bcast_json(comm, obj, root: int = 0):
    """Broadcast a small JSON object with a raw byte Bcast (no pickle)."""
    buf = np.zeros(1024, dtype=np.uint8)
    if comm.Get_rank() == root:
        b = json.dumps(obj).encode()
        if len(b) > buf.nbytes:
            raise TransportError("rendezvous info too large")
        buf[:len(b)] = np.frombuffer(b, dtype=np.uint8)
    comm.Bcast(buf, root=root)
    return json.loads(buf.tobytes().rstrip(b"\0").decode())


class NcclTransport(Transport):
    def __init__(self, comm=None, device=None, *, host: MPITransport | None = None,
                 timeout_s: float = 600.0) -> None:
        super().__init__()
        import torch.distributed as dist
        self._dist = dist
        if not torch.cuda.is_available():
            raise TransportError("NcclTransport needs CUDA, but torch.cuda.is_available() is False")
        self.host = host if host is not None else MPITransport(comm)
        self.rank, self.size = self.host.rank, self.host.size
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise TransportError(f"NcclTransport needs a CUDA device, got {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(self.device)
        self._owns_pg = False
        if not dist.is_initialized():
            self._init_process_group(timeout_s)
        elif dist.get_world_size() != self.size or dist.get_rank() != self.rank:
            raise TransportError(
                "torch.distributed is already initialised with a different rank layout "
                f"(rank {dist.get_rank()}/{dist.get_world_size()} vs MPI {self.rank}/{self.size})")
        self._recv_q: dict[int, deque[_PendingRecv]] = {}
        self._sends: list[tuple[list, list]] = []   # (works, device buffers)

    def _init_process_group(self, timeout_s: float) -> None:
        from datetime import timedelta
        info = None
        if self.rank == 0:
            addr = os.environ.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname())
            with socket.socket() as s:
                s.bind(("", 0))
                port = s.getsockname()[1]
            info = {"addr": addr, "port": int(os.environ.get("MASTER_PORT", port))}
        info = _bcast_json(self.host.comm, info)
        self._dist.init_process_group(
            "nccl", init_method=f"tcp://{info['addr']}:{info['port']}",
            rank=self.rank, world_size=self.size,
            timeout=timedelta(seconds=timeout_s), device_id=self.device)
        self._owns_pg = True

    def warmup(self) -> None:
        """Collective: create every pairwise NCCL channel up front (ring-shift
        exchanges with batch_isend_irecv), so later isends never block."""
        dist = self._dist
        x = torch.zeros(1, device=self.device)
        y = torch.zeros(1, device=self.device)
        dist.all_reduce(x)
        for off in range(1, self.size):
            to, frm = (self.rank + off) % self.size, (self.rank - off) % self.size
            ops = [dist.P2POp(dist.isend, x, to), dist.P2POp(dist.irecv, y, frm)]
            for w in dist.batch_isend_irecv(ops):
                w.wait()
        torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ send
    def isend(self, dst: int, tag: int, header: dict,
              tensors: Sequence[torch.Tensor] = ()) -> None:
        self._check_open()
        self._check_dst(dst)
        meta, bufs = [], []
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                raise TransportError(f"expected torch.Tensor, got {type(t).__name__}")
            meta.append([dtype_name(t.dtype), list(t.shape)])
            if t.numel():
                b = torch.empty(t.shape, dtype=t.dtype, device=self.device)
                b.copy_(t.detach(), non_blocking=True)
                bufs.append(b.view(torch.uint8) if b.dtype == torch.bool else b)
        if dst == self.rank:   # loopback: no NCCL self-send
            out = [b.clone() for b in bufs]
            self.host.isend(dst, tag, {"h": header, "nccl": meta, "self": True})
            self._self_q = getattr(self, "_self_q", deque())
            self._self_q.append(out)
            return
        self.host.isend(dst, tag, {"h": header, "nccl": meta})
        works = [self._dist.isend(b, dst) for b in bufs]
        self._sends.append((works, bufs))

    def pending_sends(self) -> int:
        return self.host.pending_sends() + len(self._sends)

    # --------------------------------------------------------------- receive
    def _progress(self, max_recv: int | None) -> None:
        self._sends = [(ws, bs) for ws, bs in self._sends
                       if not all(w.is_completed() for w in ws)]
        self.host._progress(None)
        while self.host._inbox:
            m = self.host._inbox.popleft()
            self._post_recv(m)
        for q in self._recv_q.values():
            while q and all(w.is_completed() for w in q[0].works):
                p = q.popleft()
                for w in p.works:
                    w.wait()   # stream-level dependency only
                self._inbox.append(Message(p.src, p.tag, p.header, p.tensors))

    def _post_recv(self, m: Message) -> None:
        meta = m.header.get("nccl")
        if not isinstance(meta, list) or not isinstance(m.header.get("h"), dict):
            raise TransportError(f"rank {self.rank}: malformed NCCL header from {m.src}")
        tensors, recv_bufs = [], []
        for name, shape in meta:
            if name not in DTYPES:
                raise TransportError(f"rank {self.rank}: unknown dtype {name!r} from {m.src}")
            dt = DTYPES[name]
            t = torch.empty(shape, dtype=dt, device=self.device)
            tensors.append(t)
            if t.numel():
                recv_bufs.append(t.view(torch.uint8) if dt == torch.bool else t)
        p = _PendingRecv(m.src, m.tag, m.header["h"], tensors)
        if m.header.get("self"):
            for dst_b, src_b in zip(recv_bufs, self._self_q.popleft()):
                dst_b.copy_(src_b)
        else:
            p.works = [self._dist.irecv(b, m.src) for b in recv_bufs]
        self._recv_q.setdefault(m.src, deque()).append(p)

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush(timeout=30.0)
        finally:
            self._closed = True
            self.host.close()
            if self._owns_pg and self._dist.is_initialized():
                self._dist.destroy_process_group()
