"""Generated text from token ids: incremental detokenization and stop strings."""

from __future__ import annotations

class IncrementalDecoder:
    """Detokenizes a growing list of ids, emitting only stable text: the window
    ids[prefix:] is decoded and compared with ids[prefix:read]; new text is released unless it
    ends with U+FFFD (a UTF-8 character still split across tokens). `flush()` releases the rest."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _delta(self, final: bool) -> str:
        if self.tok is None:
            return ""
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=self.skip)
        new_text = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=self.skip)
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._delta(False)

    def flush(self) -> str:
        return self._delta(True)


class OutputText:
    """Generated text with stop strings: holds back the last (longest stop - 1) characters until
    they cannot start a stop string, and cuts the text before the first stop string found (after
    it, with vLLM's include_stop_str_in_output)."""

    def __init__(self, tokenizer, stops: list[str], include_stop: bool = False, skip_special_tokens: bool = True):
        self.dec = IncrementalDecoder(tokenizer, skip_special_tokens)
        self.stops = stops
        self.include_stop = include_stop
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.token_ids: list[int] = []
        self._pending_ids: list[int] = []
        self.stopped = False

    def _append(self, delta: str) -> None:
        if not delta or self.stopped:
            return
        start = max(0, len(self.text) - self.hold)
        self.text += delta
        best, end = -1, -1
        for s in self.stops:
            i = self.text.find(s, start)
            if i >= 0 and (best < 0 or i < best):
                best, end = i, i + len(s)
        if best >= 0:
            self.text = self.text[:end if self.include_stop else best]
            self.stopped = True

    def add(self, token: int) -> str:
        self.token_ids.append(token)
        self._pending_ids.append(token)
        self._append(self.dec.add(token))
        return self._release(self.stopped)

    def finish(self) -> str:
        self._append(self.dec.flush())
        return self._release(True)

    def _release(self, final: bool) -> str:
        limit = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent:limit]
        self.sent = limit
        return out

    def take_ids(self) -> list[int]:
        ids, self._pending_ids = self._pending_ids, []
        return ids
