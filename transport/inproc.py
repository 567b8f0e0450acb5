"""In-process backend: ranks are threads of one process.

This is the reference implementation / test oracle.  To keep semantics
identical to MPI, every message is packed into a wire frame on send (so the
sender's tensors are copied and may be mutated right after isend returns)
and unpacked on the receiving side (tensors are views into that frame).
Each rank has one thread-safe FIFO; per-(src, dst) order is therefore kept
for all tags.
"""

from __future__ import annotations

import time

import threading
from collections import deque
from typing import Sequence

import torch

from .base import Message, Transport, TransportError
from .wire import pack, unpack

__all__ = ["InProcHub", "InProcTransport"]


class InProcHub:
    """Shared mailbox for ``size`` ranks living in one process."""

    def __init__(self, size: int) -> None:
        if not isinstance(size, int) or size < 1:
            raise TransportError(f"InProcHub size must be a positive int, got {size!r}")
        self.size = size
        self._queues: list[deque] = [deque() for _ in range(size)]
        self._lock = threading.Lock()
        self._transports: dict[int, InProcTransport] = {}

    def transport(self, rank: int) -> "InProcTransport":
        if not isinstance(rank, int) or not 0 <= rank < self.size:
            raise TransportError(f"invalid rank {rank!r} for hub of size {self.size}")
        with self._lock:
            t = self._transports.get(rank)
            if t is None or t._closed:
                t = InProcTransport(self, rank)
                self._transports[rank] = t
            return t

    def _deliver(self, dst: int, item) -> None:
        # deque.append/popleft are atomic in CPython; the lock keeps this
        # correct on free-threaded builds too.
        with self._lock:
            self._queues[dst].append(item)

    def _take(self, rank: int, n: int | None) -> list:
        q = self._queues[rank]
        out = []
        with self._lock:
            while q and (n is None or len(out) < n):
                out.append(q.popleft())
        return out


class InProcTransport(Transport):
    def __init__(self, hub: InProcHub, rank: int) -> None:
        super().__init__()
        self.hub = hub
        self.rank = rank
        self.size = hub.size

    def isend(self, dst: int, tag: int, header: dict,
              tensors: Sequence[torch.Tensor] = ()) -> None:
        self._check_open()
        self._check_dst(dst)
        t0 = time.perf_counter()
        frame = pack(tag, header, tensors)  # copies the tensors
        self.hub._deliver(dst, (self.rank, frame))
        st = self.link_stats
        st.sent, st.sent_bytes, st.send_s = st.sent + 1, st.sent_bytes + frame.nbytes, st.send_s + time.perf_counter() - t0

    def _progress(self, max_recv: int | None) -> None:
        if max_recv == 0:
            return
        t0 = time.perf_counter()
        got = 0
        for src, frame in self.hub._take(self.rank, max_recv):
            tag, header, tensors = unpack(frame)
            self._inbox.append(Message(src, tag, header, tensors))
            got += 1
        if got:
            self.link_stats.received += got
            self.link_stats.recv_s += time.perf_counter() - t0

    def pending_sends(self) -> int:
        return 0  # delivery is immediate

    def close(self) -> None:
        self._closed = True
