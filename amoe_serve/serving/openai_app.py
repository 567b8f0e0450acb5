"""The OpenAI-compatible HTTP API: `build_app(models, settings) -> FastAPI`.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /metrics, and vLLM's POST /tokenize, POST /detokenize, GET /tokenizer_info. Each served model is a `ModelEntry` (a `DataPlaneLink` to its gateway plus the
checkpoint's tokenizer and chat template); the app only talks to the data plane through the
link protocol of `amoe_serve.link.api`.

Decisions (see also the module docs of `protocol`, `chat`, `settings`):
- vLLM's semantics for completions and chat (see docs/api.md): batched prompts, `n`, `echo`,
  `logprobs` / `top_logprobs` / `prompt_logprobs`, penalties, `logit_bias`, `top_k`, `min_p`,
  `min_tokens`, structured output; request -> data-plane parameters in `sampling_args`,
  answers in `respond`, one data-plane request per prompt and sample in `generation`.
- Unknown request fields are ignored, except those vLLM knows and this server does not
  implement (`sampling_args.UNSUPPORTED`: 400 naming them); known fields with wrong types are
  422 (schema), values that are out of range are 400. Every error body is `{"error": {message, type, param, code}}`.
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
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from amoe_serve.sampler import MAX_LOGPROBS
from amoe_serve.serving.chat import ChatTemplate
from amoe_serve.serving.errors import APIError, retry_after, validation_message
from amoe_serve.serving.generation import Generation
from amoe_serve.link.api import DataPlaneLink
from amoe_serve.serving.logprobs_out import token_str_fn
from amoe_serve.serving.prompts import render_chat
from amoe_serve.serving.respond import Choice, Shape, final_body, sse_chunks
from amoe_serve.serving.sampling_args import (Prepared, check_common, check_ids, prepare, refuse_unsupported,
                                              sample_seed, structured_spec)
from amoe_serve.serving.tokenize_routes import add_tokenizer_routes
from amoe_serve.serving.metrics import CONTENT_TYPE, ServingMetrics
from amoe_serve.serving.api_models import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    TokenizeRequest,
    ErrorResponse,
    HealthResponse,
    ModelList,
    new_id,
    now,
)
from amoe_serve.serving.settings import ServingConfig
from amoe_serve.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MULTIPLEX_HEADER = "serve_multiplexed_model_id"
_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics",
              "/tokenize", "/detokenize", "/tokenizer_info")


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
    tokenizer_config: dict = field(default_factory=dict)  # for /tokenizer_info

    @classmethod
    def from_checkpoint(cls, name: str, link: DataPlaneLink, path: str | Path | None) -> "ModelEntry":
        """Tokenizer, chat template and sampling defaults from a checkpoint folder (None: none)."""

        tok = Tokenizer.from_dir(path) if path is not None else None
        tmpl = ChatTemplate.from_dir(path)
        tmpl.check()  # a broken template is a deployment error, not the clients'
        temp, top_p = 1.0, 1.0
        tcfg: dict = {}
        if path is not None:
            try:
                tp = Path(path) / "tokenizer_config.json"
                tcfg = json.loads(tp.read_text(encoding="utf-8")) if tp.is_file() else {}
            except (ValueError, UnicodeDecodeError):
                tcfg = {}
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
                   default_temperature=temp, default_top_p=top_p,
                   tokenizer_config=tcfg if isinstance(tcfg, dict) else {})


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
                                      (TokenizeRequest, "validation"), (DetokenizeRequest, "validation"),
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
        msg, param = validation_message(exc)
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
            msg, param = validation_message(exc)
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

    def admit(k: int) -> None:
        if st.active + k > settings.max_concurrent_requests:
            raise APIError(429, f"too many requests in flight on this replica "
                                f"(max_concurrent_requests={settings.max_concurrent_requests}); retry later",
                           code="too_many_requests", headers=retry_after(None, settings.retry_after_s))
        st.active += k

    async def run(request: Request, entry: ModelEntry, endpoint: str, kind: str, req,
                  prepared: list[Prepared], echo_texts: Optional[list[str]], logprobs: Optional[int]) -> Response:
        """Submit n generations per prompt, wait for each one's first event (refusals are HTTP
        errors before any byte is sent), then answer whole or as a stream."""
        n = req.n
        admit(len(prepared) * n)
        choices: list[Choice] = []
        for i, prep in enumerate(prepared):
            for j in range(n):
                params = prep.params if j == 0 else replace(prep.params, seed=sample_seed(prep.params.seed, j))
                gen = Generation(st, entry, endpoint, prep.prompt_ids, params, prep.stops,
                                 req.include_stop_str_in_output, req.skip_special_tokens)
                choices.append(Choice(i * n + j, gen, j == 0, None if echo_texts is None else echo_texts[i],
                                      logprobs, req.prompt_logprobs is not None))

        async def release_all() -> None:
            for c in choices:
                await c.gen.release()

        try:
            await _race_disconnect(request, asyncio.gather(*(c.gen.start() for c in choices)), watch_disconnect)
        except BaseException:
            await release_all()
            raise
        shape = Shape(kind, new_id("chatcmpl" if kind == "chat" else "cmpl"), now(), entry.name,
                      token_str_fn(entry.tokenizer, req.return_tokens_as_token_ids))
        if not req.stream:
            try:
                body = await _race_disconnect(request, final_body(shape, choices), watch_disconnect)
            finally:
                await release_all()
            return JSONResponse(body)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return SSEResponse(sse_chunks(shape, choices, include_usage), release_all, watch_disconnect)

    def prompt_ids_of(entry: ModelEntry, prompt) -> tuple[list[int], Optional[str]]:
        """Token ids of one prompt and its text (for echo)."""
        if isinstance(prompt, str):
            if entry.tokenizer is None:
                raise APIError(400, f"model {entry.name!r} has no tokenizer: send the prompt as token ids",
                               param="prompt")
            if not prompt:
                raise APIError(400, "the prompt is empty", param="prompt")
            return entry.tokenizer.encode(prompt), prompt
        ids = list(prompt)
        check_ids(ids, entry.link.info.vocab_size, "prompt")
        return ids, None

    # -------------------------------------------------------------- routes

    app.openapi = lambda: _openapi_document(app)  # type: ignore[method-assign]

    @app.post("/v1/completions", **_gen_route_doc(CompletionRequest, CompletionResponse, CompletionChunk))
    async def completions(request: Request):
        check_auth(request)
        body = await read_json(request)
        req: CompletionRequest = parse(CompletionRequest, body)
        entry = select(request, req.model)
        refuse_unsupported(body)
        if req.best_of is not None and req.best_of != 1:
            raise APIError(400, "best_of is not supported (vLLM removed it); use n", param="best_of")
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"logprobs must be in [0, {MAX_LOGPROBS}], got {req.logprobs}", param="logprobs")
        check_common(req, entry, settings)
        prompt = req.prompt
        batch = prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else [prompt]
        if len(batch) * req.n > settings.max_concurrent_requests:
            raise APIError(400, f"{len(batch)} prompts x n={req.n} is more than this replica's "
                                f"max_concurrent_requests ({settings.max_concurrent_requests})", param="prompt")
        structured = structured_spec(req, entry)
        # Echo with logprobs needs the prompt tokens' logprobs from the data plane.
        plp = req.prompt_logprobs
        if req.echo and req.logprobs is not None:
            plp = max(req.logprobs, plp or 0)
        prepared, echo_texts = [], []
        for p in batch:
            ids, text = prompt_ids_of(entry, p)
            prep = prepare(entry, settings, req, ids, req.max_tokens, settings.default_max_tokens,
                           req.logprobs, plp, structured)
            prepared.append(prep)
            if req.echo:
                echo_texts.append(text if text is not None and prep.prompt_ids == ids else
                                  (entry.tokenizer.decode(prep.prompt_ids, req.skip_special_tokens)
                                   if entry.tokenizer is not None else ""))
        return await run(request, entry, "/v1/completions", "completion", req, prepared,
                         echo_texts if req.echo else None, req.logprobs)

    @app.post("/v1/chat/completions",
              **_gen_route_doc(ChatCompletionRequest, ChatCompletionResponse, ChatCompletionChunk))
    async def chat_completions(request: Request):
        check_auth(request)
        body = await read_json(request)
        req: ChatCompletionRequest = parse(ChatCompletionRequest, body)
        entry = select(request, req.model)
        refuse_unsupported(body)
        if entry.tokenizer is None:
            raise APIError(400, f"model {entry.name!r} has no tokenizer: use /v1/completions with token ids",
                           param="model")
        if req.top_logprobs is not None:
            if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
                raise APIError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {req.top_logprobs}",
                               param="top_logprobs")
            if not req.logprobs:
                raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        check_common(req, entry, settings)
        ids = render_chat(entry, req.messages, req.add_generation_prompt, req.chat_template_kwargs)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        prep = prepare(entry, settings, req, ids, max_tokens, None, logprobs, req.prompt_logprobs,
                       structured_spec(req, entry))
        return await run(request, entry, "/v1/chat/completions", "chat", req, [prep], None, logprobs)

    add_tokenizer_routes(app, check_auth, read_json, parse, select, _body_doc, _errors)

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
