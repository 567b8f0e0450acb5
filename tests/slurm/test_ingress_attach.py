"""`amoe-serve ingress` (attach mode) argument and health checks; no Slurm or Ray needed."""

import socket

import pytest

from amoe_serve.serving.attach import AttachError, endpoint_url, parse_gateway
from tests.support import run_cli


def test_parse_gateway():
    assert parse_gateway("mix=node01:4000") == ("mix", "node01", 4000)
    assert parse_gateway("10.0.0.5:4000") == ("default", "10.0.0.5", 4000)
    assert parse_gateway("m=[fd00::2]:4000") == ("m", "fd00::2", 4000)
    for bad in ("m=node01", "m=:4000", "m=node01:x", "m=node01:70000"):
        with pytest.raises(AttachError):
            parse_gateway(bad)


def test_endpoint_url():
    assert endpoint_url("127.0.0.1", 8000) == "http://127.0.0.1:8000/v1"
    assert endpoint_url("0.0.0.0", 8000).endswith(":8000/v1") and "0.0.0.0" not in endpoint_url("0.0.0.0", 8000)


@pytest.mark.slow  # over ~3 s here: left out of scripts/test.sh --fast
def test_unreachable_gateway_exits_nonzero_with_a_clear_message(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens once closed
    token = tmp_path / "token"
    token.write_text("secret\n")
    token.chmod(0o600)
    r = run_cli(["ingress", "--gateway", f"default=127.0.0.1:{port}", "--token-file", str(token),
                 "--check-timeout", "1", "--port", "8999"], timeout=60)
    assert r.returncode == 1, r.stderr
    assert f"gateway 'default' at 127.0.0.1:{port}" in r.stderr and "unreachable" in r.stderr, r.stderr


@pytest.mark.slow  # over ~3 s here: left out of scripts/test.sh --fast
def test_bad_arguments_exit_2(tmp_path):
    r = run_cli(["ingress", "--gateway", "nohostport", "--token-file", str(tmp_path / "missing")], timeout=60)
    assert r.returncode == 2 and "amoe-serve: error:" in r.stderr, r.stderr
