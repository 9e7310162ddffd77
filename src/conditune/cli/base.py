"""What every ``conditune`` command shares: exit codes, one-line errors, quiet libraries.

The contract (docs/errors.md): exit 0 when the command did what was asked, 1 for a user error (a bad
option, value, file or path; a usage error such as an unknown option or command is a user error
too), 2 when the command ran and a check it makes failed (``theory``, ``data check``), 130 when
interrupted (Ctrl-C). Every error is one line on stderr; ``conditune --debug`` shows tracebacks.

This holds on every typer version the project allows: typer up to 0.25 raises click's own
exceptions, later ones bundle a copy of click whose exceptions are not ``click.ClickException``.
The classes are therefore found through typer's public names, never imported from click.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import typer
from typer.core import TyperGroup

from conditune.errors import CondituneError

EXIT_OK = 0
EXIT_USER_ERROR = 1
EXIT_CHECK_FAILED = 2
EXIT_INTERRUPTED = 130


class UsageProblem(CondituneError):
    """A command line that names no command, or an unknown one."""


class Interrupted(Exception):
    """Ctrl-C while a command ran (a plain Exception, so typer does not turn it into a silent exit)."""


def _classes_named(names: tuple[str, ...], *roots: type) -> tuple[type, ...]:
    found = {cls for root in roots for cls in root.__mro__ if cls.__name__ in names}
    return tuple(found) or (type("NeverRaised", (Exception,), {}),)


# click.ClickException and UsageError of whichever click typer uses (its own copy from 0.26 on)
CLICK_ERRORS = _classes_named(("ClickException",), typer.BadParameter)
USAGE_ERRORS = _classes_named(("UsageError",), typer.BadParameter)
ABORTS = (typer.Abort,)
EXITS = (typer.Exit,)


class CommandGroup(TyperGroup):
    """typer's group, made to keep the contract the same on every typer version.

    * no sub-command: the help, then exit 1 (nothing was run);
    * an unknown command: one line with the closest command names;
    * Ctrl-C inside a command: :class:`Interrupted`, which :func:`run` reports as "interrupted", 130.
    """

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        if not args and self.no_args_is_help and not ctx.resilient_parsing:
            text = ctx.get_help()  # typer's rich help prints itself and returns ""
            if text:
                typer.echo(text)
            ctx.exit(EXIT_USER_ERROR)
        return super().parse_args(ctx, args)

    def resolve_command(self, ctx, args: list[str]):
        name = args[0] if args else None
        if name and not name.startswith("-") and not ctx.resilient_parsing and self.get_command(ctx, name) is None:
            known = self.list_commands(ctx)
            close = difflib.get_close_matches(name, known, n=2)
            hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else f"commands: {', '.join(known)}"
            raise UsageProblem(f"{ctx.command_path}: no such command {name!r} ({hint})")
        return super().resolve_command(ctx, args)

    def invoke(self, ctx) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise Interrupted() from None


def quiet_libraries() -> None:
    """Keep third-party progress bars, advisory logs and Python warnings away from users.

    Called once by :func:`run` for every command (not with ``--debug``). Environment variables are
    set only where the user has not set them, so ``TQDM_DISABLE=0`` or ``-W default`` still win.
    """
    defaults = {
        "TQDM_DISABLE": "1",  # GGUF de-quantisation and weight-loading bars (plain tqdm)
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers reads this when it is imported
        "TRANSFORMERS_VERBOSITY": "error",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    if not sys.warnoptions:
        warnings.simplefilter("ignore")
    if "transformers" in sys.modules:  # already imported: the variables came too late for it
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


class _WarningLines(logging.Handler):
    """The library's warnings (lines skipped and counted) as ``warning: ...`` lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        level = "error" if record.levelno >= logging.ERROR else "warning"
        typer.echo(f"{level}: {one_line(record.getMessage())}", err=True)  # sys.stderr as it is now


def show_library_warnings() -> None:
    """Send warnings logged under ``conditune.*`` to stderr, once, whatever logging is configured."""
    logger = logging.getLogger("conditune")
    if not any(isinstance(h, _WarningLines) for h in logger.handlers):
        handler = _WarningLines(level=logging.WARNING)
        logger.addHandler(handler)  # with it, Python's last-resort handler no longer prints these too
        if logger.level == logging.NOTSET or logger.level > logging.WARNING:
            logger.setLevel(logging.WARNING)


def one_line(text: object) -> str:
    """``text`` with its line breaks and runs of spaces folded, for a one-line message."""
    return " ".join(str(text).split())


def fail(message: str) -> None:
    typer.secho(f"error: {one_line(message)}", fg=typer.colors.RED, err=True)


def _usage_message(exc: Exception) -> str:
    ctx = getattr(exc, "ctx", None)
    where = f"{ctx.command_path}: " if ctx is not None else ""
    help_hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
    return f"{where}{exc.format_message().rstrip('.')}{help_hint}"


def _interrupted_cause(exc: BaseException) -> bool:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, (KeyboardInterrupt, Interrupted)):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def run(app: Callable[..., Any], args: list[str], *, debug: bool) -> int:
    """Run the typer ``app`` on ``args`` and map every outcome to an exit code and at most one line."""
    show_library_warnings()
    try:
        result = app(args=args, prog_name="conditune", standalone_mode=False)
    except Interrupted:
        return interrupted()
    except KeyboardInterrupt:  # outside a command (while parsing, importing)
        return interrupted()
    except CondituneError as exc:
        if debug:
            raise
        fail(str(exc))
        return EXIT_USER_ERROR
    except SystemExit as exc:  # sys.exit() in a command or a library
        code = exc.code
        return code if isinstance(code, int) else (EXIT_OK if code is None else EXIT_USER_ERROR)
    except EXITS as exc:  # typer.Exit raised where typer did not catch it
        return int(getattr(exc, "exit_code", EXIT_OK))
    except CLICK_ERRORS as exc:  # usage errors: a wrong type, a missing argument, an unknown option
        fail(_usage_message(exc) if isinstance(exc, USAGE_ERRORS) else exc.format_message())
        return EXIT_USER_ERROR
    except ABORTS as exc:  # click < 8.2 turns Ctrl-C into Abort; EOF at a prompt is Abort too
        if _interrupted_cause(exc):
            return interrupted()
        fail("aborted")
        return EXIT_USER_ERROR
    except MemoryError:
        if debug:
            raise
        fail("out of memory (try a smaller batch, or a machine with more memory)")
        return EXIT_USER_ERROR
    except OSError as exc:  # a file problem no command turned into a CondituneError: still one line
        if debug or not (exc.filename or exc.strerror):
            raise
        name = f"{exc.filename}: " if exc.filename else ""
        fail(f"{name}{exc.strerror or exc}")
        return EXIT_USER_ERROR
    if isinstance(result, int) and not isinstance(result, bool):
        return interrupted() if result == EXIT_INTERRUPTED else result  # typer >= 0.26 maps Ctrl-C to 130
    return EXIT_OK


def interrupted() -> int:
    typer.secho("interrupted", err=True)
    return EXIT_INTERRUPTED
