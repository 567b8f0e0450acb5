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
from typing import Optional

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from amoe_serve.sampler import MAX_LOGPROBS
from amoe_serve.serving.api_models import (ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
                                           CompletionChunk, CompletionRequest, CompletionResponse, HealthResponse,
                                           ModelList, now)
from amoe_serve.serving.errors import APIError
from amoe_serve.serving.ingress import Ingress
from amoe_serve.serving.metrics import CONTENT_TYPE
from amoe_serve.serving.model_entry import ModelEntry
from amoe_serve.serving.observe import Observe, install_error_handlers
from amoe_serve.serving.openapi_doc import MULTIPLEX_HEADER, body_doc, errors_doc, gen_route_doc, openapi_document
from amoe_serve.serving.prompts import render_chat
from amoe_serve.serving.sampling_args import check_common, prepare, refuse_unsupported, structured_spec
from amoe_serve.serving.settings import ServingConfig
from amoe_serve.serving.tokenize_routes import add_tokenizer_routes

__all__ = ["MULTIPLEX_HEADER", "ModelEntry", "build_app"]


def build_app(links: dict[str, ModelEntry], settings: Optional[ServingConfig] = None,
              watch_disconnect: bool = True) -> FastAPI:
    """The OpenAI-compatible app serving `links` ({served name: ModelEntry}); see `Ingress` for
    watch_disconnect. The routes only parse, check and answer: the rest is the Ingress's."""
    settings = settings or ServingConfig()
    models = dict(links)
    ing = Ingress(models, settings, watch_disconnect)
    app = FastAPI(title="AMoE-serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.amoe = ing
    install_error_handlers(app)
    app.add_middleware(Observe, metrics=ing.metrics)
    app.openapi = lambda: openapi_document(app)  # type: ignore[method-assign]

    @app.post("/v1/completions", **gen_route_doc(CompletionRequest, CompletionResponse, CompletionChunk))
    async def completions(request: Request):
        ing.check_auth(request)
        body = await ing.read_json(request)
        req: CompletionRequest = ing.parse(CompletionRequest, body)
        entry = ing.select(request, req.model)
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
            ids, text = ing.prompt_ids_of(entry, p)
            prep = prepare(entry, settings, req, ids, req.max_tokens, settings.default_max_tokens,
                           req.logprobs, plp, structured)
            prepared.append(prep)
            if req.echo:
                echo_texts.append(text if text is not None and prep.prompt_ids == ids else
                                  (entry.tokenizer.decode(prep.prompt_ids, req.skip_special_tokens)
                                   if entry.tokenizer is not None else ""))
        return await ing.run(request, entry, "/v1/completions", "completion", req, prepared,
                         echo_texts if req.echo else None, req.logprobs)

    @app.post("/v1/chat/completions",
              **gen_route_doc(ChatCompletionRequest, ChatCompletionResponse, ChatCompletionChunk))
    async def chat_completions(request: Request):
        ing.check_auth(request)
        body = await ing.read_json(request)
        req: ChatCompletionRequest = ing.parse(ChatCompletionRequest, body)
        entry = ing.select(request, req.model)
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
        return await ing.run(request, entry, "/v1/chat/completions", "chat", req, [prep], None, logprobs)

    add_tokenizer_routes(app, ing.check_auth, ing.read_json, ing.parse, ing.select, body_doc, errors_doc)

    @app.get("/v1/models", response_model=None, openapi_extra={"security": [{"bearerAuth": []}]},
             responses={200: {"model": ModelList}, **errors_doc({401: "missing or invalid API key"})})
    async def list_models(request: Request):
        ing.check_auth(request)
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
        await ing.metrics.refresh_dataplane({n: e.link for n, e in models.items()})
        return Response(ing.metrics.render(), media_type=CONTENT_TYPE)

    return app
