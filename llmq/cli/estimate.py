"""`llmq estimate ...` commands."""

from __future__ import annotations

import typer

estimate_app = typer.Typer(
    help="Estimate memory: weights, KV cache, overhead; what fits where.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    app.add_typer(estimate_app, name="estimate")
