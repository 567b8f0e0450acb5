"""A minimal streaming client for OpenAI-compatible ``/v1/completions`` (stdlib only).

Why not ``requests``: its ``iter_lines`` reads fixed-size blocks, which on a close-delimited
(non-chunked) response waits until the block fills -- that would hide the real time to first token.
``http.client.HTTPResponse.readline`` returns each SSE line as soon as it arrives, for chunked and
close-delimited bodies alike.  Under Locust, gevent has monkey-patched ``socket`` before this module
runs, so blocking reads here yield to other users.

Server-sent events are parsed as OpenAI emits them: ``data: {json}`` lines separated by blank lines,
ending with ``data: [DONE]``; ``:`` comment lines and other fields are skipped.  A chunk "carries
text" when any choice has non-empty ``text`` (completions) or ``delta.content`` (chat).
"""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

__all__ = ["StreamResult", "CompletionStreamClient", "error_message"]


@dataclass
class StreamResult:
    """Timings (seconds, from just before the request is sent) and outcome of one request."""

    status: int  # HTTP status; 0 when no response was received (connection error, timeout)
    e2e: float = 0.0
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)  # gaps between consecutive text chunks
    text_chunks: int = 0
    output_chars: int = 0
    usage: dict[str, Any] | None = None
    done: bool = False  # saw ``data: [DONE]``
    error: str | None = None  # OpenAI error message / transport error; None on success

    @property
    def ok(self) -> bool:
        return self.error is None and 200 <= self.status < 300

    @property
    def output_tokens(self) -> int:
        """``usage.completion_tokens`` when the server reported it, else the number of text chunks."""
        if self.usage and isinstance(self.usage.get("completion_tokens"), int):
            return self.usage["completion_tokens"]
        return self.text_chunks


def error_message(raw: bytes | str, limit: int = 300) -> str:
    """The ``error.message`` of an OpenAI error body, falling back to other shapes / raw text."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:
        obj = json.loads(text)
    except ValueError:
        return text.strip()[:limit] or "(empty body)"
    if isinstance(obj, dict):
        err = obj.get("error", obj.get("detail", obj.get("message")))
        if isinstance(err, dict):
            msg = err.get("message") or err.get("type") or json.dumps(err)
            return str(msg)[:limit]
        if err is not None:
            return str(err)[:limit]
    return text.strip()[:limit]


def _chunk_text(obj: dict[str, Any]) -> str:
    parts = []
    for choice in obj.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        t = choice.get("text")
        if t is None:
            delta = choice.get("delta")
            if isinstance(delta, dict):
                t = delta.get("content")
        if t:
            parts.append(t)
    return "".join(parts)


class CompletionStreamClient:
    """One keep-alive HTTP connection to the server; reconnects after errors or ``Connection: close``."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        u = urlsplit(base_url if "://" in base_url else "http://" + base_url)
        if u.scheme not in ("http", "https"):
            raise ValueError(f"unsupported scheme in {base_url!r}")
        self.scheme = u.scheme
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.prefix = u.path.rstrip("/")  # e.g. a reverse-proxy mount point
        self.api_key = api_key
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    # -- connection handling ------------------------------------------------------------------
    def _new_conn(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def _headers(self, accept: str = "application/json") -> dict[str, str]:
        h = {"Content-Type": "application/json", "Accept": accept}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    def _send(self, method: str, path: str, payload: bytes | None, headers: dict[str, str]):
        """Send a request; retry once on a fresh connection if a reused keep-alive one was stale."""
        reused = self._conn is not None
        if self._conn is None:
            self._conn = self._new_conn()
        try:
            self._conn.request(method, self.prefix + path, body=payload, headers=headers)
            return self._conn.getresponse()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            self.close()
            if not reused:
                raise
        self._conn = self._new_conn()
        self._conn.request(method, self.prefix + path, body=payload, headers=headers)
        return self._conn.getresponse()

    def _finish(self, resp: http.client.HTTPResponse) -> None:
        if resp.will_close:
            self.close()

    # -- API ----------------------------------------------------------------------------------
    def get_json(self, path: str) -> tuple[int, Any]:
        """GET ``path``; returns (status, parsed JSON or None)."""
        try:
            resp = self._send("GET", path, None, self._headers())
            raw = resp.read()
            self._finish(resp)
        except Exception:
            self.close()
            raise
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, None

    def stream(
        self,
        body: dict[str, Any],
        path: str = "/v1/completions",
        on_text: Callable[[float, str], None] | None = None,
    ) -> StreamResult:
        """POST ``body`` and consume the SSE stream, timing each text-carrying chunk.

        ``on_text(perf_counter_time, text)`` is called for each text chunk as it arrives.
        Never raises for HTTP/transport errors: they come back in ``StreamResult.error``.
        """
        payload = json.dumps(body).encode()
        headers = self._headers("text/event-stream")
        t0 = time.perf_counter()
        res = StreamResult(status=0)
        try:
            resp = self._send("POST", path, payload, headers)
            res.status = resp.status
            if not (200 <= resp.status < 300):
                res.error = error_message(resp.read())
                res.e2e = time.perf_counter() - t0
                self._finish(resp)
                return res
            last: float | None = None
            pending = b""
            while True:
                line = resp.readline()
                if not line:
                    break  # EOF
                line = line.rstrip(b"\r\n")
                if not line:
                    if pending:  # blank line ends an event whose data never parsed
                        res.error = res.error or f"unparseable SSE data: {pending[:120]!r}"
                        pending = b""
                    continue
                if not line.startswith(b"data:"):
                    continue  # ':' comments, 'event:', 'id:', 'retry:'
                data = line[5:]
                if data.startswith(b" "):
                    data = data[1:]
                if not pending and data.strip() == b"[DONE]":
                    res.done = True
                    break
                pending = pending + b"\n" + data if pending else data
                try:
                    obj = json.loads(pending)
                except ValueError:
                    continue  # multi-line data field: wait for the rest
                pending = b""
                if not isinstance(obj, dict):
                    continue
                if obj.get("error") is not None:  # error reported mid-stream
                    res.error = res.error or error_message(json.dumps(obj))
                    continue
                if isinstance(obj.get("usage"), dict):
                    res.usage = obj["usage"]
                text = _chunk_text(obj)
                if text:
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itls.append(now - last)
                    last = now
                    res.text_chunks += 1
                    res.output_chars += len(text)
                    if on_text is not None:
                        on_text(now, text)
            if res.done:
                resp.read()  # drain the (chunked) body so the connection can be reused
                self._finish(resp)
            else:
                self.close()
                res.error = res.error or "stream ended before 'data: [DONE]'"
        except Exception as e:  # transport errors: refused, reset, timeout, bad HTTP ...
            self.close()
            res.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        res.e2e = time.perf_counter() - t0
        return res
