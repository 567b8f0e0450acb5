"""One replica's request handling under the routes, one place each: the API key, the body (size
limit, JSON, schema), which model, admission against the replica's concurrency limit, and the
run of a generation request (submit, first events, whole answer or stream)."""

from __future__ import annotations

import asyncio
import hmac
import json
from dataclasses import replace
from typing import Optional

from fastapi import Request
from pydantic import ValidationError
from starlette.responses import JSONResponse, Response

from amoe_serve.serving.errors import APIError, retry_after, validation_message
from amoe_serve.serving.generation import Generation
from amoe_serve.serving.logprobs_out import token_str_fn
from amoe_serve.serving.metrics import ServingMetrics
from amoe_serve.serving.model_entry import ModelEntry
from amoe_serve.serving.openapi_doc import MULTIPLEX_HEADER
from amoe_serve.serving.api_models import new_id, now
from amoe_serve.serving.respond import Choice, Shape, final_body, sse_chunks
from amoe_serve.serving.sampling_args import Prepared, check_ids, sample_seed
from amoe_serve.serving.settings import ServingConfig
from amoe_serve.serving.streaming import SSEResponse, race_disconnect


class Ingress:
    """watch_disconnect: watch the ASGI `receive` channel for `http.disconnect` while generating
    (works under uvicorn and Ray Serve). With False, only a cancellation of the request task
    (which Ray Serve's proxy also does when the client goes away) closes the link stream."""

    def __init__(self, models: dict[str, ModelEntry], settings: ServingConfig, watch_disconnect: bool = True):
        for name, entry in models.items():
            if entry.name != name:
                raise ValueError(f"ModelEntry {entry.name!r} registered under another name {name!r}")
        self.models = models
        self.settings = settings
        self.watch_disconnect = watch_disconnect
        self.metrics = ServingMetrics()
        self.active = 0  # generations in flight on this replica
        self._keys = [k.encode() for k in settings.api_keys]

    def check_auth(self, request: Request) -> None:
        if not self._keys:
            return
        h = request.headers.get("authorization", "")
        scheme, _, token = h.partition(" ")
        token = token.strip().encode()
        ok = scheme.lower() == "bearer" and token and any(hmac.compare_digest(token, k) for k in self._keys)
        if not ok:
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_json(self, request: Request) -> dict:
        limit = self.settings.max_body_bytes
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

    @staticmethod
    def parse(model_cls, data: dict):
        try:
            return model_cls.model_validate(data)
        except ValidationError as exc:
            msg, param = validation_message(exc)
            raise APIError(422, msg, param=param) from None
        except RecursionError:
            raise APIError(422, "request body is nested too deeply") from None

    def select(self, request: Request, name: Optional[str]) -> ModelEntry:
        """The body's model, else the multiplexing header's, else the only one."""
        models = self.models
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

    def admit(self, k: int) -> None:
        s = self.settings
        if self.active + k > s.max_concurrent_requests:
            raise APIError(429, f"too many requests in flight on this replica "
                                f"(max_concurrent_requests={s.max_concurrent_requests}); retry later",
                           code="too_many_requests", headers=retry_after(None, s.retry_after_s))
        self.active += k

    @staticmethod
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

    async def run(self, request: Request, entry: ModelEntry, endpoint: str, kind: str, req,
                  prepared: list[Prepared], echo_texts: Optional[list[str]], logprobs: Optional[int]) -> Response:
        """Submit n generations per prompt, wait for each one's first event (refusals are HTTP
        errors before any byte is sent), then answer whole or as a stream."""
        n = req.n
        self.admit(len(prepared) * n)
        choices: list[Choice] = []
        for i, prep in enumerate(prepared):
            for j in range(n):
                params = prep.params if j == 0 else replace(prep.params, seed=sample_seed(prep.params.seed, j))
                gen = Generation(self, entry, endpoint, prep.prompt_ids, params, prep.stops,
                                 req.include_stop_str_in_output, req.skip_special_tokens)
                choices.append(Choice(i * n + j, gen, j == 0, None if echo_texts is None else echo_texts[i],
                                      logprobs, req.prompt_logprobs is not None))

        async def release_all() -> None:
            for c in choices:
                await c.gen.release()

        watch = self.watch_disconnect
        try:
            await race_disconnect(request, asyncio.gather(*(c.gen.start() for c in choices)), watch)
        except BaseException:
            await release_all()
            raise
        shape = Shape(kind, new_id("chatcmpl" if kind == "chat" else "cmpl"), now(), entry.name,
                      token_str_fn(entry.tokenizer, req.return_tokens_as_token_ids))
        if not req.stream:
            try:
                body = await race_disconnect(request, final_body(shape, choices), watch)
            finally:
                await release_all()
            return JSONResponse(body)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return SSEResponse(sse_chunks(shape, choices, include_usage), release_all, watch)
