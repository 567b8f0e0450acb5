"""Structured output: a request's JSON schema / regex / choice / EBNF grammar as a token mask,
through xgrammar (vLLM's and SGLang's default backend: a maintained C++ library with a CPU
bitmask kernel, compiled-grammar caching and JSON-schema, regex and EBNF front ends).

The backend is built on the attention rank the first time a request asks for structured output,
from the checkpoint's tokenizer.json; requests without one never touch it.

Legend: b rows being processed, V vocab, W = ceil(V / 32) bitmask words.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch

from amoe_serve.sampler.params import StructuredSpec
from amoe_serve.errors import UserInputError

_CACHE_SIZE = 64


class GrammarError(UserInputError, ValueError):
    """The grammar does not compile, or the model has no tokenizer to build it for."""


def _vocab_type(tokenizer_json: dict):
    import xgrammar as xgr

    dec = tokenizer_json.get("decoder") or {}
    kinds = {dec.get("type")} | {d.get("type") for d in dec.get("decoders") or [] if isinstance(d, dict)}
    if "ByteLevel" in kinds:
        return xgr.VocabType.BYTE_LEVEL
    if "ByteFallback" in kinds:
        return xgr.VocabType.BYTE_FALLBACK
    return xgr.VocabType.RAW


def compile_check(spec: StructuredSpec) -> None:
    """Parse the grammar without a tokenizer (cheap): the ingress answers a bad one with 400."""
    _grammar(spec)


def _grammar(spec: StructuredSpec):
    import xgrammar as xgr

    try:
        if spec.kind == "json":
            return xgr.Grammar.from_json_schema(spec.value, any_whitespace=False)
        if spec.kind == "json_object":
            return xgr.Grammar.builtin_json_grammar()
        if spec.kind == "regex":
            return xgr.Grammar.from_regex(spec.value)
        if spec.kind == "choice":
            choices = json.loads(spec.value)
            if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
                raise GrammarError("choice must be a non-empty list of strings")
            alts = " | ".join(json.dumps(c) for c in choices)
            return xgr.Grammar.from_ebnf(f"root ::= {alts}")
        if spec.kind == "grammar":
            return xgr.Grammar.from_ebnf(spec.value)
    except GrammarError:
        raise
    except Exception as exc:  # xgrammar raises RuntimeError / ValueError with a parse message
        raise GrammarError(f"invalid {spec.kind} for structured output: {str(exc).strip()[:300]}") from None
    raise GrammarError(f"unknown structured output kind {spec.kind!r}")


class GrammarBackend:
    """Compiles specs for one tokenizer (LRU-cached) and hands out per-request matchers."""

    def __init__(self, tokenizer_json_path: str | Path, vocab_size: int, eos_token_ids: tuple[int, ...]):
        import xgrammar as xgr
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(tokenizer_json_path)
        if not path.is_file():
            raise GrammarError("structured output needs the checkpoint's tokenizer.json, and this model has none")
        tok = HFTokenizer.from_file(str(path))
        vocab = [""] * vocab_size
        for s, i in tok.get_vocab(with_added_tokens=True).items():
            if i < vocab_size:
                vocab[i] = s
        info = xgr.TokenizerInfo(vocab, _vocab_type(json.loads(path.read_text(encoding="utf-8"))),
                                 vocab_size=vocab_size, stop_token_ids=list(eos_token_ids) or None)
        self.vocab_size = vocab_size
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)
        self._cache: OrderedDict = OrderedDict()

    def matcher(self, spec: StructuredSpec) -> "Matcher":
        import xgrammar as xgr

        key = (spec.kind, spec.value)
        compiled = self._cache.get(key)
        if compiled is None:
            try:
                compiled = self.compiler.compile_grammar(_grammar(spec))
            except GrammarError:
                raise
            except Exception as exc:
                raise GrammarError(f"cannot compile the {spec.kind} grammar: {str(exc)[:300]}") from None
            self._cache[key] = compiled
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return Matcher(xgr.GrammarMatcher(compiled), self.vocab_size)


class Matcher:
    def __init__(self, m, vocab_size: int):
        self.m = m
        self.vocab_size = vocab_size

    def accept(self, token: int) -> None:
        if not self.m.is_terminated() and not self.m.accept_token(int(token)):
            raise GrammarError(f"token {token} violates the grammar")  # the mask makes this unreachable


def apply_masks(x_bV: torch.Tensor, matchers: list[Matcher], rows: list[int]) -> None:
    """Set the logits of tokens each matcher forbids to -inf, in place, for the given rows."""
    import xgrammar as xgr

    V = x_bV.shape[1]
    bitmask_bW = xgr.allocate_token_bitmask(x_bV.shape[0], V)
    for m, r in zip(matchers, rows):
        m.m.fill_next_token_bitmask(bitmask_bW, r)
    xgr.apply_token_bitmask_inplace(x_bV, bitmask_bW, vocab_size=V, indices=rows)


def backend_for(checkpoint_dir: Optional[str | Path], vocab_size: int, eos_token_ids: tuple[int, ...]) -> GrammarBackend:
    if checkpoint_dir is None:
        raise GrammarError("structured output needs the checkpoint's tokenizer.json, and this model has none")
    return GrammarBackend(Path(checkpoint_dir) / "tokenizer.json", vocab_size, eos_token_ids)
