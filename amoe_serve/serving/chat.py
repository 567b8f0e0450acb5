"""Chat templating: messages -> prompt text.

If the checkpoint folder has a chat template (`chat_template` in tokenizer_config.json, a string
or Hugging Face's list of named templates, or a `chat_template.jinja` file), it is rendered with
a sandboxed Jinja environment (`ImmutableSandboxedEnvironment`, as Hugging Face does) with
`messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception` and
`strftime_now`. Otherwise the default template is used:

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n ... <|assistant|>\\n

i.e. one `<|role|>\\n{content}\\n` block per message and, for the generation prompt, a final
`<|assistant|>\\n`. The tokenizer adds BOS when encoding the rendered text; if a Jinja template
already wrote the BOS token itself, the duplicate BOS is dropped (see `encode_chat`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Optional

from amoe_serve.errors import UserInputError

DEFAULT_TEMPLATE_NAME = "amoe-default"


class ChatTemplateError(UserInputError, ValueError):
    """The messages cannot be rendered (bad content parts, or the template raised)."""


def _token_str(v) -> str:
    if isinstance(v, dict):
        return v.get("content") or ""
    return v or ""


@dataclass
class ChatTemplate:
    source: Optional[str] = None  # Jinja source; None = the default template
    bos_token: str = ""
    eos_token: str = ""

    @classmethod
    def from_dir(cls, path: str | Path | None) -> "ChatTemplate":
        if path is None:
            return cls()
        folder = Path(path)
        tcfg: dict = {}
        p = folder / "tokenizer_config.json"
        if p.is_file():
            try:
                tcfg = json.loads(p.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                tcfg = {}
        src = tcfg.get("chat_template")
        if isinstance(src, list):  # [{"name": "default", "template": "..."}, ...]
            named = {t.get("name"): t.get("template") for t in src if isinstance(t, dict)}
            src = named.get("default") or next(iter(named.values()), None)
        if not isinstance(src, str) or not src.strip():
            jf = folder / "chat_template.jinja"
            src = jf.read_text(encoding="utf-8") if jf.is_file() else None
        return cls(source=src, bos_token=_token_str(tcfg.get("bos_token")),
                   eos_token=_token_str(tcfg.get("eos_token")))

    @property
    def name(self) -> str:
        return "jinja" if self.source else DEFAULT_TEMPLATE_NAME

    def check(self) -> None:
        """Compile the Jinja template now; raises ValueError if it does not parse."""
        if self.source:
            try:
                _compile(self.source)
            except Exception as exc:
                raise ValueError(f"invalid chat template: {exc}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               template_kwargs: Optional[dict] = None) -> str:
        """template_kwargs (the request's chat_template_kwargs) are extra Jinja variables; the
        default template has none to use."""
        msgs = [_normalize(m) for m in messages]
        if not self.source:
            out = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in msgs)
            return out + ("<|assistant|>\n" if add_generation_prompt else "")
        return _render_jinja(self.source, msgs, add_generation_prompt, self.bos_token, self.eos_token,
                             template_kwargs or {})


def _normalize(m: dict) -> dict:
    content = m.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        parts = []
        for part in content:
            ptype = part.get("type")
            if ptype != "text" or not isinstance(part.get("text"), str):
                raise ChatTemplateError(f"unsupported content part type {ptype!r}: only 'text' parts are supported")
            parts.append(part["text"])
        text = "".join(parts)
    out = dict(m)
    out["content"] = text
    return out


_ENV_CACHE: dict[str, object] = {}


def _compile(source: str):
    tmpl = _ENV_CACHE.get(source)
    if tmpl is None:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])

        def raise_exception(message):
            raise TemplateError(message)

        def strftime_now(fmt):
            return datetime.now().strftime(fmt)

        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii)
        tmpl = env.from_string(source)
        if len(_ENV_CACHE) < 64:
            _ENV_CACHE[source] = tmpl
    return tmpl


_RESERVED = ("messages", "add_generation_prompt", "bos_token", "eos_token")


def _render_jinja(source: str, messages: list[dict], add_generation_prompt: bool, bos: str, eos: str,
                  extra: dict) -> str:
    from jinja2.exceptions import TemplateError

    clash = [k for k in extra if k in _RESERVED]
    if clash:
        raise ChatTemplateError(f"chat_template_kwargs must not set {', '.join(clash)}")
    try:
        variables = {"tools": None, "documents": None, **extra}
        return _compile(source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                       bos_token=bos, eos_token=eos, **variables)
    except TemplateError as exc:
        raise ChatTemplateError(f"chat template error: {exc}") from None
    except Exception as exc:  # a template can fail in many ways on odd input; it is the client's input
        raise ChatTemplateError(f"chat template failed on these messages: {type(exc).__name__}: {exc}") from None


def encode_chat(tokenizer, template: ChatTemplate, text: str) -> list[int]:
    """Token ids of rendered chat text: the tokenizer adds BOS; drop a second BOS when the
    template already wrote it as text."""
    ids = tokenizer.encode(text)
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos and template.bos_token \
            and text.startswith(template.bos_token):
        ids = ids[1:]
    return ids
