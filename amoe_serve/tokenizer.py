"""Tokenizer: a thin wrapper over the `tokenizers` library reading a checkpoint's tokenizer.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def _read(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def _token_str(v) -> Optional[str]:
    # tokenizer_config stores special tokens as strings or AddedToken dicts.
    if isinstance(v, dict):
        return v.get("content")
    return v


def _ids(v) -> list[int]:
    if v is None:
        return []
    return [int(v)] if isinstance(v, int) else [int(x) for x in v]


class Tokenizer:
    def __init__(self, tok, add_bos: bool, bos_token_id: Optional[int], eos_token_ids: tuple[int, ...]):
        self._tok = tok
        self.add_bos = add_bos
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids

    @classmethod
    def from_dir(cls, path: str | Path) -> Optional["Tokenizer"]:
        """None when the folder has no tokenizer.json (the server then takes token ids only)."""
        from tokenizers import Tokenizer as HFTokenizer

        folder = Path(path)
        tj = folder / "tokenizer.json"
        if not tj.is_file():
            return None
        try:
            tok = HFTokenizer.from_file(str(tj))
        except Exception as exc:
            raise ValueError(f"{tj}: cannot load tokenizer ({exc})") from None
        tcfg = _read(folder / "tokenizer_config.json")
        bos = _token_str(tcfg.get("bos_token"))
        bos_id = tok.token_to_id(bos) if bos else None
        eos: list[int] = []
        eos_str = _token_str(tcfg.get("eos_token"))
        if eos_str and tok.token_to_id(eos_str) is not None:
            eos.append(tok.token_to_id(eos_str))
        for f in ("generation_config.json", "config.json"):
            for i in _ids(_read(folder / f).get("eos_token_id")):
                if i not in eos:
                    eos.append(i)
        return cls(tok, bool(tcfg.get("add_bos_token", False)), bos_id, tuple(eos))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # The tokenizer.json post-processor usually adds BOS; add it ourselves if the config asks and it did not.
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None and (
                not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_str(self, token_id: int) -> str:
        """One token as text (its bytes decoded alone; special tokens kept), as logprobs show it."""
        return self._tok.decode([int(token_id)], skip_special_tokens=False)

    def id_to_token(self, token_id: int) -> Optional[str]:
        """The vocabulary entry (e.g. 'Ġthe'), as /tokenize's token_strs show it."""
        return self._tok.id_to_token(int(token_id))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()
