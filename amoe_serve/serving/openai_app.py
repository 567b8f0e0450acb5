"""The OpenAI-compatible HTTP API: `build_app(models, settings) -> FastAPI`.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /metrics. Each served model is a `ModelEntry` (a `DataPlaneLink` to its gateway plus the
checkpoint's tokenizer and chat template); the app only talks to the data plane through the
link protocol of `link_api`.

Decisions (see also the module docs of `protocol`, `chat`, `settings`):
- One prompt per request: `prompt` is a string, a list of token ids, or a one-element list of
  either; a batch of several prompts is answered 400. `n` must be 1, `echo` false, `logprobs` null.
- Unknown request fields are ignored; known fields with wrong types are 422 (schema), values
  that are out of range are 400. Every error body is `{"error": {message, type, param, code}}`.
- Authentication (`settings.api_keys` non-empty) applies to /v1/*; /health and /metrics stay open.
- Model: the body's `model`, else the `serve_multiplexed_model_id` header, else the only model.
- Defaults for temperature/top_p come from the checkpoint's generation_config.json
  (`do_sample: false` -> greedy) when the entry is built with `ModelEntry.from_checkpoint`,
  else OpenAI's (1.0, 1.0).
- Text stop strings: the output text is cut before the first stop string, finish_reason is
  "stop" and the data-plane request is cancelled; `token_ids` holds every token generated up
  to and including the one that completed the stop string.
- Streams (SSE): errors before the first byte get a normal HTTP status; errors after it are
  sent as a final `data: {"error": ...}` event, then `data: [DONE]`.
- A client that goes away (mid-stream or while waiting for a non-stream answer) closes the
  link's generate iterator (`aclose()`), which cancels the request in the data plane.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from amoe_serve.link_wire import LinkProtocolError
from amoe_serve.sampler import SamplingParams
from amoe_serve.serving.chat import ChatTemplate, ChatTemplateError, encode_chat
from amoe_serve.serving.link_api import DataPlaneError, DataPlaneLink
from amoe_serve.serving.metrics import CONTENT_TYPE, ServingMetrics
from amoe_serve.serving.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    HealthResponse,
    ModelList,
    error_body,
    new_id,
    now,
)
from amoe_serve.serving.settings import ServingConfig

log = logging.getLogger(__name__)

MULTIPLEX_HEADER = "serve_multiplexed_model_id"
_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
                429: "rate_limit_error", 500: "server_error", 503: "service_unavailable", 504: "timeout"}
_SEED_MAX = 2**63 - 1
# Longest stop_token_ids list: each generated token is looked up in it on the attention rank, and
# the request must fit in one link frame.
_MAX_STOP_TOKEN_IDS = 1024


# ----------------------------------------------------------------------------- model entries


@dataclass
class ModelEntry:
    """One served model: its link, and (optionally) the checkpoint's tokenizer and chat template.
    Without a tokenizer the model takes token-id prompts only and answers with token ids (text "")."""
    name: str
    link: DataPlaneLink
    tokenizer: Optional[Any] = None  # amoe_serve.tokenizer.Tokenizer
    chat_template: ChatTemplate = field(default_factory=ChatTemplate)
    default_temperature: float = 1.0
    default_top_p: float = 1.0

    @classmethod
    def from_checkpoint(cls, name: str, link: DataPlaneLink, path: str | Path | None) -> "ModelEntry":
        """Tokenizer, chat template and sampling defaults from a checkpoint folder (None: none)."""
        from amoe_serve.tokenizer import Tokenizer

        tok = Tokenizer.from_dir(path) if path is not None else None
        tmpl = ChatTemplate.from_dir(path)
        tmpl.check()  # a broken template is a deployment error, not the clients'
        temp, top_p = 1.0, 1.0
        if path is not None:
            gp = Path(path) / "generation_config.json"
            try:
                gc = json.loads(gp.read_text(encoding="utf-8")) if gp.is_file() else {}
            except (ValueError, UnicodeDecodeError):
                gc = {}
            if gc.get("do_sample") is False:
                temp = 0.0
            elif isinstance(gc.get("temperature"), (int, float)):
                temp = float(gc["temperature"])
            if isinstance(gc.get("top_p"), (int, float)) and 0 < gc["top_p"] <= 1:
                top_p = float(gc["top_p"])
        return cls(name=name, link=link, tokenizer=tok, chat_template=tmpl,
                   default_temperature=temp, default_top_p=top_p)


# ----------------------------------------------------------------------------- errors


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Any = None,
                 type_: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _ERROR_TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _retry_after(seconds: Optional[float], default: float) -> dict:
    s = default if seconds is None or not math.isfinite(seconds) or seconds < 0 else seconds
    return {"Retry-After": str(max(1, math.ceil(s)))}


def _from_dataplane(exc: DataPlaneError, settings: ServingConfig) -> APIError:
    status = exc.status if exc.status in (400, 429, 503) else 503
    headers = _retry_after(exc.retry_after, settings.retry_after_s) if status in (429, 503) and (
        status == 429 or exc.retry_after is not None) else None
    code = {429: "overloaded", 503: "data_plane_unavailable"}.get(status)
    return APIError(status, str(exc) or "data plane error", code=code, headers=headers)


def _validation_message(exc: ValidationError | RequestValidationError) -> tuple[str, Optional[str]]:
    parts, first = [], None
    for err in exc.errors()[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = ".".join(loc) or "body"
        first = first or (loc[0] if loc else None)
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request", first


# ----------------------------------------------------------------------------- decoding


class IncrementalDecoder:
    """Detokenizes a growing list of ids, emitting only stable text: the window
    ids[prefix:] is decoded and compared with ids[prefix:read]; new text is released unless it
    ends with U+FFFD (a UTF-8 character still split across tokens). `flush()` releases the rest."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _delta(self, final: bool) -> str:
        if self.tok is None:
            return ""
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read])
        new_text = self.tok.decode(self.ids[self.prefix:])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._delta(False)

    def flush(self) -> str:
        return self._delta(True)


