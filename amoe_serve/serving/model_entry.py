"""A served model as the HTTP API sees it: its data-plane link, tokenizer, chat template and
sampling defaults."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from amoe_serve.link.api import DataPlaneLink
from amoe_serve.serving.chat import ChatTemplate
from amoe_serve.tokenizer import Tokenizer


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
