"""The API's errors: `APIError` (an OpenAI-shaped body with a status) and the mappings of
data-plane and validation failures onto it."""

from __future__ import annotations

import math
from typing import Any, Optional

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.responses import JSONResponse

from amoe_serve.link.api import DataPlaneError
from amoe_serve.serving.api_models import error_body
from amoe_serve.serving.settings import ServingConfig
from amoe_serve.errors import AmoeError

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "service_unavailable", 504: "timeout"}


class APIError(AmoeError):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Any = None,
                 type_: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or ERROR_TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def retry_after(seconds: Optional[float], default: float) -> dict:
    s = default if seconds is None or not math.isfinite(seconds) or seconds < 0 else seconds
    return {"Retry-After": str(max(1, math.ceil(s)))}


def from_dataplane(exc: DataPlaneError, settings: ServingConfig) -> APIError:
    status = exc.status if exc.status in (400, 429, 503) else 503
    headers = retry_after(exc.retry_after, settings.retry_after_s) if status in (429, 503) and (
        status == 429 or exc.retry_after is not None) else None
    code = {429: "overloaded", 503: "data_plane_unavailable"}.get(status)
    return APIError(status, str(exc) or "data plane error", code=code, headers=headers)


def validation_message(exc: ValidationError | RequestValidationError) -> tuple[str, Optional[str]]:
    parts, first = [], None
    for err in exc.errors()[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = ".".join(loc) or "body"
        first = first or (loc[0] if loc else None)
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request", first
