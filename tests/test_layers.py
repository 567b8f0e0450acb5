"""The package's layers only point down and no sibling modules import each other in a circle:
the import-linter contracts in pyproject.toml ([tool.importlinter]; docs/ARCHITECTURE.md,
"Layers"). `lint-imports` exits non-zero, naming the offending imports, when one is broken."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    exe = Path(sys.executable).with_name("lint-imports")
    cmd = [str(exe)] if exe.exists() else [shutil.which("lint-imports") or "lint-imports"]
    r = subprocess.run(cmd + ["--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout
