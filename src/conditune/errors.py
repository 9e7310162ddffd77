"""User-facing errors.

Anything a user can cause (a missing file, a corrupt checkpoint, an unknown tensor name) raises
:class:`CondituneError` with a one-line message naming the thing and the problem. The CLI prints
that line and exits with status 1; other exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import warnings


class CondituneError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def __getattr__(name: str):
    # The class was first published misspelt; the old name keeps working, with a warning.
    if name == "ConditumeError":
        warnings.warn(
            "conditune.errors.ConditumeError is deprecated: use CondituneError", DeprecationWarning, stacklevel=2
        )
        return CondituneError
    raise AttributeError(f"module 'conditune.errors' has no attribute {name!r}")
