"""The ``conditune`` command line: a thin layer over the library.

Each sub-command lives in its own module with a ``register(app)`` function. Exit codes and error
lines follow one contract for every command (:mod:`conditune.cli.base`, docs/errors.md): 0 ok,
1 user error (one line on stderr), 2 a failed check, 130 interrupted; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import importlib
import sys

import typer

from conditune.cli.base import CommandGroup, quiet_libraries, run

__all__ = ["app", "main", "quiet_libraries"]

COMMAND_MODULES = [
    "scan",
    "models",
    "select",
    "data",
    "theory",
    "train",
    "transcribe",
    "evaluate",
    "experiment",
    "demo",
]

app = typer.Typer(
    name="conditune",
    help="Condition-number guided fine-tuning: scan, select, train, evaluate.",
    cls=CommandGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _state["debug"] = debug


for _module in COMMAND_MODULES:
    importlib.import_module(f"conditune.cli.{_module}").register(app)


def main(argv: list[str] | None = None) -> int:
    """Run ``conditune`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if not debug:
        quiet_libraries()
    return run(app, args, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
