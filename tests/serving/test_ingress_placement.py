"""Where the Serve ingress replicas may run (issue #17): on a cluster whose head advertises the
custom resource `amoe_head` (slurm/launch.sh's Ray head, and no other node), every replica asks
for a sliver of it and so runs on the head, next to the HTTP proxy (proxy_location=HeadOnly) and
the gateway; elsewhere (a private `amoe-serve up` Ray) nothing is asked. The end-to-end check is
tests/cluster/test_two_nodes.py (placement, then a crash of the other node)."""

from __future__ import annotations

import re
from pathlib import Path

from amoe_serve.serving.deployment import build_serve_app
from amoe_serve.serving.up import HEAD_RESOURCE

SPEC = {"name": "m", "host": "127.0.0.1", "port": 1, "token": "t", "path": "/x"}
LAUNCH = Path(__file__).resolve().parents[2] / "slurm" / "launch.sh"


def test_replicas_ask_for_the_head_resource_only_when_given():
    pinned = build_serve_app([SPEC], resources={HEAD_RESOURCE: 0.001})._bound_deployment.ray_actor_options
    assert pinned == {"num_cpus": 0, "resources": {HEAD_RESOURCE: 0.001}}
    assert build_serve_app([SPEC])._bound_deployment.ray_actor_options == {"num_cpus": 0}


def test_only_the_launchers_ray_head_advertises_it():
    text = LAUNCH.read_text()
    starts = re.findall(r'"\$RAY" start (?:[^\n]*\\\n)*[^\n]*', text)  # with its continued lines
    head = [s for s in starts if "--head" in s]
    assert len(head) == 1 and f'--resources \'{{"{HEAD_RESOURCE}": 1}}\'' in head[0], head
    workers = [s for s in starts if "--head" not in s]
    assert workers and all(HEAD_RESOURCE not in s for s in workers), workers
    opts = re.search(r"RAY_OPTS=\((.*?)\)", text, re.S).group(1)  # shared by the head and the workers
    assert HEAD_RESOURCE not in opts
