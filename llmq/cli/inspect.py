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
    if metadata and report["metadata"]:
        table = Table("key", "value", title="metadata")
        for k, v in report["metadata"].items():
            table.add_row(cell(k), cell(v))
        console.print(table)
    if tensors and len(report["tensors"]) > PLAIN_ROWS:
        _plain_tensor_table(report["tensors"])
    elif tensors:
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


PLAIN_ROWS = 2000  # above this many tensors, plain aligned columns: a rich table takes ~80 µs a row


def _plain_tensor_table(rows: list[dict]) -> None:
    import sys

    from llmq.cli.options import printable

    cells = [("name", "dtype", "shape", "bytes", "bpw")]
    cells += [(printable(t["name"]), printable(t["dtype"]), "×".join(map(str, t["shape"])), f"{t['nbytes']:,}",
               f"{t['bpw']:.3f}") for t in rows]  # fmt: skip
    widths = [max(len(c[i]) for c in cells) for i in range(5)]
    out = [f"tensors ({len(rows)})"]
    for c in cells:
        out.append("  ".join([c[0].ljust(widths[0]), c[1].ljust(widths[1]), c[2].ljust(widths[2]),
                              c[3].rjust(widths[3]), c[4].rjust(widths[4])]))  # fmt: skip
    sys.stdout.write("\n".join(out) + "\n")


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_cmd)
