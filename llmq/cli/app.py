"""The `llmq` command. Importing this module must not import torch or transformers (see tests/test_cli.py)."""

from __future__ import annotations

import os
import sys

import typer

from llmq import __version__
from llmq.errors import LlmqError

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
) -> None:
    _state["debug"] = debug


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
    for etype, prefix in ERROR_TABLE:
        if isinstance(exc, etype):
            code = getattr(exc, "exit_code", 1)
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if isinstance(exc, OSError) and not isinstance(exc, LlmqError) and exc.filename:
                msg = f"{exc.strerror or msg}: {exc.filename}"
            return f"{prefix}: {msg}", code
    return f"error: internal error ({type(exc).__name__}: {exc}); rerun with --debug for a traceback", 70


def main(argv: list[str] | None = None) -> None:
    # Typer runs in standalone mode: usage errors, --help and Exit become SystemExit there. Every other
    # exception reaches this one place, where it becomes a line and an exit code.
    try:
        app(args=argv, prog_name="llmq")
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        if _debug():
            raise
        msg, code = format_error(exc)
        typer.echo(msg, err=True)
        sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
