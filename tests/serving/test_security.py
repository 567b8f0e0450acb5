"""Security properties not covered elsewhere (test_openai_app.py has the basic 401/413/422 cases,
tests/engine/test_link.py and test_fuzz_link.py the link's framing and authentication):

- the gateway's link socket and the HTTP ingress bind loopback unless told otherwise;
- the link handshake never sends the shared token, and a link needs one;
- nothing under amoe_serve/, transport/ or amoe_kernels/ unpickles, evals or unsafely deserializes
  (a static AST scan, itself checked against planted examples);
- every /v1 route, found from the app's own route table, answers a missing or bad bearer key
  with 401 in OpenAI's error shape before it reads the body or touches the data plane;
- the OpenAPI document and the interactive docs are not served.
"""

import ast
import asyncio
import json
import socket
from pathlib import Path

import pytest

from amoe_serve.link import wire
from amoe_serve.config import LinkConfig, ServingConfig, load_config
from amoe_serve.link.api import ModelInfo
from amoe_serve.link.server import LinkServer
from amoe_serve.serving.fake_link import FakeLink
from amoe_serve.link.client import LinkClient

from .conftest import client, make_app, run

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("amoe_serve", "transport", "amoe_kernels")
KEY = "k-3f9a1c"


# ----------------------------------------------------------------------------- binding


def _non_loopback_ip():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outgoing interface
        ip = s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()
    return None if ip.startswith("127.") or ip == "0.0.0.0" else ip


def test_defaults_bind_loopback_only():
    assert LinkConfig().host == "127.0.0.1" and ServingConfig().host == "127.0.0.1"
    cfg = load_config()
    assert cfg.link.host == "127.0.0.1" and cfg.serving.host == "127.0.0.1"
    srv = LinkServer(cfg.link.host, 0, "tok", ModelInfo("m", 8, 9))
    try:
        host, port = srv.address
        assert host == "127.0.0.1"
        assert srv.listener.getsockname()[0] == "127.0.0.1"
        ip = _non_loopback_ip()
        if ip is not None:  # not reachable from another interface of this machine
            with pytest.raises(OSError):
                socket.create_connection((ip, port), timeout=2).close()
    finally:
        srv.close()


def test_serving_gateway_loopback_and_requests_over_the_link_frame_limit(checkpoints, model_dir, monkeypatch):
    """The gateway binds the configured loopback host. Huge stop_token_ids lists are a 400; and
    a request within the HTTP body limit but too big for one link frame (1 MiB: 600k
    stop_token_ids with the list cap lifted) is a 400 too, not a 500, and the link keeps working."""
    from amoe_serve.engine.inproc import serve_inproc
    from amoe_serve.serving import sampling_args
    from amoe_serve.serving.openai_app import ModelEntry, build_app

    cfg = load_config(overrides=[f"model.path={checkpoints['mixtral']}", "deployment.attention_ranks=1",
                                 "deployment.expert_ranks=1", "link.token=t0k"])
    assert cfg.link.host == "127.0.0.1"
    with serve_inproc(cfg) as g:
        assert g.server.address[0] == "127.0.0.1"
        assert g.server.listener.getsockname()[0] == "127.0.0.1"

        async def go():
            link = LinkClient(*g.server.address, "t0k")
            await link.connect()
            app = build_app({"m": ModelEntry.from_checkpoint("m", link, model_dir)}, ServingConfig())
            try:
                async with client(app) as c:
                    body = {"prompt": [5, 6], "max_tokens": 2, "stop_token_ids": [7] * 600_000}
                    assert len(json.dumps(body)) < ServingConfig().max_body_bytes
                    r = await c.post("/v1/completions", json=body)
                    assert r.status_code == 400, (r.status_code, r.text[:300])
                    assert r.json()["error"]["param"] == "stop_token_ids"
                    monkeypatch.setattr(sampling_args, "MAX_STOP_TOKEN_IDS", 10**9)
                    r = await c.post("/v1/completions", json=body)
                    assert r.status_code == 400, (r.status_code, r.text[:300])
                    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
                    assert r.json()["error"]["code"] == "request_too_large"
                    r = await c.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 2})
                    assert r.status_code == 200, r.text
                    assert len(r.json()["choices"][0]["token_ids"]) == 2
            finally:
                await link.close()

        asyncio.run(go())


# ----------------------------------------------------------------------------- link token


