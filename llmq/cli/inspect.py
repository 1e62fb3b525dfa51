"""`llmq inspect FILE`: header, metadata and per-tensor types of a checkpoint, without reading weights."""

from __future__ import annotations

from typing import Annotated

import typer

from llmq.cli.options import AllowPickle, Json, cell, human_bytes, print_json


def inspect_cmd(
    path: Annotated[
        str, typer.Argument(help="A .safetensors file, HF model directory, .gguf file or 'smollm2'.")
    ],
    tensors: Annotated[bool, typer.Option("--tensors/--no-tensors", help="List every tensor.")] = True,
    metadata: Annotated[bool, typer.Option("--metadata/--no-metadata", help="Show metadata keys.")] = True,
    allow_pickle: AllowPickle = False,
    json_out: Json = False,
) -> None:
    """Show a checkpoint's metadata and tensors (dtype, shape, bytes, bits per weight)."""
    from llmq import api

    report = api.inspect(path, allow_pickle=allow_pickle)
    if json_out:
        print_json(report)
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    s = report["summary"]
    console.print(
        f"[bold]{cell(report['path'])}[/bold]  {report['kind']}  {s['n_tensors']} tensors, "
        f"{s['n_params']:,} parameters, {human_bytes(s['tensor_bytes'])}, {s['bits_per_weight']:.3f} bits/weight"
    )
    console.print("types: " + ", ".join(f"{cell(t)}×{n}" for t, n in sorted(s["types"].items())))
    if "recipe" in report:
        r = report["recipe"]
        console.print(
            f"recipe (quantize.recipe): base {cell(r.get('base_type'))}, {r.get('tensors')} tensors: "
            + ", ".join(f"{cell(t)}×{n}" for t, n in r.get("types", {}).items())
            if "error" not in r
            else f"recipe (quantize.recipe): {cell(r['error'])}"
        )
    if metadata and report["metadata"]:
        table = Table("key", "value", title="metadata")
        for k, v in report["metadata"].items():
            table.add_row(cell(k), cell(v))
        console.print(table)
    if tensors:
        table = Table("name", "dtype", "shape", "bytes", "bpw", title="tensors")
        for t in report["tensors"]:
            table.add_row(
                cell(t["name"]),
                cell(t["dtype"]),
                "×".join(map(str, t["shape"])),
                f"{t['nbytes']:,}",
                f"{t['bpw']:.3f}",
            )
        console.print(table)


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_cmd)
