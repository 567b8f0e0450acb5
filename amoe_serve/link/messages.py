"""Every message of the ingress <-> gateway link: one frozen dataclass each, with one `encode()`
(the JSON object `wire.encode` frames) and one `decode()` that checks it and raises
`MessageError` on anything malformed. Keys a message does not know are ignored, so a newer
peer may add some. Request ids are the client's own; the gateway scopes them per connection.

Handshake (gateway's `server.py`, ingress's `client.py`):
  gateway -> client  Challenge   {"type": "challenge", "nonce": hex, "version": int}
  client -> gateway  Auth        {"type": "auth", "mac": HMAC-SHA256(token, nonce) hex}
  gateway -> client  Ready       {"type": "ready", "info": {ModelInfo fields}}
                     (a wrong MAC gets an ErrorNotice, then the connection closes)
Client -> gateway, once ready:
  Generate     {"type": "generate", "id", "prompt_token_ids": [int, ...], "params": {SamplingParams fields}}
  Cancel       {"type": "cancel", "id"}          the request ends with an "abort" event (KV freed)
  StatsQuery   {"type": "stats", "seq": int}     -> StatsReply with the same seq
  Ping         {"type": "ping", "seq": int}      -> Pong with the same seq
Gateway -> client:
  Tokens       {"type": "tokens", "events": [TokenEvent.to_wire(), ...]}, each event
               [id, token, finish_reason, error(, logprobs, prompt_logprobs)]; the last of a
               request has a finish_reason
  Rejected     {"type": "rejected", "id", "status": 400 | 429 | 503, "error"(, "retry_after": s)}
               400 bad request, 429 queue full, 503 draining
  StatsReply   {"type": "stats", "seq", "data": {"ranks": {rank: counters}, "gateway": GatewayState,
               "serving": ServingState}}
  Pong         {"type": "pong", "seq", "healthy": bool, "draining": bool}
  ErrorNotice  {"type": "error", "error"}  a frame the gateway cannot use (the connection stays),
               or why it closes the connection
"""

from __future__ import annotations

import reprlib
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Optional, Union

from amoe_serve.errors import AmoeError
from amoe_serve.link.api import ModelInfo
from amoe_serve.token_events import TokenEvent

MAX_ID_CHARS = 256


class MessageError(AmoeError, ValueError):
    """A frame that is valid JSON but not a valid message. `kind` is its "type"; `request_id`
    is its "id" when that was a string, so a bad Generate can still be rejected by id."""

    def __init__(self, kind: object, detail: str, request_id: Optional[str] = None):
        super().__init__(self._text(kind, detail))
        self.kind, self.detail, self.request_id = kind, detail, request_id

    @staticmethod
    def _text(kind: object, detail: str) -> str:
        return f"malformed {kind!r} message: {detail}"


class UnknownMessage(MessageError):
    """A "type" this side does not take (or no string "type" at all)."""

    @staticmethod
    def _text(kind: object, detail: str) -> str:
        return f"unknown message type {kind!r}"


# ---- field checks ---------------------------------------------------------------------------
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # JSON true is no count


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


_REQUIRED = object()


def _get(obj: dict, key: str, ok, want: str, *, default: Any = _REQUIRED, rid: Optional[str] = None) -> Any:
    """obj[key] if ok(obj[key]); `default` (when given) if the key is absent; else MessageError."""
    if key not in obj and default is not _REQUIRED:
        return default
    v = obj.get(key)
    if not ok(v):
        # reprlib: bounded in size and depth, so a hostile value cannot cost much or recurse deep.
        raise MessageError(obj.get("type"), f"{key!r} must be {want}, got {reprlib.repr(v)}", rid)
    return v


def _str(x: Any) -> bool:
    return isinstance(x, str)


def _bool(x: Any) -> bool:
    return isinstance(x, bool)


def _int_dict(x: Any) -> bool:
    return isinstance(x, dict) and all(isinstance(k, str) and _is_int(v) for k, v in x.items())


def _expect(obj: Any, kind: str) -> None:
    if not isinstance(obj, dict) or obj.get("type") != kind:
        got = obj.get("type") if isinstance(obj, dict) else type(obj).__name__
        raise MessageError(got, f"expected a {kind!r} message")


# ---- handshake ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Challenge:
    TYPE: ClassVar[str] = "challenge"
    nonce: str
    version: int

    def encode(self) -> dict:
        return {"type": self.TYPE, "nonce": self.nonce, "version": self.version}

    @classmethod
    def decode(cls, obj: dict) -> "Challenge":
        _expect(obj, cls.TYPE)
        return cls(_get(obj, "nonce", _str, "a string"), _get(obj, "version", _is_int, "an integer"))


