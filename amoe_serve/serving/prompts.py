"""Chat messages -> prompt token ids with the model's template (shared by chat and /tokenize)."""
from __future__ import annotations

from typing import Optional

from amoe_serve.serving.chat import ChatTemplateError, encode_chat
from amoe_serve.serving.errors import APIError


def render_chat(entry, messages, add_generation_prompt: bool, template_kwargs: Optional[dict]) -> list[int]:
    if entry.tokenizer is None:
        raise APIError(400, f"model {entry.name!r} has no tokenizer: use /v1/completions with token ids",
                       param="model")
    dumped = [m.model_dump(exclude_none=False) for m in messages]
    try:
        text = entry.chat_template.render(dumped, add_generation_prompt=add_generation_prompt,
                                          template_kwargs=template_kwargs)
    except ChatTemplateError as exc:
        raise APIError(400, str(exc), param="messages") from None
    return encode_chat(entry.tokenizer, entry.chat_template, text)
