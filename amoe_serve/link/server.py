"""The gateway's end of the ingress link: a non-blocking socket server polled from the
gateway's own loop (one thread, so MPI stays single-threaded).

Each connection must authenticate (HMAC of a server nonce with the shared token) within
`auth_timeout` seconds; until then nothing it sends reaches the gateway. A connection that
sends a malformed or oversize frame, or authenticates wrongly, is closed; the server and the
other connections carry on. A well-framed message that does not decode (`messages.py`) reaches
the gateway as `LinkEvent.bad`, for it to answer; the connection stays.
"""

from __future__ import annotations

import itertools
import selectors
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from amoe_serve.link import wire
from amoe_serve.link.api import ModelInfo
from amoe_serve.link.messages import (FROM_CLIENT, Auth, Challenge, ClientMessage, ErrorNotice, GatewayMessage,
                                      MessageError, Ready, decode)

# Largest frame a connection may send before it has authenticated (the auth frame is ~100 bytes):
# an unauthenticated peer cannot make the gateway buffer a max_frame_bytes frame.
AUTH_MAX_FRAME = 4096
# Bytes queued for a peer that does not read them; past this the connection is dropped.
MAX_OUT_BYTES = 64 << 20


@dataclass
class _Conn:
    cid: int
    sock: socket.socket
    reader: wire.FrameReader
    nonce: str
    deadline: float
    authed: bool = False
    out: bytearray = field(default_factory=bytearray)


@dataclass(frozen=True)
class LinkEvent:
    """What happened on one authenticated connection: a message, a bad one, or (neither) it closed."""
    cid: int
    msg: Optional[ClientMessage] = None
    bad: Optional[MessageError] = None

    @property
    def closed(self) -> bool:
        return self.msg is None and self.bad is None


