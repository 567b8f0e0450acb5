"""MPI backend (mpi4py), barrier-free point-to-point messaging.

* Send: the message is packed into one contiguous byte frame (see
  :mod:`amoe_transport.wire`), taken from a small size-class buffer pool, and
  posted with ``Isend``.  The frame is kept alive until its request completes;
  the caller's tensors are copied, so they may be mutated right after
  ``isend`` returns.
* Receive: ``Improbe(ANY_SOURCE, ANY_TAG)`` + ``Mrecv`` into a fresh uint8
  buffer sized from ``status.Get_count(MPI.BYTE)``; tensors are zero-copy
  views of that buffer.
* Progress: ``Request.Testsome`` on every poll/flush; never a blocking Wait.
* Ordering: MPI's non-overtaking rule on a (duplicated, private) communicator
  keeps per-(src, dst) order; we always receive with wildcards.
* Wake-ups: ranks on one node ring each other's :class:`~amoe_transport.doorbell.Doorbell`
  after each send, and ``wait``/``flush`` sleep on it, so an idle rank wakes when a message
  arrives instead of at its next back-off poll (``AMOE_TRANSPORT_DOORBELL=0`` turns it off).
* Tags: the user tag lives in the frame.  It is also used as the MPI tag
  when it fits under ``MPI.TAG_UB`` (handy for debugging tools); larger tags
  are sent with MPI tag ``TAG_UB`` and still delivered correctly.

Constructing an ``MPITransport`` duplicates the communicator (``Comm.Dup``),
which is collective: every rank of ``comm`` must construct it together.
"""

from __future__ import annotations

import os
import time

import threading
from typing import Sequence

import numpy as np
import torch

from .base import Message, Transport, TransportError
from .doorbell import Doorbell
from .wire import pack, unpack

__all__ = ["MPITransport", "mpi_world"]


def _import_mpi():
    """Import mpi4py.MPI requesting THREAD_MULTIPLE if MPI is not yet up."""
    import sys

    import mpi4py
    if "mpi4py.MPI" not in sys.modules:
        mpi4py.rc.thread_level = "multiple"
    from mpi4py import MPI
    return MPI


def mpi_world(expected_size: int | None = None):
    """Initialise MPI (THREAD_MULTIPLE) if needed and return COMM_WORLD.

    If ``expected_size`` is given and the world has a different size, raise
    TransportError with a hint about how the job was launched.
    """
    MPI = _import_mpi()
    if not MPI.Is_initialized():
        MPI.Init_thread(MPI.THREAD_MULTIPLE)
    if MPI.Is_finalized():
        raise TransportError("MPI has already been finalized")
    comm = MPI.COMM_WORLD
    n = comm.Get_size()
    if expected_size is not None and n != expected_size:
        if n == 1:
            why = ("ranks came up as singletons (each process is its own 1-rank world); "
                   f"launch with `mpiexec -n {expected_size} ...` or "
                   f"`srun --mpi=pmi2 -n {expected_size} ...` (check the launcher's "
                   "PMI matches the MPI library)")
        else:
            why = f"launch with `mpiexec -n {expected_size}` (or srun -n {expected_size})"
        raise TransportError(
            f"MPI world has {n} rank{'s' if n != 1 else ''} but the deployment "
            f"needs {expected_size}: {why}")
    return comm


class _BufferPool:
    """Reusable send buffers in power-of-two size classes (>= 4 KiB)."""

    MIN = 4096

    def __init__(self, max_bytes: int = 64 << 20, per_class: int = 8) -> None:
        self.max_bytes = max_bytes
        self.per_class = per_class
        self._free: dict[int, list[np.ndarray]] = {}
        self._bytes = 0

    def get(self, n: int) -> np.ndarray:
        cap = max(self.MIN, 1 << (max(n, 1) - 1).bit_length())
        lst = self._free.get(cap)
        if lst:
            self._bytes -= cap
            return lst.pop()
        return np.empty(cap, dtype=np.uint8)

    def put(self, buf: np.ndarray) -> None:
        cap = buf.nbytes
        lst = self._free.setdefault(cap, [])
        if len(lst) < self.per_class and self._bytes + cap <= self.max_bytes:
            lst.append(buf)
            self._bytes += cap


