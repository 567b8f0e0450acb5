"""`serving.route_prefix` everywhere: the Serve app is mounted under it, `up` and `ingress` print
(and write) the endpoint URL with it, and the app's routes and metrics work below it. No Ray
cluster: ray.init, serve.start/run, the data planes and the gateways are stand-ins."""

import os
import signal

import httpx
import pytest

from amoe_serve.config import load_config
from amoe_serve.serving import attach, up
from amoe_serve.serving.settings import endpoint_url

from .conftest import make_app, run


@pytest.fixture
def cfg():
    return load_config(None, ["serving.route_prefix=/amoe/", "serving.port=8123"])


def _signal_self():
    os.kill(os.getpid(), signal.SIGTERM)  # the trap's handler runs: the serve loop ends


def test_endpoint_url_has_the_prefix():
    assert endpoint_url("127.0.0.1", 8000, "/amoe/") == "http://127.0.0.1:8000/amoe/v1"
    assert endpoint_url("::1", 8000, "/a/b") == "http://[::1]:8000/a/b/v1"


def test_serve_app_is_mounted_under_the_prefix(cfg, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from amoe_serve.serving import deployment

    seen = {}
    monkeypatch.setattr(ray, "init", lambda **kw: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {})
    monkeypatch.setattr(serve, "start", lambda **kw: seen.update(start=kw))
    monkeypatch.setattr(serve, "run", lambda app, **kw: seen.update(run=kw))
    monkeypatch.setattr(deployment, "build_serve_app", lambda specs, s, resources=None: "app")
    up.start_serve_app(cfg.serving, [])
    assert seen["run"]["route_prefix"] == "/amoe/"
    assert seen["start"]["http_options"] == {"host": "127.0.0.1", "port": 8123}


def test_up_prints_the_url_with_the_prefix(cfg, monkeypatch, capsys):
    events = []
    monkeypatch.setattr(up.DataPlaneProcess, "start", lambda self: None)
    monkeypatch.setattr(up.DataPlaneProcess, "wait_ready", lambda self, timeout: ("127.0.0.1", 4242))
    monkeypatch.setattr(up, "_start_serve", lambda cfg, planes: events.append("serve"))
    monkeypatch.setattr(up, "_supervise", lambda planes: _signal_self())
    monkeypatch.setattr(up, "_stop_serve", lambda: events.append("stop"))
    monkeypatch.setattr(up, "terminate", lambda pids: events.append("terminate"))
    monkeypatch.setattr(up, "clean_orphaned_mpi_shm", lambda: 0)
    before = signal.getsignal(signal.SIGTERM)
    assert up.up(cfg) == 0
    assert events == ["serve", "stop", "terminate"]
    assert "[amoe-serve] up: http://127.0.0.1:8123/amoe/v1  models: default" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is before  # the trap is undone


def test_ingress_prints_and_writes_the_url_with_the_prefix(cfg, monkeypatch, capsys, tmp_path):
    import ray

    written, stopped = [], []
    monkeypatch.setattr(attach, "check_gateways", lambda specs, timeout: None)
    monkeypatch.setattr(up, "start_serve_app", lambda s, specs, ray_address=None: None)
    monkeypatch.setattr(up, "_stop_serve", lambda: stopped.append(True))
    monkeypatch.setattr(attach, "write_atomic", lambda path, text: written.append(text))
    monkeypatch.setattr(ray, "is_initialized", lambda: _signal_self() or True)
    before = signal.getsignal(signal.SIGTERM)
    specs = [{"name": "m", "path": None, "host": "127.0.0.1", "port": 1, "token": "t"}]
    assert attach.ingress(cfg, specs, address_file=str(tmp_path / "url")) == 0
    assert written == ["http://127.0.0.1:8123/amoe/v1\n"] and stopped == [True]
    assert "ingress up: http://127.0.0.1:8123/amoe/v1  models: m" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is before


def test_routes_and_metrics_below_the_prefix(model_dir):
    """Ray Serve hands the app ASGI scopes whose path includes root_path (= the prefix)."""
    app = make_app(model_dir)

    async def main():
        transport = httpx.ASGITransport(app=app, root_path="/amoe")
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
            assert (await c.get("/amoe/health")).status_code == 200
            r = await c.post("/amoe/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert r.status_code == 200, r.text
            return (await c.get("/amoe/metrics")).text

    metrics = run(main())
    assert 'amoe_http_requests_total{endpoint="/health",model="",status="200"} 1.0' in metrics
    assert 'amoe_http_requests_total{endpoint="/v1/completions",model="m",status="200"} 1.0' in metrics
