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
