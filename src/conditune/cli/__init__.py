"""The ``conditune`` command line: a thin layer over the library.

Each sub-command lives in its own module with a ``register(app)`` function. User errors
(:class:`~conditune.errors.CondituneError`) print one line and exit 1; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import importlib
import sys

import typer

from conditune.errors import CondituneError

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
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        app(args=argv, standalone_mode=False)
    except CondituneError as exc:
        if debug:
            raise
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        return 1
    except (typer.Exit, SystemExit) as exc:  # typer's own exits (help, usage errors)
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        return int(code or 0)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        return 130
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            return exc.exit_code
        if isinstance(exc, click.exceptions.Abort):
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
