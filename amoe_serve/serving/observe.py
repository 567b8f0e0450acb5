"""What every answer passes through: OpenAI-shaped errors for every exception the routes raise
(and for FastAPI's own 404/405/422), and the outermost middleware that counts each answer in the
replica's metrics and turns an unexpected exception into a 500 (there should be no path to it)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from amoe_serve.serving.errors import APIError, validation_message
from amoe_serve.serving.metrics import ServingMetrics
from amoe_serve.serving.streaming import ClientGone

log = logging.getLogger(__name__)

# Endpoints the metrics count by name; anything else is "other".
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics",
             "/tokenize", "/detokenize", "/tokenizer_info")


def install_error_handlers(app: FastAPI) -> None:
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

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone):
        return Response(status_code=499)  # nobody reads it; recorded in the metrics


class Observe:
    """ASGI middleware (add it last: outermost)."""

    def __init__(self, app, metrics: ServingMetrics):
        self.inner = app
        self.metrics = metrics

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
            path, root = scope.get("path", ""), scope.get("root_path", "")
            if root and path.startswith(root):  # under serving.route_prefix: ASGI paths include it
                path = path[len(root):]
            endpoint = path if path in ENDPOINTS else "other"
            model = (scope.get("state") or {}).get("amoe_model", "")
            self.metrics.requests.labels(endpoint, model, str(status["code"])).inc()