def test_link_needs_a_token_and_never_sends_it():
    with pytest.raises(ValueError, match="token"):
        LinkServer("127.0.0.1", 0, "", ModelInfo("m", 8, 9))
    token = "the-shared-secret-0123456789"
    # A fake gateway that records what the client sends during the handshake.
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.settimeout(10)
    port = lsock.getsockname()[1]
    got = bytearray()
    nonce = wire.new_nonce()

    async def main():
        loop = asyncio.get_running_loop()

        def gateway():
            conn, _ = lsock.accept()
            with conn:
                conn.settimeout(10)
                conn.sendall(wire.encode({"type": "challenge", "nonce": nonce, "version": wire.VERSION}))
                r = wire.FrameReader()
                frames = []
                while not frames:
                    data = conn.recv(4096)
                    if not data:
                        break
                    got.extend(data)
                    frames = r.feed(data)
                ok = frames and wire.verify(token, nonce, frames[0].get("mac"))
                conn.sendall(wire.encode({"type": "ready", "info": {"name": "m", "max_model_len": 8, "vocab_size": 9}}
                                         if ok else {"type": "error", "error": "authentication failed"}))
                return ok

        fut = loop.run_in_executor(None, gateway)
        c = LinkClient("127.0.0.1", port, token)
        info = await c.connect()
        await c.close()
        return info, await fut

    try:
        info, ok = asyncio.run(main())
    finally:
        lsock.close()
    assert ok and info.name == "m"
    assert token.encode() not in bytes(got) and got, bytes(got)
    assert wire.decode_body(bytes(got[4:]))["mac"] == wire.mac(token, nonce)


# ----------------------------------------------------------------------------- static scan

_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "jsonpickle",
                   "joblib"}