class MPITransport(Transport):
    def __init__(self, comm=None, *, dup: bool = True,
                 pool_bytes: int = 64 << 20, doorbell: bool | None = None) -> None:
        super().__init__()
        MPI = _import_mpi()
        self._MPI = MPI
        if comm is None:
            comm = mpi_world()
        self._owns_comm = dup
        self.comm = comm.Dup() if dup else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        ub = self.comm.Get_attr(MPI.TAG_UB)
        self.tag_ub = int(ub) if ub else 32767  # MPI guarantees >= 32767
        self.thread_level = MPI.Query_thread()
        self._lock = threading.RLock()
        self._reqs: list = []       # MPI.Request, parallel to _bufs
        self._bufs: list = []       # pool buffers kept alive until completion
        self._pool = _BufferPool(pool_bytes)
        self._status = MPI.Status()
        if doorbell is None:
            doorbell = os.environ.get("AMOE_TRANSPORT_DOORBELL", "1") != "0"
        self._bell = self._make_doorbell(doorbell)

    def _make_doorbell(self, enabled: bool) -> Doorbell | None:
        """Collective (on every rank, bell or not, so no rank waits on a skipped call): one job
        token from rank 0, and which ranks share this node."""
        MPI = self._MPI
        tok = np.frombuffer(bytes.fromhex(Doorbell.new_token()), np.uint8).copy() if self.rank == 0 \
            else np.zeros(8, np.uint8)
        self.comm.Bcast([tok, MPI.BYTE], root=0)
        token = tok.tobytes().hex()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        try:
            ranks = np.zeros(node.Get_size(), np.int64)
            node.Allgather([np.array([self.rank], np.int64), MPI.INT64_T], [ranks, MPI.INT64_T])
            peers = set(ranks.tolist())
        finally:
            node.Free()
        if not enabled:
            return None
        try:
            return Doorbell(token, self.rank, peers)
        except OSError:  # no abstract UNIX sockets here: back-off polling only
            return None

    # ------------------------------------------------------------------ send
    def isend(self, dst: int, tag: int, header: dict,
              tensors: Sequence[torch.Tensor] = ()) -> None:
        self._check_open()
        self._check_dst(dst)
        with self._lock:
            t0 = time.perf_counter()
            frame = pack(tag, header, tensors, alloc=self._pool.get)
            mpi_tag = tag if tag <= self.tag_ub else self.tag_ub
            req = self.comm.Isend([frame, self._MPI.BYTE], dst, mpi_tag)
            self._reqs.append(req)
            self._bufs.append(frame.base if frame.base is not None else frame)
            self._notify(dst)
            if len(self._reqs) >= 64:
                self._progress_sends()
            st = self.link_stats
            st.sent += 1
            st.sent_bytes += frame.nbytes
            st.send_s += time.perf_counter() - t0

    def _progress_sends(self) -> None:
        if not self._reqs:
            return
        done = self._MPI.Request.Testsome(self._reqs)
        if not done:
            return
        done_set = set(done)
        keep_r, keep_b = [], []
        for i, (r, b) in enumerate(zip(self._reqs, self._bufs)):
            if i in done_set:
                self._pool.put(b)
            else:
                keep_r.append(r)
                keep_b.append(b)
        self._reqs, self._bufs = keep_r, keep_b

    def pending_sends(self) -> int:
        with self._lock:
            return len(self._reqs)

    # Every peer rings us: a long idle sleep costs no latency, and each poll of an idle rank
    # (~40 µs here) is CPU the busy ranks on the same cores do not get.
    BELL_SLEEP_CAP = 0.02

    def _woken_by_all(self) -> bool:
        return self._bell is not None and self._bell.covers(self.size)

    def _sleep_cap(self, max_sleep: float) -> float:
        return max(max_sleep, self.BELL_SLEEP_CAP) if self._woken_by_all() else max_sleep

    def _wake(self, dst: int) -> None:
        if self._bell is not None:
            self._bell.ring(dst)

    def wakeup_fd(self) -> int | None:
        return None if self._bell is None else self._bell.fileno()

    def clear_wakeups(self) -> None:
        if self._bell is not None:
            self._bell.drain()

    def _idle(self, seconds: float) -> bool:
        return super()._idle(seconds) if self._bell is None else self._bell.sleep(seconds)

    # --------------------------------------------------------------- receive
    def _progress(self, max_recv: int | None) -> None:
        MPI = self._MPI
        with self._lock:
            self._progress_sends()
            got = 0
            st = self._status
            while max_recv is None or got < max_recv:
                t0 = time.perf_counter()
                m = self.comm.Improbe(MPI.ANY_SOURCE, MPI.ANY_TAG, st)
                if m is None or m == MPI.MESSAGE_NULL:
                    break
                n = st.Get_count(MPI.BYTE)
                src = st.Get_source()
                mpi_tag = st.Get_tag()
                buf = np.empty(n, dtype=np.uint8)
                m.Recv([buf, MPI.BYTE])
                got += 1
                try:
                    tag, header, tensors = unpack(buf)
                except TransportError as e:
                    raise TransportError(
                        f"rank {self.rank}: bad frame from rank {src} "
                        f"(MPI tag {mpi_tag}, {n} bytes): {e}") from None
                if mpi_tag != min(tag, self.tag_ub):
                    raise TransportError(
                        f"rank {self.rank}: frame from rank {src} has tag {tag} "
                        f"but arrived with MPI tag {mpi_tag}")
                self._inbox.append(Message(src, tag, header, tensors))
                self.link_stats.received += 1
                self.link_stats.recv_s += time.perf_counter() - t0

    # ----------------------------------------------------------------- close
    def close(self, timeout: float = 10.0) -> None:
        """Flush pending sends (up to ``timeout`` s), then free the private
        communicator.  Unfinished sends are cancelled."""
        if self._closed:
            return
        try:
            self.flush(timeout)
        except TransportError:
            with self._lock:
                for r in self._reqs:
                    try:
                        r.Cancel()
                        r.Free()
                    except Exception:
                        pass
                self._reqs, self._bufs = [], []
        self._closed = True
        if self._bell is not None:
            self._bell.close()
        if self._owns_comm:
            try:
                if not self._MPI.Is_finalized():
                    self.comm.Free()
            except Exception:
                pass
