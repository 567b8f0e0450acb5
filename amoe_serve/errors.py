"""The base of amoe-serve's own errors.

Every error class of the package derives from `AmoeError` (most also from the builtin they
always were, `ValueError` or `RuntimeError`, so existing `except` clauses still match). The
`amoe-serve` command turns any of them into one line on stderr, `amoe-serve: error: <message>`,
and exits with the class's `exit_code`: 2 for a mistake in what the user gave (arguments,
config, checkpoint, placement or trace file), 1 for something that failed while running.
`amoe_transport` sits below this package and keeps its own `TransportError`.
"""

from __future__ import annotations


class AmoeError(Exception):
    """Something amoe-serve reports to its user in one line; never a traceback."""

    exit_code = 1


class UserInputError(AmoeError):
    """The user's input is wrong (a flag, a config key, a file): exit code 2."""

    exit_code = 2