@dataclass(frozen=True)
class Auth:
    TYPE: ClassVar[str] = "auth"
    mac: str

    def encode(self) -> dict:
        return {"type": self.TYPE, "mac": self.mac}

    @classmethod
    def decode(cls, obj: dict) -> "Auth":
        _expect(obj, cls.TYPE)
        return cls(_get(obj, "mac", _str, "a string"))


@dataclass(frozen=True)
class Ready:
    TYPE: ClassVar[str] = "ready"
    info: ModelInfo

    def encode(self) -> dict:
        return {"type": self.TYPE, "info": asdict(self.info)}

    @classmethod
    def decode(cls, obj: dict) -> "Ready":
        _expect(obj, cls.TYPE)
        i = _get(obj, "info", lambda x: isinstance(x, dict), "an object")
        sub = {"type": cls.TYPE, **i}  # so errors name the message
        return cls(ModelInfo(
            _get(sub, "name", _str, "a string"),
            _get(sub, "max_model_len", _is_int, "an integer"),
            _get(sub, "vocab_size", _is_int, "an integer"),
            list(_get(sub, "eos_token_ids", lambda x: isinstance(x, list) and all(map(_is_int, x)),
                      "a list of integers", default=[])),
            _get(sub, "max_queued_requests", _is_int, "an integer", default=0),
            # A gateway that does not say cannot build grammar masks.
            _get(sub, "structured_output", _bool, "a boolean", default=False)))


# ---- client -> gateway ----------------------------------------------------------------------
def _id_ok(x: Any) -> bool:
    return isinstance(x, str) and 0 < len(x) <= MAX_ID_CHARS


@dataclass(frozen=True)
class Generate:
    TYPE: ClassVar[str] = "generate"
    id: str
    prompt_token_ids: list[int]
    params: dict  # SamplingParams.to_dict(); the gateway parses it (its errors become a 400)

    def encode(self) -> dict:
        return {"type": self.TYPE, "id": self.id, "prompt_token_ids": list(self.prompt_token_ids),
                "params": self.params}

    @classmethod
    def decode(cls, obj: dict) -> "Generate":
        _expect(obj, cls.TYPE)
        raw = obj.get("id")
        rid = raw if isinstance(raw, str) else None
        return cls(
            _get(obj, "id", _id_ok, f"a non-empty string of at most {MAX_ID_CHARS} characters", rid=rid),
            _get(obj, "prompt_token_ids", lambda x: isinstance(x, list) and x and all(map(_is_int, x)),
                 "a non-empty list of token ids", rid=rid),
            _get(obj, "params", lambda x: x is None or isinstance(x, dict), "an object", default=None, rid=rid)
            or {})


@dataclass(frozen=True)
class Cancel:
    TYPE: ClassVar[str] = "cancel"
    id: str

    def encode(self) -> dict:
        return {"type": self.TYPE, "id": self.id}

    @classmethod
    def decode(cls, obj: dict) -> "Cancel":
        _expect(obj, cls.TYPE)
        return cls(_get(obj, "id", _str, "a string"))


@dataclass(frozen=True)
class StatsQuery:
    TYPE: ClassVar[str] = "stats"
    seq: int

    def encode(self) -> dict:
        return {"type": self.TYPE, "seq": self.seq}

    @classmethod
    def decode(cls, obj: dict) -> "StatsQuery":
        _expect(obj, cls.TYPE)
        return cls(_get(obj, "seq", _is_int, "an integer"))


@dataclass(frozen=True)
class Ping:
    TYPE: ClassVar[str] = "ping"
    seq: int

    def encode(self) -> dict:
        return {"type": self.TYPE, "seq": self.seq}

    @classmethod
    def decode(cls, obj: dict) -> "Ping":
        _expect(obj, cls.TYPE)
        return cls(_get(obj, "seq", _is_int, "an integer"))


# ---- gateway -> client ----------------------------------------------------------------------
@dataclass(frozen=True)
class Tokens:
    TYPE: ClassVar[str] = "tokens"
    events: tuple[TokenEvent, ...]

    def encode(self) -> dict:
        return {"type": self.TYPE, "events": [e.to_wire() for e in self.events]}

    @classmethod
    def decode(cls, obj: dict) -> "Tokens":
        _expect(obj, cls.TYPE)
        evs = _get(obj, "events", lambda x: isinstance(x, list), "a list")
        try:
            return cls(tuple(TokenEvent.from_wire(w) for w in evs))
        except ValueError as e:
            raise MessageError(cls.TYPE, str(e)) from None