class OutputText:
    """Generated text with stop strings: holds back the last (longest stop - 1) characters until
    they cannot start a stop string, and cuts the text before the first stop string found."""

    def __init__(self, tokenizer, stops: list[str]):
        self.dec = IncrementalDecoder(tokenizer)
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.token_ids: list[int] = []
        self._pending_ids: list[int] = []
        self.stopped = False

    def _append(self, delta: str) -> None:
        if not delta or self.stopped:
            return
        start = max(0, len(self.text) - self.hold)
        self.text += delta
        best = -1
        for s in self.stops:
            i = self.text.find(s, start)
            if i >= 0 and (best < 0 or i < best):
                best = i
        if best >= 0:
            self.text = self.text[:best]
            self.stopped = True

    def add(self, token: int) -> str:
        self.token_ids.append(token)
        self._pending_ids.append(token)
        self._append(self.dec.add(token))
        return self._release(self.stopped)

    def finish(self) -> str:
        self._append(self.dec.flush())
        return self._release(True)

    def _release(self, final: bool) -> str:
        limit = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent:limit]
        self.sent = limit
        return out

    def take_ids(self) -> list[int]:
        ids, self._pending_ids = self._pending_ids, []
        return ids


# ----------------------------------------------------------------------------- generation


class _LinkStream:
    """The link's generate iterator, closed exactly once (closing cancels the data-plane request)."""

    def __init__(self, it: AsyncIterator):
        self.it = it
        self.closed = False

    async def next(self):
        return await self.it.__anext__()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        aclose = getattr(self.it, "aclose", None)
        if aclose is None:
            return

        async def _do():
            try:
                await aclose()
            except Exception:
                log.exception("closing a data-plane stream failed")

        # Shielded: a cancellation of the caller (client gone) must not cut the cancel short.
        task = asyncio.ensure_future(_do())
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            pass


