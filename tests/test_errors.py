"""One error base (amoe_serve.errors.AmoeError): every error class of the package derives from
it, and `amoe-serve` turns any of them into one line on stderr and the class's exit code."""

import importlib
import inspect
import pkgutil

import pytest

import amoe_serve
from amoe_serve import cli
from amoe_serve.config import ConfigError
from amoe_serve.engine.gateway import RankFailed
from amoe_serve.errors import AmoeError, UserInputError
from amoe_serve.launch import LaunchError
from amoe_serve.model import CheckpointError
from amoe_serve.placement.layout import PlacementError
from amoe_serve.placement.trace import TraceError
from amoe_serve.serving.up import UpError

# Not an error reported to a user: a private signal inside the ingress.
OUTSIDE = {"amoe_serve.serving.streaming.ClientGone"}


def _error_classes():
    for m in pkgutil.walk_packages(amoe_serve.__path__, "amoe_serve."):
        mod = importlib.import_module(m.name)
        for name, obj in vars(mod).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == mod.__name__:
                yield f"{mod.__name__}.{name}", obj


def test_every_error_class_derives_from_the_base():
    found = dict(_error_classes())
    assert len(found) >= 15, sorted(found)
    stray = sorted(n for n, c in found.items() if not issubclass(c, AmoeError) and n not in OUTSIDE)
    assert not stray, stray


def test_user_input_errors_keep_their_builtin_bases():
    for cls in (ConfigError, PlacementError, TraceError):
        assert issubclass(cls, UserInputError) and issubclass(cls, ValueError)
    assert issubclass(CheckpointError, UserInputError)
    assert issubclass(RankFailed, RuntimeError) and RankFailed.exit_code == 1
    assert issubclass(LaunchError, AmoeError) and issubclass(LaunchError, RuntimeError)
    assert LaunchError.exit_code == 1


@pytest.mark.parametrize("exc, code", [
    (ConfigError("unknown key foo"), 2),
    (CheckpointError("no config.json in /nowhere"), 2),
    (cli.CliError("bad flag"), 2),
    (UpError("the data plane of model 'default' exited with code 1"), 1),
    (RankFailed("rank 2 stopped answering"), 1),
    (LaunchError("mpiexec not found: install the MPI runtime with `pip install mpich`"), 1),
])
def test_cli_prints_one_line_and_the_exit_code(monkeypatch, capsys, tmp_path, exc, code):
    def fail(args):
        raise exc

    monkeypatch.setattr(cli, "cmd_generate", fail)
    rc = cli.main(["generate", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err
    assert rc == code
    assert err == f"amoe-serve: error: {exc}\n"
    assert "Traceback" not in err


def test_missing_mpiexec_is_one_line_not_a_traceback(monkeypatch, capsys, tmp_path):
    """launch.mpiexec_path() raises LaunchError where neither the venv nor PATH has mpiexec;
    the CLI prints it as one line with exit code 1."""
    from amoe_serve import launch

    monkeypatch.setattr(launch.sys, "executable", str(tmp_path / "bin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(cli, "cmd_generate", lambda args: launch.mpiexec_path())
    rc = cli.main(["generate", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("amoe-serve: error: mpiexec not found") and err.count("\n") == 1
    assert "Traceback" not in err