class LinkServer:
    def __init__(self, host: str, port: int, token: str, info: ModelInfo,
                 max_frame: int = wire.MAX_FRAME_BYTES, auth_timeout: float = 5.0,
                 max_connections: int = 256):
        if not token:
            raise ValueError("the link needs a shared token (link.token or AMOE_SERVE_LINK_TOKEN)")
        self.token = token
        self.info = info
        self._ready = wire.encode(Ready(info).encode())  # the same bytes for every connection
        self.max_frame = max_frame
        self.auth_timeout = auth_timeout
        self.max_connections = max_connections
        self.sel = selectors.DefaultSelector()
        self.listener = socket.create_server((host, port), reuse_port=False)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, None)
        self.address = self.listener.getsockname()[:2]
        self._conns: dict[int, _Conn] = {}  # open connections, authenticated or not
        self._ids = itertools.count(1)
        self._lost: list[int] = []  # authenticated connections that closed since the last poll
        self.rejected = 0
        self._watched: dict[int, object] = {}  # fd -> callback run when it turns readable

    def watch(self, fd: int, on_ready) -> None:
        """Also wake `poll` when `fd` turns readable (the data plane's message bell), calling
        `on_ready()` (which must make it unreadable again)."""
        self._watched[fd] = on_ready
        self.sel.register(fd, selectors.EVENT_READ, fd)

    # ---- polling ----------------------------------------------------------------------------
    def poll(self, timeout: float) -> list[LinkEvent]:
        """Wait up to `timeout` for socket activity; returns messages of authenticated peers."""
        events: list[LinkEvent] = []
        for key, mask in self.sel.select(timeout):
            if isinstance(key.data, int):
                self._watched[key.data]()
                continue
            if key.data is None:
                self._accept()
                continue
            conn: _Conn = key.data
            if mask & selectors.EVENT_WRITE:
                self._flush(conn, events)
            if mask & selectors.EVENT_READ and conn.cid in self._conns:
                self._read(conn, events)
        now = time.monotonic()
        for conn in [c for c in self._conns.values() if not c.authed and now > c.deadline]:
            self._close(conn, events, "authentication timed out")
        events.extend(LinkEvent(cid) for cid in self._lost)
        self._lost.clear()
        return events

    def send(self, cid: int, msg: GatewayMessage) -> bool:
        """Queue `msg` for connection `cid`; False if that connection is gone (or now dropped)."""
        conn = self._conns.get(cid)
        if conn is None or not conn.authed:
            return False
        conn.out += wire.encode(msg.encode())
        self._flush(conn, None)
        if len(conn.out) > MAX_OUT_BYTES and conn.cid in self._conns:
            self._close(conn, None, f"peer does not read: over {MAX_OUT_BYTES} bytes queued")
            return False
        return conn.cid in self._conns

    @property
    def connection_count(self) -> int:
        """Open connections, authenticated or not."""
        return len(self._conns)

    def flush(self, timeout: float) -> None:
        """Give queued frames (final tokens, errors) up to `timeout` seconds to leave; what
        peers send meanwhile is dropped (the gateway is stopping)."""
        deadline = time.monotonic() + timeout
        while any(c.out for c in self._conns.values()) and time.monotonic() < deadline:
            self.poll(0.01)

    def close(self) -> None:
        for conn in list(self._conns.values()):
            self._close(conn, None, None)
        for fd in self._watched:
            self.sel.unregister(fd)
        self._watched.clear()
        self.sel.unregister(self.listener)
        self.listener.close()
        self.sel.close()

    # ---- internals --------------------------------------------------------------------------
    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except OSError:  # nothing waiting, a peer that reset before accept, out of descriptors
            return
        if len(self._conns) >= self.max_connections:
            self.rejected += 1
            sock.close()
            return
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            sock.close()
            return
        conn = _Conn(next(self._ids), sock, wire.FrameReader(min(self.max_frame, AUTH_MAX_FRAME)),
                     wire.new_nonce(), time.monotonic() + self.auth_timeout)
        self._conns[conn.cid] = conn
        self.sel.register(sock, selectors.EVENT_READ, conn)
        conn.out += wire.encode(Challenge(conn.nonce, wire.VERSION).encode())
        self._flush(conn, None)

    def _read(self, conn: _Conn, events: list[LinkEvent]) -> None:
        try:
            data = conn.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn, events, None)
            return
        try:
            frames = conn.reader.feed(data)
        except wire.LinkProtocolError as e:
            self._close(conn, events, str(e))
            return
        for obj in frames:
            if conn.authed:
                try:
                    events.append(LinkEvent(conn.cid, decode(obj, FROM_CLIENT)))
                except MessageError as e:
                    events.append(LinkEvent(conn.cid, bad=e))
            elif self._authenticates(conn, obj):
                conn.authed = True
                conn.reader.max_frame = self.max_frame
                conn.out += self._ready
                self._flush(conn, events)
            else:
                self.rejected += 1
                self._close(conn, events, "authentication failed")
                return

    def _authenticates(self, conn: _Conn, obj: dict) -> bool:
        try:
            auth = decode(obj, {Auth.TYPE: Auth})
        except MessageError:
            return False
        return wire.verify(self.token, conn.nonce, auth.mac)

    def _flush(self, conn: _Conn, events: Optional[list[LinkEvent]]) -> None:
        try:
            while conn.out:
                n = conn.sock.send(conn.out)
                del conn.out[:n]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._close(conn, events, None)
            return
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
        self.sel.modify(conn.sock, want, conn)

    def _close(self, conn: _Conn, events: Optional[list[LinkEvent]], why: Optional[str]) -> None:
        if self._conns.pop(conn.cid, None) is None:
            return
        if why:
            print(f"[amoe-serve] gateway: closing link connection {conn.cid}: {why}", file=sys.stderr, flush=True)
            try:  # best effort: tell the peer why
                conn.sock.send(wire.encode(ErrorNotice(why).encode()))
            except OSError:
                pass
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        if conn.authed:
            self._lost.append(conn.cid)
