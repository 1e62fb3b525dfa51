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
    if metadata and len(report["metadata"]) > PLAIN_ROWS:
        _plain_table("metadata", ("key", "value"), [(k, v) for k, v in report["metadata"].items()], "ll")
    elif metadata and report["metadata"]:
        table = Table("key", "value", title="metadata")
        for k, v in report["metadata"].items():
            table.add_row(cell(k), cell(v))
        console.print(table)
    if tensors and len(report["tensors"]) > PLAIN_ROWS:
        rows = [(t["name"], t["dtype"], "×".join(map(str, t["shape"])), f"{t['nbytes']:,}", f"{t['bpw']:.3f}")
                for t in report["tensors"]]  # fmt: skip
        _plain_table("tensors", ("name", "dtype", "shape", "bytes", "bpw"), rows, "lllrr")
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


PLAIN_ROWS = 2000  # above this many rows, plain aligned columns: a rich table takes ~80 µs a row


def _plain_table(title: str, header: tuple[str, ...], rows: list[tuple], align: str) -> None:
    """Aligned plain columns, every cell escaped (llmq.cli.options.printable), written at once."""
    import sys

    from llmq.cli.options import printable

    cells = [header] + [tuple(printable(c) for c in row) for row in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    out = [f"{title} ({len(rows)})"]
    for c in cells:
        out.append("  ".join(v.ljust(w) if a == "l" else v.rjust(w) for v, w, a in zip(c, widths, align)))
    sys.stdout.write("\n".join(out) + "\n")


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_cmd)
