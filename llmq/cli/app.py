"""The `llmq` command. Importing this module must not import torch or transformers (see tests/test_cli.py)."""

from __future__ import annotations

import errno
import logging
import os
import sys

import typer

from llmq import __version__
from llmq.cli.options import printable
from llmq.errors import DiskFull, LlmqError

app = typer.Typer(
    name="llmq",
    help="Quantize, convert, evaluate and size large language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmq {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
    debug: bool = typer.Option(
        False, "--debug", help="Show full tracebacks on errors (or set LLMQ_DEBUG=1)."
    ),
    allow_symlinks: bool = typer.Option(
        False,
        "--allow-symlinks",
        help="Follow symlinks out of model directories (refused by default; the HF cache layout is always allowed).",
    ),
) -> None:
    _state["debug"] = debug
    from llmq.io.paths import allow_symlinks as allow

    allow(allow_symlinks)


def _register() -> None:
    # Explicit list: each module adds its commands; all of them import only typer/rich at module level.
    from llmq.cli import convert, estimate, inspect, quantize
    from llmq.cli import eval as eval_cmd

    for mod in (convert, quantize, eval_cmd, estimate, inspect):
        mod.register(app)


_register()


def _debug() -> bool:
    return _state["debug"] or os.environ.get("LLMQ_DEBUG", "") not in ("", "0")


# The single error-to-message table: (exception type, prefix). The first matching row wins.
ERROR_TABLE: list[tuple[type[BaseException], str]] = [
    (LlmqError, "error"),
    (FileNotFoundError, "error: file not found"),
    (PermissionError, "error: permission denied"),
    (IsADirectoryError, "error: is a directory"),
    (OSError, "error: I/O"),
    (MemoryError, "error: out of memory"),
]


def format_error(exc: BaseException) -> tuple[str, int]:
    """The one line (control characters escaped: messages quote file contents) and the exit code of ``exc``."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        # outside an atomic output (which raises DiskFull naming its destination itself)
        where = f" while writing {exc.filename}" if exc.filename else ""
        exc = DiskFull(f"no space left on device{where}")
    for etype, prefix in ERROR_TABLE:
        if isinstance(exc, etype):
            code = getattr(exc, "exit_code", 1)
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if isinstance(exc, OSError) and not isinstance(exc, LlmqError) and exc.filename:
                msg = f"{exc.strerror or msg}: {exc.filename}"
            return f"{prefix}: {printable(msg)}", code
    detail = printable(f"{type(exc).__name__}: {exc}")
    return f"error: internal error ({detail}); rerun with --debug for a traceback", 70


class _NoteHandler(logging.Handler):
    """The library's log records (a stale temporary removed, ...) as ``note:`` lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(f"note: {printable(record.getMessage())}", err=True)


def main(argv: list[str] | None = None) -> None:
    # Typer runs in standalone mode: usage errors, --help and Exit become SystemExit there (a
    # KeyboardInterrupt too, as exit 130). Every other exception reaches this one place, where it becomes a
    # line and an exit code. SIGINT/SIGTERM/SIGHUP unwind the command like an error (temporaries.py).
    from llmq.io import temporaries

    logger = logging.getLogger("llmq")
    handler, level = _NoteHandler(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with temporaries.interrupts_unwind() as signals:
            try:
                app(args=argv, prog_name="llmq")
            except KeyboardInterrupt:
                sys.exit(130)
            except SystemExit:
                if signals.signum is None:
                    raise
            except Exception as exc:
                if signals.signum is None:
                    if _debug():
                        raise
                    msg, code = format_error(exc)
                    typer.echo(msg, err=True)
                    sys.exit(code)
            if signals.signum is not None:
                _interrupted(signals.signum, temporaries.remove_live())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _interrupted(signum: int, removed: list) -> None:
    """The end of an interrupted command: whatever was still registered is gone; exit 128 + signum."""
    import signal

    extra = f" ({len(removed)} more temporaries removed)" if removed else ""
    typer.echo(f"interrupted by {signal.Signals(signum).name}{extra}", err=True)
    sys.exit(128 + signum)


if __name__ == "__main__":  # pragma: no cover
    main()
