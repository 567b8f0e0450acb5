"""The ingress under real Ray Serve (HTTP proxy on 127.0.0.1), with FakeLinks injected by name."""

import json
import time

import httpx
import pytest

from amoe_serve.serving.attach import free_port


def _metric(text: str, prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_ray_serve_http_end_to_end(model_dir, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from amoe_serve.serving.deployment import start_serving
    from amoe_serve.serving.settings import ServingConfig

    port = free_port()
    settings = ServingConfig(host="127.0.0.1", port=port, api_keys=["k"])
    specs = [{"name": "m", "path": str(model_dir), "host": "unused", "port": 1, "token": "t",
              "fake": {"token_delay_s": 0.01}}]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        start_serving(specs, settings, link_factory="amoe_serve.serving.fake_link:fake_link_factory")
        base = f"http://127.0.0.1:{port}"
        auth = {"Authorization": "Bearer k"}
        with httpx.Client(base_url=base, timeout=30) as c:
            r = c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 5}, headers=auth)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == "jklmn"
            assert r.json()["choices"][0]["token_ids"] == [3 + b for b in b"jklmn"]

            r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 3, "stream": True}, headers=auth)
            assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
            first = json.loads(r.text.split("\n\n")[0][len("data: "):])
            assert first["object"] == "chat.completion.chunk"

            r = c.post("/v1/completions", json={"prompt": "hi"})
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            r = c.post("/v1/completions", json={"model": "x", "prompt": "hi"}, headers=auth)
            assert r.status_code == 404 and "m" in r.json()["error"]["message"]
            assert c.get("/health").json()["status"] == "ok"

            # A client that goes away mid-stream: the replica cancels the data-plane request.
            with c.stream("POST", "/v1/completions", headers=auth,
                          json={"prompt": "hi", "max_tokens": 1000, "stream": True}) as s:
                assert s.status_code == 200
                it = s.iter_raw()
                next(it)
            deadline = time.time() + 20
            while True:
                m = c.get("/metrics").text
                if _metric(m, 'amoe_requests_finished_total{finish_reason="cancelled",model="m"}') >= 1:
                    break
                assert time.time() < deadline, m
                time.sleep(0.2)
            assert _metric(m, 'amoe_requests_in_flight{model="m"}') == 0
            assert 'amoe_dataplane_queue_depth_mean{' in m
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
