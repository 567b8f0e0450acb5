"""`--config` may be given several times: the files merge in order (a later one wins), then the
KEY=VALUE overrides, so the fragments under configs/{deployments,schedulers,models} compose."""

from pathlib import Path

import pytest

from amoe_serve.cli import build_parser
from amoe_serve.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FRAGMENTS = sorted(p for d in ("deployments", "schedulers", "models") for p in (CONFIGS / d).glob("*.yaml"))


@pytest.mark.parametrize("path", FRAGMENTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_fragment_loads_on_its_own(path):
    load_config(path)


def test_fragments_merge_in_order_then_overrides():
    cfg = load_config([CONFIGS / "deployments/aep-2a-3e.yaml", CONFIGS / "schedulers/mtfs.yaml",
                       CONFIGS / "models/default.yaml"], ["deployment.expert_ranks=2"])
    assert (cfg.deployment.mode, cfg.deployment.attention_ranks, cfg.deployment.expert_ranks) == ("aep", 2, 2)
    assert cfg.scheduler.policy == "mtfs" and cfg.model.path is None and cfg.model.dtype == "float32"
    later = load_config([CONFIGS / "schedulers/mtfs.yaml", CONFIGS / "schedulers/flfs.yaml"])
    assert later.scheduler.policy == "flfs"


def test_a_missing_fragment_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config([CONFIGS / "schedulers/mtfs.yaml", tmp_path / "nope.yaml"])


def test_cli_config_is_repeatable():
    for cmd in (["generate", "--input", "i", "--output", "o"], ["up"], ["trace", "--output", "t"]):
        args = build_parser().parse_args(cmd + ["--config", "a.yaml", "--config", "b.yaml", "scheduler.policy=mtfs"])
        assert args.config == ["a.yaml", "b.yaml"] and args.overrides == ["scheduler.policy=mtfs"]
    assert build_parser().parse_args(["up"]).config is None


@pytest.mark.parametrize("overrides,message", [
    (["runtime.cpu_bind=socket"], "expected 'none' or 'core'"),
    (["runtime.cpu_bind=core", "runtime.threads_per_rank=2"], "cannot run runtime.threads_per_rank=2"),
])
def test_cpu_bind_rejects_what_it_cannot_do(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
