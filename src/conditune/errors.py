"""User-facing errors.

Anything a user can cause (a missing file, a corrupt checkpoint, an unknown tensor name) raises
:class:`ConditumeError` with a one-line message naming the thing and the problem. The CLI prints
that line and exits with status 1; other exceptions are bugs and keep their traceback.
"""


class ConditumeError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""
