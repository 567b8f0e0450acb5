import asyncio
import json

import httpx
import pytest

from amoe_serve.default_model import ensure_default_model
from amoe_serve.serving.fake_link import FakeLink
from amoe_serve.serving.openai_app import ModelEntry, build_app
from amoe_serve.serving.settings import ServingConfig


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return ensure_default_model(tmp_path_factory.mktemp("amoe-cache"))


def run(coro):
    return asyncio.run(coro)


def make_app(model_dir, links=None, **settings):
    """App over FakeLinks ({name: FakeLink}); every entry gets the default model's tokenizer."""
    links = links or {"m": FakeLink("m")}
    entries = {n: ModelEntry.from_checkpoint(n, l, model_dir) for n, l in links.items()}
    return build_app(entries, ServingConfig(**settings))


def client(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=30)


def sse_events(text: str) -> list:
    """Parse an SSE body strictly: every event is 'data: ...\\n\\n'; returns JSON objects and '[DONE]'."""
    assert text.endswith("\n\n"), text[-50:]
    out = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def byte_ids(text: str) -> list[int]:
    """Token ids of the default model's byte-level tokenizer (no BOS)."""
    return [3 + b for b in text.encode("utf-8")]


async def call_asgi(app, method, path, body: bytes = b"", disconnect_after_chunks=None, disconnect_after_s=None,
                    send_raises_after=None, spec_version="2.3"):
    """Drive the ASGI app by hand to simulate a client that goes away: after N non-empty body
    chunks or after some seconds `receive` returns http.disconnect; or `send` raises OSError
    (how ASGI spec 2.4 servers report it)."""
    messages = []
    gone = asyncio.Event()
    body_sent = False
    chunks = 0
    broken = False

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(msg):
        nonlocal chunks, broken
        if broken:
            raise OSError("client went away")
        messages.append(msg)
        if msg["type"] == "http.response.body" and msg.get("body"):
            chunks += 1
            if disconnect_after_chunks is not None and chunks >= disconnect_after_chunks:
                gone.set()
            if send_raises_after is not None and chunks >= send_raises_after:
                broken = True  # receive() never reports it: only send() fails from now on

    async def timer():
        await asyncio.sleep(disconnect_after_s)
        gone.set()

    t = asyncio.ensure_future(timer()) if disconnect_after_s is not None else None
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"),
                                          (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 5555), "server": ("test", 80)}
    try:
        await asyncio.wait_for(app(scope, receive, send), 10)
    finally:
        if t is not None:
            t.cancel()
    return messages
