"""Frames of the ingress <-> gateway link: 4-byte big-endian length, then a UTF-8 JSON object.

No pickle, a hard size limit, and an HMAC challenge-response handshake so the shared token
never crosses the wire.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import struct

from amoe_serve.errors import AmoeError

VERSION = 1
MAX_FRAME_BYTES = 1 << 20
_LEN = struct.Struct(">I")


class LinkProtocolError(AmoeError):
    """The peer sent something that is not a valid frame; the connection must be closed."""


def encode(obj: dict) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME_BYTES:
        raise LinkProtocolError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    return _LEN.pack(len(body)) + body


class FrameReader:
    """Incremental decoder: feed bytes as they arrive, get whole frames back."""

    def __init__(self, max_frame: int = MAX_FRAME_BYTES):
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict]:
        self._buf += data
        out = []
        while len(self._buf) >= 4:
            (n,) = _LEN.unpack_from(self._buf)
            if n > self.max_frame:
                raise LinkProtocolError(f"frame of {n} bytes exceeds the {self.max_frame}-byte limit")
            if len(self._buf) < 4 + n:
                break
            body = bytes(self._buf[4:4 + n])
            del self._buf[:4 + n]
            out.append(decode_body(body))
        return out


def decode_body(body: bytes) -> dict:
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, ints over 4300 digits, deep nesting
        raise LinkProtocolError(f"frame is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise LinkProtocolError("frame is not a JSON object with a string 'type'")
    return obj


def new_nonce() -> str:
    return secrets.token_hex(16)


def mac(token: str, nonce: str) -> str:
    return hmac.new(token.encode(), nonce.encode(), hashlib.sha256).hexdigest()


def verify(token: str, nonce: str, got: object) -> bool:
    # compare_digest raises TypeError on non-ASCII str: a hostile MAC must be a refusal, not a crash.
    return isinstance(got, str) and got.isascii() and hmac.compare_digest(mac(token, nonce), got)