@dataclass(frozen=True)
class Rejected:
    TYPE: ClassVar[str] = "rejected"
    id: Optional[str]  # None when the refused Generate had no usable id
    status: int        # the HTTP status the ingress answers with
    error: str
    retry_after: Optional[float] = None  # seconds, with 429 and 503

    def encode(self) -> dict:
        out = {"type": self.TYPE, "id": self.id, "status": self.status, "error": self.error}
        if self.retry_after is not None:
            out["retry_after"] = self.retry_after
        return out

    @classmethod
    def decode(cls, obj: dict) -> "Rejected":
        _expect(obj, cls.TYPE)
        return cls(_get(obj, "id", lambda x: x is None or isinstance(x, str), "a string or null"),
                   _get(obj, "status", lambda x: _is_int(x) and 400 <= x <= 599, "an HTTP error status"),
                   _get(obj, "error", _str, "a string"),
                   _get(obj, "retry_after", lambda x: x is None or (_is_number(x) and x >= 0),
                        "a number of seconds", default=None))


@dataclass(frozen=True)
class GatewayState:
    waiting: int                    # admitted, not yet placed on an attention rank
    running: int                    # placed on an attention rank
    kv_free_blocks: dict[str, int]  # attention rank -> free KV blocks


@dataclass(frozen=True)
class ServingState:
    kv_blocks_per_rank: int
    connections: int  # open link connections, authenticated or not
    draining: bool


@dataclass(frozen=True)
class StatsReply:
    TYPE: ClassVar[str] = "stats"
    seq: int
    ranks: dict[str, dict]  # rank -> its latest STATS header (RankCounters.to_dict() and more)
    gateway: GatewayState
    serving: ServingState

    def as_dict(self) -> dict:
        """The "data" object: what `DataPlaneLink.stats()` returns."""
        return {"ranks": self.ranks, "gateway": asdict(self.gateway), "serving": asdict(self.serving)}

    def encode(self) -> dict:
        return {"type": self.TYPE, "seq": self.seq, "data": self.as_dict()}

    @classmethod
    def decode(cls, obj: dict) -> "StatsReply":
        _expect(obj, cls.TYPE)
        seq = _get(obj, "seq", _is_int, "an integer")
        d = _get(obj, "data", lambda x: isinstance(x, dict), "an object")
        d = {"type": cls.TYPE, **d}
        ranks = _get(d, "ranks", lambda x: isinstance(x, dict) and all(
            isinstance(k, str) and isinstance(v, dict) for k, v in x.items()), "an object of objects")
        g = {"type": cls.TYPE, **_get(d, "gateway", lambda x: isinstance(x, dict), "an object")}
        s = {"type": cls.TYPE, **_get(d, "serving", lambda x: isinstance(x, dict), "an object")}
        return cls(seq, ranks,
                   GatewayState(_get(g, "waiting", _is_int, "an integer"), _get(g, "running", _is_int, "an integer"),
                                _get(g, "kv_free_blocks", _int_dict, "an object of integers")),
                   ServingState(_get(s, "kv_blocks_per_rank", _is_int, "an integer"),
                                _get(s, "connections", _is_int, "an integer"),
                                _get(s, "draining", _bool, "a boolean")))


@dataclass(frozen=True)
class Pong:
    TYPE: ClassVar[str] = "pong"
    seq: int
    healthy: bool   # accepting requests
    draining: bool  # shutting down: finishing what runs, refusing new requests

    def encode(self) -> dict:
        return {"type": self.TYPE, "seq": self.seq, "healthy": self.healthy, "draining": self.draining}

    @classmethod
    def decode(cls, obj: dict) -> "Pong":
        _expect(obj, cls.TYPE)
        return cls(_get(obj, "seq", _is_int, "an integer"), _get(obj, "healthy", _bool, "a boolean"),
                   _get(obj, "draining", _bool, "a boolean"))


@dataclass(frozen=True)
class ErrorNotice:
    TYPE: ClassVar[str] = "error"
    error: str

    def encode(self) -> dict:
        return {"type": self.TYPE, "error": self.error}

    @classmethod
    def decode(cls, obj: dict) -> "ErrorNotice":
        _expect(obj, cls.TYPE)
        return cls(_get(obj, "error", _str, "a string"))


# ---- by direction ---------------------------------------------------------------------------
ClientMessage = Union[Generate, Cancel, StatsQuery, Ping]
GatewayMessage = Union[Tokens, Rejected, StatsReply, Pong, ErrorNotice]
Message = Union[Challenge, Auth, Ready, ClientMessage, GatewayMessage]

FROM_CLIENT = {c.TYPE: c for c in (Generate, Cancel, StatsQuery, Ping)}
FROM_GATEWAY = {c.TYPE: c for c in (Tokens, Rejected, StatsReply, Pong, ErrorNotice)}


def decode(obj: dict, kinds: dict[str, type]) -> Any:
    """The message `obj` is, among `kinds` (FROM_CLIENT, FROM_GATEWAY or {TYPE: class})."""
    kind = obj.get("type") if isinstance(obj, dict) else None
    cls = kinds.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise UnknownMessage(kind, "")
    return cls.decode(obj)