_MPI_PICKLING = {"send", "recv", "isend", "irecv", "bcast", "gather", "scatter", "allgather", "alltoall",
                 "sendrecv", "reduce", "allreduce", "scan", "exscan", "ssend", "issend", "mrecv", "imrecv"}


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def scan_source(src: str) -> list[str]:
    """Problems in one module's source: unpickling imports, eval/exec, unsafe YAML, torch.load
    without weights_only=True, numpy allow_pickle, pickle-based mpi4py calls, shell=True."""
    out = []
    tree = ast.parse(src)
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in _PICKLE_MODULES:
                    out.append(f"{line}: import {a.name}")
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in _PICKLE_MODULES:
                out.append(f"{line}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in ("eval", "exec", "compile", "__import__"):
                out.append(f"{line}: {f.id}()")
            if not isinstance(f, ast.Attribute):
                continue
            owner = ast.unparse(f.value)
            if owner == "yaml" and f.attr in ("load", "load_all", "unsafe_load", "full_load", "unsafe_load_all"):
                loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
                if f.attr not in ("load", "load_all") or loader is None or "Safe" not in ast.unparse(loader):
                    out.append(f"{line}: yaml.{f.attr} without SafeLoader")
            if owner == "torch" and f.attr == "load":
                wo = _kw(node, "weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    out.append(f"{line}: torch.load without weights_only=True")
            if owner in ("np", "numpy") and f.attr == "load":
                ap = _kw(node, "allow_pickle")
                if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                    out.append(f"{line}: numpy.load with allow_pickle")
            if f.attr in _MPI_PICKLING and "comm" in owner.lower():
                out.append(f"{line}: {owner}.{f.attr}() pickles (use the upper-case buffer API)")
            if f.attr in ("system", "popen") and owner == "os":
                out.append(f"{line}: os.{f.attr}()")
            sh = _kw(node, "shell")
            if sh is not None and not (isinstance(sh, ast.Constant) and sh.value is False):
                out.append(f"{line}: shell=True")
    return out


def test_scanner_catches_planted_examples():
    bad = {
        "import pickle": "import pickle", "from cloudpickle import loads": "from cloudpickle",
        "import dill as d": "import dill", "eval(s)": "eval()", "exec(code)": "exec()",
        "yaml.load(f)": "yaml.load", "yaml.load(f, Loader=yaml.Loader)": "yaml.load", "yaml.unsafe_load(f)": "yaml.unsafe",
        "torch.load(p)": "torch.load", "torch.load(p, weights_only=False)": "torch.load",
        "np.load(p, allow_pickle=True)": "numpy.load", "self.comm.recv(source=0)": "pickles",
        "comm.bcast(obj, root=0)": "pickles", "subprocess.run(cmd, shell=True)": "shell=True",
        "os.system('ls')": "os.system",
    }
    for src, what in bad.items():
        problems = scan_source(src)
        assert problems and what in problems[0], (src, problems)
    for ok in ("yaml.safe_load(f)", "yaml.load(f, Loader=yaml.SafeLoader)", "torch.load(p, weights_only=True)",
               "model.eval()", "np.load(p)", "self.comm.Isend([buf, MPI.BYTE], 1, 3)", "json.loads(b)",
               "subprocess.run(['ls'], shell=False)", "self.host.isend(1, 2, {})"):
        assert scan_source(ok) == [], ok


def test_no_pickle_eval_or_unsafe_deserialization_in_the_code():
    problems = []
    files = 0
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            files += 1
            problems += [f"{path.relative_to(ROOT)}:{p}" for p in scan_source(path.read_text(encoding="utf-8"))]
    assert files > 30, files
    assert problems == [], "\n".join(problems)


# ----------------------------------------------------------------------------- 401 on every /v1 route

_BAD_AUTH = [
    None, "", "Bearer", "Bearer ", f"Basic {KEY}", KEY, f"Bearer {KEY}x", f"Bearer {KEY[:-1]}",
    f"Bearer {KEY.upper()}", f"Bearer  {KEY} extra", "Bearer \u00e9\u00e8", f"Token {KEY}", f"{KEY} Bearer",
]


def _v1_routes(app):
    from starlette.routing import Route

    out = []
    for r in app.routes:
        if isinstance(r, Route) and r.path.startswith("/v1"):
            out += [(m, r.path) for m in sorted(r.methods or ()) if m != "HEAD"]
    return out


def test_every_v1_route_needs_a_valid_bearer_key(model_dir):
    link = FakeLink("m")
    app = make_app(model_dir, {"m": link}, api_keys=[KEY])
    routes = _v1_routes(app)
    assert {("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models")} <= set(routes)

    async def go():
        async with client(app) as c:
            n = 0
            for method, path in routes:
                for auth in _BAD_AUTH:
                    headers = {} if auth is None else {"Authorization": auth.encode("latin-1")}
                    # A body that would be a 422, a 404 model and a too-long prompt all at once:
                    # authentication must come first.
                    kw = {"content": b'{"model": "nope", "prompt": ' + b"[1," * 50 + b'"x', "headers": headers}
                    r = await c.request(method, path, **(kw if method == "POST" else {"headers": headers}))
                    assert r.status_code == 401, (method, path, auth, r.status_code, r.text)
                    assert r.headers.get("www-authenticate") == "Bearer", r.headers
                    body = r.json()
                    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
                    assert body["error"]["type"] == "authentication_error"
                    assert body["error"]["code"] == "invalid_api_key"
                    assert KEY not in r.text  # the key is never echoed
                    n += 1
                # The scheme is case-insensitive; the right key gets past authentication.
                r = await c.request(method, path, headers={"Authorization": f"bearer {KEY}"},
                                    **({"json": {"prompt": [5, 6], "max_tokens": 1}} if method == "POST" else {}))
                assert r.status_code != 401, (method, path, r.text)
            return n

    n = run(go())
    assert n == len(routes) * len(_BAD_AUTH)
    assert len(link.requests) == 1  # only the one authenticated, valid completion reached the data plane


def test_openapi_and_docs_are_not_served(model_dir):
    app = make_app(model_dir)

    async def go():
        async with client(app) as c:
            for path in ("/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"):
                r = await c.get(path)
                assert r.status_code == 404, (path, r.status_code)
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}

    run(go())
    # ... but the app can describe itself (tests/serving/test_fuzz_http.py fuzzes from it).
    doc = app.openapi()
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {"type": "http", "scheme": "bearer"}
    assert doc["paths"]["/v1/completions"]["post"]["security"] == [{"bearerAuth": []}]


def test_private_ray_cluster_gets_a_random_auth_token():
    """Ray's own ports speak pickle on every interface: `up` never starts one without auth
    unless the environment asks for it."""
    from amoe_serve.serving.up import ray_auth_env
    a, b = {}, {}
    ray_auth_env(a, None)
    ray_auth_env(b, None)
    assert a["RAY_AUTH_MODE"] == "token" and len(a["RAY_AUTH_TOKEN"]) == 64
    assert a["RAY_AUTH_TOKEN"] != b["RAY_AUTH_TOKEN"]
    mine = {"RAY_AUTH_MODE": "disabled"}
    ray_auth_env(mine, None)
    assert mine == {"RAY_AUTH_MODE": "disabled"}  # an explicit choice is kept
    kept = {"RAY_AUTH_TOKEN": "shared"}
    ray_auth_env(kept, None)
    assert kept == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "shared"}
    attach = {}
    ray_auth_env(attach, "10.0.0.1:6379")
    assert attach == {"RAY_AUTH_MODE": "disabled"}
