"""Backend-independent transport interface.

A :class:`Transport` moves *messages* between ranks.  A message is a small
JSON-able ``header`` dict plus a list of tensors, labelled with a small
non-negative integer ``tag`` chosen by the caller (the *kind* of message).

Guarantees common to every backend:

* ``isend`` / ``alltoallv`` never block on the receiver.  The payload is
  copied into a send buffer before the call returns, so the caller may mutate
  or free its tensors immediately afterwards.
* Messages between one ``(src, dst)`` pair with the same tag arrive in send
  order (all backends actually keep per-pair order across tags as well, but
  callers should only rely on per ``(src, dst, tag)`` order).
* ``poll`` never blocks; ``wait`` and ``flush`` poll with an exponential
  back-off sleep and therefore never spin a full core.

The in-process backend (:mod:`amoe_transport.inproc`) is the reference
implementation and test oracle for the others.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

__all__ = ["Message", "Transport", "TransportError"]

# Back-off schedule used by wait()/flush(): first sleep, multiplied by 2 each
# round, capped at max_sleep.
_FIRST_SLEEP = 16e-6
# How long a woken rank polls for the message its wake-up announced before it sleeps again.
_TRAIL_SPIN = 100e-6


@dataclass
class Message:
    src: int
    tag: int
    header: dict
    tensors: list[torch.Tensor] = field(default_factory=list)


@dataclass
class LinkStats:
    """Host cost of messaging on one rank: messages, bytes, and seconds spent packing + posting
    sends and probing + receiving + unpacking arrivals (the overhead bench reports µs each)."""
    sent: int = 0
    received: int = 0
    sent_bytes: int = 0
    send_s: float = 0.0
    recv_s: float = 0.0

    def to_dict(self) -> dict:
        return {"sent": self.sent, "received": self.received, "sent_bytes": self.sent_bytes,
                "send_us_per_msg": self.send_s / self.sent * 1e6 if self.sent else None,
                "recv_us_per_msg": self.recv_s / self.received * 1e6 if self.received else None}


class TransportError(RuntimeError):
    """Any transport failure: bad arguments, corrupted frames, timeouts."""


class Transport(ABC):
    rank: int
    size: int

    def __init__(self) -> None:
        # Messages already received (e.g. while flushing) but not yet handed
        # to the caller through poll()/wait().
        self._inbox: deque[Message] = deque()
        self._closed = False
        self.link_stats = LinkStats()
        # While alltoallv posts its messages, wake-ups wait here and go out together at its end.
        self._held_wakeups: list[int] | None = None

    # ------------------------------------------------------------------ API
    @abstractmethod
    def isend(self, dst: int, tag: int, header: dict,
              tensors: Sequence[torch.Tensor] = ()) -> None:
        """Nonblocking send.  Tensors are copied before returning."""

    def alltoallv(self, tag: int,
                  per_dst: Mapping[int, tuple[dict, Sequence[torch.Tensor]]]) -> None:
        """Nonblocking all-to-all-v: post one message to every dst in per_dst.

        Empty tensor lists are allowed; the message (header) still arrives.
        Destinations are posted in ascending rank order starting after our own
        rank, which spreads load when all ranks call this at the same time.
        """
        self._check_open()
        dsts = sorted(per_dst)
        for d in dsts:
            self._check_dst(d)
        dsts = [d for d in dsts if d > self.rank] + [d for d in dsts if d <= self.rank]
        # A receiver woken on this rank's core can take it over mid-loop (a sync wake-up: the
        # kernel expects the waker to sleep next); so every message is posted first, and the
        # receivers are woken after the last one.
        self._held_wakeups = []
        try:
            for d in dsts:
                header, tensors = per_dst[d]
                self.isend(d, tag, header, tensors)
        finally:
            held, self._held_wakeups = self._held_wakeups, None
            for d in held:
                self._wake(d)

    def poll(self, max_messages: int | None = None) -> list[Message]:
        """Nonblocking: progress sends, return messages that have arrived."""
        self._check_open()
        if max_messages is not None and max_messages <= 0:
            self._progress(0)
            return []
        want = None if max_messages is None else max_messages - len(self._inbox)
        if want is None or want > 0:
            self._progress(want)
        else:
            self._progress(0)
        out: list[Message] = []
        while self._inbox and (max_messages is None or len(out) < max_messages):
            out.append(self._inbox.popleft())
        return out

    def wait(self, timeout: float | None, max_sleep: float = 0.002) -> list[Message]:
        """Poll with exponential back-off until >= 1 message or timeout.

        Returns ``[]`` on timeout.  ``timeout=None`` waits forever, ``0``
        polls exactly once.  Where every peer wakes this rank (``_woken_by_all``), it sleeps
        until woken or the cap instead of backing off from a short first sleep: each sleep and
        poll round costs ~30 µs of CPU here, which the ranks sharing its cores do not get.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        max_sleep = self._sleep_cap(max_sleep)
        sleep = max_sleep if self._woken_by_all() else min(_FIRST_SLEEP, max_sleep)
        while True:
            msgs = self.poll()
            if msgs:
                return msgs
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                woken = self._idle(min(sleep, left))
            else:
                woken = self._idle(sleep)
            if woken:
                # A message can trail its wake-up by a few µs: look for it in a short spin of
                # cheap polls (~1 µs each) before sleeping again, then back off from short.
                msgs = self._spin(_TRAIL_SPIN)
                if msgs:
                    return msgs
                sleep = _FIRST_SLEEP
            else:
                sleep = min(sleep * 2, max_sleep)

    def _spin(self, seconds: float) -> list[Message]:
        end = time.perf_counter() + seconds
        while True:
            msgs = self.poll()
            if msgs or time.perf_counter() >= end:
                return msgs

    @abstractmethod
    def pending_sends(self) -> int:
        """Number of sends posted but not yet completed."""

    def flush(self, timeout: float | None = None, max_sleep: float = 0.002) -> None:
        """Complete all pending sends (back-off polling, never blocking MPI wait).

        Incoming messages received meanwhile are kept for the next poll(), so
        two ranks flushing towards each other cannot deadlock.
        Raises TransportError on timeout.
        """
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        sleep = min(_FIRST_SLEEP, max_sleep)
        while True:
            self._progress(None)
            n = self.pending_sends()
            if n == 0:
                return
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransportError(
                        f"rank {self.rank}: flush timed out after {timeout}s with "
                        f"{n} send(s) still pending (is the receiver polling?)")
                self._idle(min(sleep, left))
            else:
                self._idle(sleep)
            sleep = min(sleep * 2, max_sleep)

    @abstractmethod
    def close(self) -> None:
        """Release resources.  Idempotent."""

    # ------------------------------------------------------------ helpers
    def _sleep_cap(self, max_sleep: float) -> float:
        """The back-off's cap; a backend whose every peer wakes it may sleep longer."""
        return max_sleep

    def _woken_by_all(self) -> bool:
        """Whether every message that can reach this rank wakes it (backends with wake-ups)."""
        return False

    def _notify(self, dst: int) -> None:
        """Backends call this after posting a message to dst: wakes dst now, or at the end of
        the alltoallv that posts it."""
        if self._held_wakeups is None:
            self._wake(dst)
        else:
            self._held_wakeups.append(dst)

    def _wake(self, dst: int) -> None:
        """Wake dst if it sleeps waiting for messages (backends that can, override it)."""

    def wakeup_fd(self) -> int | None:
        """A file descriptor that turns readable when a message arrives, for callers that wait
        in their own ``select`` (the gateway's link server); None if the backend has none.
        Call :meth:`clear_wakeups` after it fires."""
        return None

    def clear_wakeups(self) -> None:
        pass

    def _idle(self, seconds: float) -> bool:
        """Sleep between polls; True when cut short by an arriving message (backends that can
        be woken override it)."""
        time.sleep(seconds)
        return False

    @abstractmethod
    def _progress(self, max_recv: int | None) -> None:
        """Progress pending sends and move up to max_recv (None: all) arrived
        messages into self._inbox.  Must not block."""

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"rank {self.rank}: transport is closed")

    def _check_dst(self, dst: int) -> None:
        if not isinstance(dst, int) or isinstance(dst, bool) or not 0 <= dst < self.size:
            raise TransportError(
                f"rank {self.rank}: invalid destination rank {dst!r} (size {self.size})")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"
