"""Reusable Typer options (Annotated aliases) and rendering helpers shared by the commands."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer

Force = Annotated[bool, typer.Option("--force", "-f", help="Overwrite the output if it exists.")]
Json = Annotated[bool, typer.Option("--json", help="Print a JSON result instead of tables (for scripts).")]
AllowPickle = Annotated[
    bool, typer.Option("--allow-pickle", help="Read pickle checkpoints (.bin/.pt): only for files you trust.")
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


# Control characters (C0, DEL, C1) and the bidirectional overrides: in a tensor name, a metadata value or a
# path they could move the cursor, recolour or retitle the terminal, or make text read differently from what
# it is. They are shown as Python escapes instead.
_UNPRINTABLE = (
    {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
    | {c: f"\\u{c:04x}" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C)}
    | {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}
)


def printable(text: object) -> str:
    """``text`` safe for a terminal: every control character escaped (``\\x1b``, ``\\n``: one line stays one
    line). The error printer, the notes and every table cell from a file or a user go through this."""
    return str(text).translate(_UNPRINTABLE)


def cell(text: object) -> str:
    """A rich table cell or console string from untrusted text: printable, and rich markup (``[red]``) escaped."""
    from rich.markup import escape

    return escape(printable(text))


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


@contextmanager
def progress_bar(description: str, enabled: bool = True) -> Iterator:
    """A rich progress bar driven by the library's ``progress(stage, done, total)`` callbacks."""
    import sys

    if not enabled or not sys.stderr.isatty():  # scripts and logs get no bar (and no stray blank lines)
        yield lambda stage, done, total: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=True,
        console=Console(stderr=True),
    ) as bar:
        tasks: dict[str, Any] = {}

        def update(stage: str, done: float, total: float) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(f"{description}: {stage}", total=total or None)
            bar.update(tasks[stage], completed=done, total=total or None)

        yield update
