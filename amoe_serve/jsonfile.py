"""Reading a user-given JSON file (a trace, a placement) with one-line errors naming it."""

from __future__ import annotations

import json
from pathlib import Path


def read_json(path: str | Path, what: str, error: type[Exception]):
    """The parsed file; a missing or malformed file raises `error` ("<what> file not found: ...")."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{what} file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise error(f"{what} file {path} is not valid JSON: {e}") from None