@dataclass
class _Piece:
    text: str
    token_ids: list[int]
    finish_reason: Optional[str] = None


class _Generation:
    """One admitted request: iterates the link, decodes text, applies stop strings, records metrics."""

    def __init__(self, app_state: "_AppState", entry: ModelEntry, endpoint: str, prompt_ids: list[int],
                 params: dict, stops: list[str]):
        self.s = app_state
        self.entry = entry
        self.endpoint = endpoint
        self.prompt_ids = prompt_ids
        self.params = params
        self.out = OutputText(entry.tokenizer, stops)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + app_state.settings.request_timeout_s if app_state.settings.request_timeout_s > 0 else None
        self.t_last: Optional[float] = None
        self.stream: Optional[_LinkStream] = None
        self.finish_reason: Optional[str] = None
        self._released = False
        self._first: Optional[Any] = None
        m = app_state.metrics
        m.in_flight.labels(entry.name).inc()
        m.prompt_tokens.labels(entry.name).inc(len(prompt_ids))

    @property
    def completion_tokens(self) -> int:
        return len(self.out.token_ids)

    def usage(self) -> dict:
        n, c = len(self.prompt_ids), self.completion_tokens
        return {"prompt_tokens": n, "completion_tokens": c, "total_tokens": n + c}

    async def _next_event(self):
        if self.deadline is None:
            return await self.stream.next()
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        async with asyncio.timeout(remaining):
            return await self.stream.next()

    async def start(self) -> None:
        """Submit and wait for the first event, so that refusals (429/503/400) happen before any
        response byte is sent. Raises APIError."""
        try:
            it = self.entry.link.generate(self.prompt_ids, self.params)
            if not hasattr(it, "__anext__") and inspect.isawaitable(it):  # an `async def` returning one
                it = await it
            self.stream = _LinkStream(it)
            self._first = await self._next_event()
        except StopAsyncIteration:
            self._first = None
        except DataPlaneError as exc:
            raise _from_dataplane(exc, self.s.settings) from None
        except LinkProtocolError as exc:  # e.g. the request does not fit in one link frame
            raise APIError(400, f"the request is too large for the data-plane link: {exc}",
                           code="request_too_large") from None
        except TimeoutError:
            raise APIError(504, f"request timed out after {self.s.settings.request_timeout_s:g} s",
                           code="timeout") from None

    async def pieces(self) -> AsyncIterator[_Piece]:
        """Text/id deltas; the last piece has finish_reason. Raises APIError on failures."""
        m = self.s.metrics
        name = self.entry.name
        ev = self._first
        first = True
        try:
            while True:
                if not first:
                    try:
                        ev = await self._next_event()
                    except StopAsyncIteration:
                        ev = None
                first = False
                if ev is None:  # iterator ended without a finish event
                    self.finish_reason = "stop" if self.out.token_ids else "abort"
                    yield _Piece(self.out.finish(), self.out.take_ids(), self.finish_reason)
                    return
                if ev.token is not None:
                    t = time.monotonic()
                    if self.t_last is None:
                        m.ttft.labels(name).observe(t - self.t0)
                    else:
                        m.itl.labels(name).observe(t - self.t_last)
                    self.t_last = t
                    m.generated_tokens.labels(name).inc()
                    text = self.out.add(int(ev.token))
                    if self.out.stopped:
                        await self.stream.close()  # cancel the rest in the data plane
                        self.finish_reason = "stop"
                        yield _Piece(text, self.out.take_ids(), "stop")
                        return
                    if ev.finish_reason is None:
                        # Without a tokenizer there is no text to wait for: stream the ids.
                        if text or self.entry.tokenizer is None:
                            yield _Piece(text, self.out.take_ids())
                        continue
                else:
                    text = ""
                if ev.finish_reason == "error":
                    raise APIError(503, f"data plane error: {ev.error or 'unknown'}", code="data_plane_error")
                if ev.finish_reason is not None:
                    text += self.out.finish()
                    reason = "stop" if self.out.stopped else ev.finish_reason
                    self.finish_reason = reason
                    yield _Piece(text, self.out.take_ids(), reason)
                    return
        except DataPlaneError as exc:
            raise _from_dataplane(exc, self.s.settings) from None
        except TimeoutError:
            raise APIError(504, f"request timed out after {self.s.settings.request_timeout_s:g} s",
                           code="timeout") from None

    async def release(self) -> None:
        """Close the link stream (cancels an unfinished request) and free the admission slot."""
        if self._released:
            return
        self._released = True
        try:
            if self.stream is not None:
                await self.stream.close()
        finally:
            m = self.s.metrics
            m.in_flight.labels(self.entry.name).dec()
            m.latency.labels(self.endpoint, self.entry.name).observe(time.monotonic() - self.t0)
            m.finished.labels(self.entry.name, self.finish_reason or "cancelled").inc()
            self.s.active -= 1


# ----------------------------------------------------------------------------- responses


async def _forever() -> None:
    await asyncio.Event().wait()


async def _wait_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return
        await asyncio.sleep(0.01)  # an odd server answering other messages must not spin us


class _ClientGone(Exception):
    pass


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


_DONE = b"data: [DONE]\n\n"


class SSEResponse(Response):
    """Streams `chunks` as server-sent events while watching for the client going away; on any
    exit (done, error, disconnect, cancellation) `cleanup` runs, which closes the link stream."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes], cleanup, watch_disconnect: bool = True):
        # No Response.__init__: it would render an empty body and declare Content-Length: 0.
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.chunks = chunks
        self.cleanup = cleanup
        self.watch_disconnect = watch_disconnect

    async def __call__(self, scope, receive, send) -> None:
        async def pump():
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        pump_task = asyncio.ensure_future(pump())
        watch_task = asyncio.ensure_future(_wait_disconnect(receive) if self.watch_disconnect else _forever())
        try:
            done, _ = await asyncio.wait({pump_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
            if pump_task in done:
                exc = pump_task.exception()
                if exc is not None and not isinstance(exc, OSError):  # OSError: the client went away
                    raise exc
        finally:
            for t in (pump_task, watch_task):
                if not t.done():
                    t.cancel()
            await asyncio.gather(pump_task, watch_task, return_exceptions=True)
            try:
                await self.chunks.aclose()  # type: ignore[attr-defined]
            except Exception:
                pass
            await self.cleanup()


# ----------------------------------------------------------------------------- OpenAPI

# The routes read and validate their bodies themselves (size limit first, then JSON, then the
# pydantic model), so the request bodies and error answers are declared here for the OpenAPI
# document (`app.openapi()`; not served: openapi_url is None).


def _sse_doc(chunk_cls) -> dict:
    """An SSE stream, described per event (OpenAPI 3.1: `schema` of text/event-stream is one
    event): `data` is a JSON chunk, a JSON error (after the stream started), or [DONE]."""
    payload = {"oneOf": [{"$ref": f"#/components/schemas/{chunk_cls.__name__}"},
                         {"$ref": "#/components/schemas/ErrorResponse"}]}
    event = {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
        {"const": "[DONE]"},
        {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}]}}}
    return {"text/event-stream": {"schema": event}}


_GEN_ERRORS = {
    400: "a value the model or server cannot take (prompt too long, n > 1, unknown token id, ...)",
    401: "missing or invalid API key", 404: "unknown model", 413: "request body too large",
    422: "body is not JSON or does not match the schema", 429: "overloaded; see Retry-After",
    503: "data plane unavailable or failed", 504: "request timed out",
}


def _errors(codes: dict[int, str]) -> dict:
    return {c: {"model": ErrorResponse, "description": d} for c, d in codes.items()}


def _body_doc(model_cls) -> dict:
    return {
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model_cls.__name__}"}}}},
        "parameters": [{"name": MULTIPLEX_HEADER, "in": "header", "required": False,
                        "schema": {"type": "string"},
                        "description": "model to use when the body has no 'model'"}],
        "security": [{"bearerAuth": []}],
    }


def _gen_route_doc(request_cls, response_cls, chunk_cls) -> dict:
    return {"openapi_extra": _body_doc(request_cls),
            "responses": {200: {"model": response_cls, "content": _sse_doc(chunk_cls),
                                "description": "the completion (JSON), or with stream=true an SSE stream"},
                          **_errors(_GEN_ERRORS)}}


def _openapi_document(app: FastAPI) -> dict:
    from fastapi.openapi.utils import get_openapi
    from pydantic.json_schema import models_json_schema

    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _, defs = models_json_schema([(CompletionRequest, "validation"), (ChatCompletionRequest, "validation"),
                                      (CompletionChunk, "serialization"), (ChatCompletionChunk, "serialization")],
                                     ref_template="#/components/schemas/{model}")
        comps = doc.setdefault("components", {})
        comps.setdefault("schemas", {}).update(defs.get("$defs", {}))
        comps["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
        app.openapi_schema = doc
    return app.openapi_schema


# ----------------------------------------------------------------------------- the app


class _AppState:
    def __init__(self, models: dict[str, ModelEntry], settings: ServingConfig):
        self.models = models
        self.settings = settings
        self.metrics = ServingMetrics()
        self.active = 0


def build_app(links: dict[str, ModelEntry], settings: Optional[ServingConfig] = None,
              watch_disconnect: bool = True) -> FastAPI:
    """The OpenAI-compatible app serving `links` ({served name: ModelEntry}).

    watch_disconnect: watch the ASGI `receive` channel for `http.disconnect` while generating
    (works under uvicorn and Ray Serve). With False, only a cancellation of the request task
    (which Ray Serve's proxy also does when the client goes away) closes the link stream."""
    settings = settings or ServingConfig()
    models = dict(links)
    for name, entry in models.items():
        if entry.name != name:
            raise ValueError(f"ModelEntry {entry.name!r} registered under another name {name!r}")
    st = _AppState(models, settings)
    app = FastAPI(title="AMoE-serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.amoe = st
    keys = [k.encode() for k in settings.api_keys]

    # -------------------------------------------------------------- errors

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        msg, param = _validation_message(exc)
        return APIError(422, msg, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            msg = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            msg = f"method {request.method} not allowed on {request.url.path}"
        else:
            msg = str(exc.detail)
        return APIError(exc.status_code, msg, headers=dict(exc.headers or {})).response()

    # Outermost user middleware: count every answer, and turn any unexpected exception into an
    # OpenAI-shaped 500 (there should be no path to it).
    @app.exception_handler(_ClientGone)
    async def _client_gone(request: Request, exc: _ClientGone):
        return Response(status_code=499)  # nobody reads it; recorded in the metrics

    class _Observe:
        def __init__(self, app):
            self.inner = app

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            status = {"code": 500, "started": False}

            async def send_wrapper(message):
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                    status["started"] = True
                await send(message)

            try:
                await self.inner(scope, receive, send_wrapper)
            except Exception:
                log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
                if not status["started"]:
                    resp = APIError(500, "internal server error").response()
                    await resp(scope, receive, send_wrapper)
            finally:
                path = scope.get("path", "")
                endpoint = path if path in _ENDPOINTS else "other"
                model = (scope.get("state") or {}).get("amoe_model", "")
                st.metrics.requests.labels(endpoint, model, str(status["code"])).inc()

    app.add_middleware(_Observe)

    # -------------------------------------------------------------- helpers

    def check_auth(request: Request) -> None:
        if not keys:
            return
        h = request.headers.get("authorization", "")
        scheme, _, token = h.partition(" ")
        token = token.strip().encode()
        ok = scheme.lower() == "bearer" and token and any(hmac.compare_digest(token, k) for k in keys)
        if not ok:
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_json(request: Request) -> dict:
        limit = settings.max_body_bytes
        cl = request.headers.get("content-length")
        if cl is not None:
            try:
                n = int(cl)
            except ValueError:
                raise APIError(400, "invalid Content-Length header") from None
            if n > limit:
                raise APIError(413, f"request body of {n} bytes exceeds the limit of {limit} bytes",
                               code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
        try:
            data = json.loads(bytes(body))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise APIError(422, f"request body is not valid JSON: {str(exc)[:200]}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(422, "request body must be a JSON object", code="invalid_json")
        return data

    def parse(model_cls, data: dict):
        try:
            return model_cls.model_validate(data)
        except ValidationError as exc:
            msg, param = _validation_message(exc)
            raise APIError(422, msg, param=param) from None
        except RecursionError:
            raise APIError(422, "request body is nested too deeply") from None

    def select(request: Request, name: Optional[str]) -> ModelEntry:
        name = name or request.headers.get(MULTIPLEX_HEADER) or None
        if name is None:
            if len(models) == 1:
                entry = next(iter(models.values()))
            else:
                raise APIError(400, f"'model' is required; available models: {', '.join(sorted(models))}",
                               param="model")
        elif name not in models:
            raise APIError(404, f"model {name!r} not found; available models: {', '.join(sorted(models))}",
                           param="model", code="model_not_found")
        else:
            entry = models[name]
        request.state.amoe_model = entry.name
        return entry

    def check_ids(entry: ModelEntry, ids: list[int], what: str) -> None:
        vocab = entry.link.info.vocab_size
        for t in ids:
            if not (0 <= t < vocab):
                raise APIError(400, f"{what} contains token id {t}, outside the vocabulary [0, {vocab})",
                               param=what)

    def sampling(entry: ModelEntry, req, prompt_ids: list[int], max_tokens: Optional[int],
                 default_max: Optional[int]) -> tuple[dict, list[str]]:
        if req.n != 1:
            raise APIError(400, f"n={req.n} is not supported: only n=1", param="n")
        max_len = entry.link.info.max_model_len
        n = len(prompt_ids)
        if n == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        prompt_limit = max_len - 1
        if settings.max_prompt_tokens > 0:
            prompt_limit = min(prompt_limit, settings.max_prompt_tokens)
        if n > prompt_limit:
            raise APIError(400, f"the prompt has {n} tokens, more than the limit of {prompt_limit} "
                                f"(max_model_len {max_len})", param="prompt", code="context_length_exceeded")
        room = max_len - n
        limit = settings.max_tokens_limit
        if max_tokens is None:
            mt = room if default_max is None else default_max
            mt = min(mt, room)
            if limit > 0:
                mt = min(mt, limit)
        else:
            mt = max_tokens
            if mt < 1:
                raise APIError(400, f"max_tokens must be >= 1, got {mt}", param="max_tokens")
            if limit > 0 and mt > limit:
                raise APIError(400, f"max_tokens={mt} exceeds the limit of {limit}", param="max_tokens")
            if n + mt > max_len:
                raise APIError(400, f"prompt ({n} tokens) + max_tokens ({mt}) exceeds max_model_len ({max_len})",
                               param="max_tokens", code="context_length_exceeded")
        stops = req.stop_list()
        if stops:
            if entry.tokenizer is None:
                raise APIError(400, f"model {entry.name!r} has no tokenizer: text stop strings are not supported",
                               param="stop")
            if len(stops) > settings.max_stop_strings:
                raise APIError(400, f"at most {settings.max_stop_strings} stop strings", param="stop")
            if any(s == "" for s in stops):
                raise APIError(400, "stop strings must not be empty", param="stop")
        stop_ids = list(req.stop_token_ids or [])
        if len(stop_ids) > _MAX_STOP_TOKEN_IDS:
            raise APIError(400, f"at most {_MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(stop_ids)}",
                           param="stop_token_ids")
        check_ids(entry, stop_ids, "stop_token_ids")
        if req.seed is not None and not (0 <= req.seed <= _SEED_MAX):
            raise APIError(400, f"seed must be in [0, 2^63), got {req.seed}", param="seed")
        params = {
            "max_tokens": mt,
            "temperature": entry.default_temperature if req.temperature is None else req.temperature,
            "top_p": entry.default_top_p if req.top_p is None else req.top_p,
            "seed": req.seed,
            "stop_token_ids": stop_ids,
            "ignore_eos": req.ignore_eos,
        }
        try:
            SamplingParams.from_dict(params)
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        return params, stops

    def admit() -> None:
        if st.active >= settings.max_concurrent_requests:
            raise APIError(429, f"too many requests in flight on this replica "
                                f"(max_concurrent_requests={settings.max_concurrent_requests}); retry later",
                           code="too_many_requests", headers=_retry_after(None, settings.retry_after_s))
        st.active += 1

    async def run(request: Request, entry: ModelEntry, endpoint: str, prompt_ids: list[int], params: dict,
                  stops: list[str], stream: bool, include_usage: bool, shape: str) -> Response:
        admit()
        gen = _Generation(st, entry, endpoint, prompt_ids, params, stops)
        try:
            await _race_disconnect(request, gen.start(), watch_disconnect)
        except BaseException:
            await gen.release()
            raise
        rid = new_id("chatcmpl" if shape == "chat" else "cmpl")
        created = now()
        if not stream:
            try:
                text, ids, reason = await _race_disconnect(request, _collect(gen), watch_disconnect)
            finally:
                await gen.release()
            return JSONResponse(_final_body(shape, rid, created, entry.name, text, ids, reason, gen.usage()))
        return SSEResponse(_sse_chunks(gen, shape, rid, created, entry.name, include_usage), gen.release,
                           watch_disconnect)

    # -------------------------------------------------------------- routes

    app.openapi = lambda: _openapi_document(app)  # type: ignore[method-assign]

    @app.post("/v1/completions", **_gen_route_doc(CompletionRequest, CompletionResponse, CompletionChunk))
    async def completions(request: Request):
        check_auth(request)
        req: CompletionRequest = parse(CompletionRequest, await read_json(request))
        entry = select(request, req.model)
        if req.echo:
            raise APIError(400, "echo=true is not supported", param="echo")
        if req.logprobs is not None:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if req.suffix is not None:
            raise APIError(400, "suffix is not supported", param="suffix")
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, f"batched prompts are not supported: send one prompt per request "
                                    f"(got {len(prompt)})", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if entry.tokenizer is None:
                raise APIError(400, f"model {entry.name!r} has no tokenizer: send the prompt as token ids",
                               param="prompt")
            if not prompt:
                raise APIError(400, "the prompt is empty", param="prompt")
            ids = entry.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            check_ids(entry, ids, "prompt")
        params, stops = sampling(entry, req, ids, req.max_tokens, settings.default_max_tokens)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await run(request, entry, "/v1/completions", ids, params, stops, req.stream, include_usage,
                         "completion")

    @app.post("/v1/chat/completions",
              **_gen_route_doc(ChatCompletionRequest, ChatCompletionResponse, ChatCompletionChunk))
    async def chat_completions(request: Request):
        check_auth(request)
        req: ChatCompletionRequest = parse(ChatCompletionRequest, await read_json(request))
        entry = select(request, req.model)
        if req.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if entry.tokenizer is None:
            raise APIError(400, f"model {entry.name!r} has no tokenizer: use /v1/completions with token ids",
                           param="model")
        messages = [m.model_dump(exclude_none=False) for m in req.messages]
        try:
            text = entry.chat_template.render(messages, add_generation_prompt=req.add_generation_prompt)
        except ChatTemplateError as exc:
            raise APIError(400, str(exc), param="messages") from None
        ids = encode_chat(entry.tokenizer, entry.chat_template, text)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params, stops = sampling(entry, req, ids, max_tokens, None)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await run(request, entry, "/v1/chat/completions", ids, params, stops, req.stream, include_usage,
                         "chat")

    @app.get("/v1/models", response_model=None, openapi_extra={"security": [{"bearerAuth": []}]},
             responses={200: {"model": ModelList}, **_errors({401: "missing or invalid API key"})})
    async def list_models(request: Request):
        check_auth(request)
        created = now()
        data = [{"id": name, "object": "model", "created": created, "owned_by": "amoe-serve",
                 "max_model_len": e.link.info.max_model_len} for name, e in models.items()]
        return {"object": "list", "data": data}

    @app.get("/health", response_model=None,
             responses={200: {"model": HealthResponse}, 503: {"model": HealthResponse,
                                                              "description": "a model's data plane is down"}})
    async def health():
        async def one(entry: ModelEntry) -> str:
            try:
                return await asyncio.wait_for(entry.link.health_state(), 5.0)
            except Exception:
                return "down"

        states = await asyncio.gather(*(one(e) for e in models.values()))
        status = dict(zip(models, states))
        down = [n for n, s in status.items() if s != "ok"]
        if not down:
            return {"status": "ok", "models": status}
        what = ", ".join(f"{n} ({status[n]})" for n in down)
        body = APIError(503, f"data plane not serving for model(s): {what}",
                        code="data_plane_unavailable").body()
        body.update({"status": "unavailable", "models": status})
        return JSONResponse(body, status_code=503)

    @app.get("/metrics", response_model=None, response_class=Response,
             responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}})
    async def metrics():
        await st.metrics.refresh_dataplane({n: e.link for n, e in models.items()})
        return Response(st.metrics.render(), media_type=CONTENT_TYPE)

    return app


async def _race_disconnect(request: Request, coro, watch: bool = True):
    """Run coro unless the client goes away first (then coro is cancelled; raises _ClientGone
    -> the answer is never read, the generation stream gets closed by the caller)."""
    if not watch:
        return await coro
    task = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise _ClientGone()
    finally:
        for t in (task, watch):
            if not t.done():
                t.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)


async def _collect(gen: _Generation) -> tuple[str, list[int], str]:
    text, ids, reason = [], [], None
    async for p in gen.pieces():
        text.append(p.text)
        ids.extend(p.token_ids)
        reason = p.finish_reason or reason
    return "".join(text), ids, reason or "stop"


def _final_body(shape: str, rid: str, created: int, model: str, text: str, ids: list[int], reason: str,
                usage: dict) -> dict:
    if shape == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                  "logprobs": None, "token_ids": ids}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None, "token_ids": ids}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice], "usage": usage}


async def _sse_chunks(gen: _Generation, shape: str, rid: str, created: int, model: str,
                      include_usage: bool) -> AsyncIterator[bytes]:
    obj = "chat.completion.chunk" if shape == "chat" else "text_completion"

    def chunk(text: Optional[str], ids: list[int], reason: Optional[str], role: bool = False) -> dict:
        if shape == "chat":
            delta: dict = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None, "token_ids": ids}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None, "token_ids": ids}
        c = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
        if include_usage:
            c["usage"] = None
        return c

    try:
        if shape == "chat":
            yield _sse(chunk("", [], None, role=True))
        async for p in gen.pieces():
            if p.finish_reason is None:
                yield _sse(chunk(p.text, p.token_ids, None))
                continue
            ids = p.token_ids
            if p.text:
                yield _sse(chunk(p.text, ids, None))
                ids = []
            yield _sse(chunk(None if shape == "chat" else "", ids, p.finish_reason))
        if include_usage:
            yield _sse({"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                        "usage": gen.usage()})
    except APIError as exc:
        log.info("stream %s failed after it started: %s", rid, exc.message)
        yield _sse(exc.body())
    except Exception:
        log.exception("stream %s failed", rid)
        yield _sse(APIError(500, "internal server error").body())
    yield _DONE
