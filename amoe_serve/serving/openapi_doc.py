"""The OpenAPI document of the HTTP API (`app.openapi()`; not served: openapi_url is None).

The routes read and validate their bodies themselves (size limit first, then JSON, then the
pydantic model), so their request bodies and error answers are declared here."""

from __future__ import annotations

from fastapi import FastAPI

from amoe_serve.serving.api_models import (ChatCompletionChunk, ChatCompletionRequest, CompletionChunk,
                                           CompletionRequest, DetokenizeRequest, ErrorResponse, TokenizeRequest)

MULTIPLEX_HEADER = "serve_multiplexed_model_id"


def sse_doc(chunk_cls) -> dict:
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


def errors_doc(codes: dict[int, str]) -> dict:
    return {c: {"model": ErrorResponse, "description": d} for c, d in codes.items()}


def body_doc(model_cls) -> dict:
    return {
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model_cls.__name__}"}}}},
        "parameters": [{"name": MULTIPLEX_HEADER, "in": "header", "required": False,
                        "schema": {"type": "string"},
                        "description": "model to use when the body has no 'model'"}],
        "security": [{"bearerAuth": []}],
    }


def gen_route_doc(request_cls, response_cls, chunk_cls) -> dict:
    return {"openapi_extra": body_doc(request_cls),
            "responses": {200: {"model": response_cls, "content": sse_doc(chunk_cls),
                                "description": "the completion (JSON), or with stream=true an SSE stream"},
                          **errors_doc(_GEN_ERRORS)}}


def openapi_document(app: FastAPI) -> dict:
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
