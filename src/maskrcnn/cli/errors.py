"""The error a command raises for a problem the user can fix: ``main`` prints
``error: <message>`` without a traceback and exits with the error's code."""

from __future__ import annotations

USAGE = 2  # a setting, flag or file the command cannot use (argparse's code for bad flags)
FAILED = 1  # the command ran but could not do its work (nothing to predict, no model...)


class CommandError(Exception):
    """``message`` for the user; ``exit_code``: :data:`USAGE` or :data:`FAILED`."""

    def __init__(self, message: str, exit_code: int = FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code
