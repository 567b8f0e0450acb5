"""Wake-ups between ranks of one node: a datagram per message on a per-rank UNIX socket.

The poll loops never block in MPI (a blocking MPICH wait spins a core, and ranks share cores),
so an idle rank sleeps between polls.  A fixed back-off sleep is also a wake-up delay: with a
500 µs cap a message waited ~0.3 ms on average per hop before anyone looked at it, and a block
of AEP makes four hops.  Here a sender rings the receiver's bell after posting the message, and
the receiver sleeps in ``select`` on its bell instead of ``time.sleep``: the kernel wakes it
when the message is there, and the back-off cap only bounds the sleep for messages that come
without a bell (from another node, or when a bell is lost because the socket buffer is full,
which means the receiver has a bell pending anyway).

Bells live in the abstract socket namespace (no files to clean up), named by a per-job token,
so concurrent jobs on one node never ring each other; the namespace is per network namespace,
so ranks in different network namespaces simply get ECONNREFUSED and fall back to the back-off.
"""

from __future__ import annotations

import os
import select
import socket
import time

__all__ = ["Doorbell"]


def _address(token: str, rank: int) -> bytes:
    return b"\0amoe-bell-" + token.encode() + b"-" + str(rank).encode()


class Doorbell:
    """This rank's bell, and the means to ring the bells of ``peers`` (ranks on this node)."""

    def __init__(self, token: str, rank: int, peers: set[int]) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._sock.bind(_address(token, rank))
        self._fd = self._sock.fileno()
        self._peers = {p: _address(token, p) for p in peers if p != rank}
        self.rung = 0      # bells sent
        self.woken = 0     # sleeps cut short by a bell

    @staticmethod
    def new_token() -> str:
        return os.urandom(8).hex()

    def ring(self, dst: int) -> None:
        addr = self._peers.get(dst)
        if addr is None:
            return
        try:
            self._sock.sendto(b"!", addr)
            self.rung += 1
        except BlockingIOError:
            pass  # the receiver's queue is full: it has bells to wake it already
        except OSError:
            self._peers.pop(dst, None)  # gone, or not in our network namespace: poll only

    def sleep(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, returning early (True) when a bell rings; drains the bells."""
        if seconds <= 0:
            return False
        try:
            ready, _, _ = select.select((self._fd,), (), (), seconds)
        except (OSError, ValueError):  # closed under us: behave like a plain sleep
            time.sleep(seconds)
            return False
        if not ready:
            return False
        self.woken += 1
        self.drain()
        return True

    def drain(self) -> None:
        try:
            while True:
                self._sock.recv(64)
        except (BlockingIOError, OSError):
            pass

    def fileno(self) -> int:
        return self._fd

    def covers(self, world_size: int) -> bool:
        """Whether every other rank of the job rings this bell (all on this node, all reachable)."""
        return len(self._peers) == world_size - 1

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass
