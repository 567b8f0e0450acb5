"""vLLM's tokenizer endpoints: POST /tokenize, POST /detokenize, GET /tokenizer_info.

Shapes as vLLM answers them: /tokenize -> {count, max_model_len, tokens, token_strs};
/detokenize -> {prompt}; /tokenizer_info -> the checkpoint's tokenizer_config.json fields
(`tokenizer_class`, special tokens, `chat_template`, ...) plus `model_max_length`. They need
the model's tokenizer (400 without one) and the API key like /v1/*.
"""
from __future__ import annotations

from fastapi import FastAPI, Request

from amoe_serve.serving.errors import APIError
from amoe_serve.serving.prompts import render_chat
from amoe_serve.serving.api_models import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from amoe_serve.serving.sampling_args import check_ids


def _need_tokenizer(entry) -> None:
    if entry.tokenizer is None:
        raise APIError(400, f"model {entry.name!r} has no tokenizer", param="model")


_ERRS = {400: "no tokenizer, or an unknown token id", 401: "missing or invalid API key", 404: "unknown model",
         413: "request body too large", 422: "body is not JSON or does not match the schema"}


def add_tokenizer_routes(app: FastAPI, check_auth, read_json, parse, select, body_doc, errors_doc) -> None:
    """The routes read their bodies with the app's helpers (size limit, JSON, schema) like /v1/*."""

    @app.post("/tokenize", response_model=None, openapi_extra=body_doc(TokenizeRequest),
              responses={200: {"model": TokenizeResponse}, **errors_doc(_ERRS)})
    async def tokenize(request: Request):
        check_auth(request)
        req: TokenizeRequest = parse(TokenizeRequest, await read_json(request))
        entry = select(request, req.model)
        _need_tokenizer(entry)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of 'prompt' or 'messages'", param="prompt")
        if req.messages is not None:
            ids = render_chat(entry, req.messages, req.add_generation_prompt, req.chat_template_kwargs)
        else:
            ids = entry.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        strs = [entry.tokenizer.id_to_token(t) for t in ids] if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": entry.link.info.max_model_len, "tokens": ids,
                "token_strs": strs}

    @app.post("/detokenize", response_model=None, openapi_extra=body_doc(DetokenizeRequest),
              responses={200: {"model": DetokenizeResponse}, **errors_doc(_ERRS)})
    async def detokenize(request: Request):
        check_auth(request)
        req: DetokenizeRequest = parse(DetokenizeRequest, await read_json(request))
        entry = select(request, req.model)
        _need_tokenizer(entry)
        check_ids(req.tokens, entry.link.info.vocab_size, "tokens")
        return {"prompt": entry.tokenizer.decode(req.tokens)}

    @app.get("/tokenizer_info", response_model=None, openapi_extra={"security": [{"bearerAuth": []}]},
             responses={200: {"description": "the tokenizer's configuration (tokenizer_config.json fields)",
                              "content": {"application/json": {"schema": {"type": "object"}}}},
                        **errors_doc({k: v for k, v in _ERRS.items() if k in (400, 401, 404)})})
    async def tokenizer_info(request: Request):
        check_auth(request)
        entry = select(request, request.query_params.get("model"))
        _need_tokenizer(entry)
        info = {k: v for k, v in (entry.tokenizer_config or {}).items() if not k.startswith("_")}
        info.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        info["model_max_length"] = entry.link.info.max_model_len
        if entry.chat_template.source:
            info["chat_template"] = entry.chat_template.source
        return info
