"""`llmq convert SRC DST`: HF safetensors directory ⇄ GGUF."""

from __future__ import annotations

from typing import Annotated

import typer

from llmq.cli.options import AllowPickle, Force, Json, Quiet, human_bytes, print_json, printable, progress_bar


def convert_cmd(
    src: Annotated[str, typer.Argument(help="HF model directory, .gguf file, hub repo id, or 'smollm2'.")],
    dst: Annotated[str, typer.Argument(help="Output: a .gguf file (from HF) or a directory (from GGUF).")],
    outtype: Annotated[
        str, typer.Option("--outtype", help="HF→GGUF: f32|f16|bf16|q8_0|auto. GGUF→HF: f32|f16|bf16|auto.")
    ] = "auto",
    max_shard_size: Annotated[
        str | None, typer.Option("--max-shard-size", help="GGUF→HF: shard size, e.g. 5GB, 500MB.")
    ] = None,
    revision: Annotated[
        str | None, typer.Option("--revision", help="Hub revision (branch, tag, commit).")
    ] = None,
    force: Force = False,
    allow_pickle: AllowPickle = False,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Convert between Hugging Face safetensors and GGUF; the direction follows SRC."""
    from llmq import api

    with progress_bar("convert", enabled=not (quiet or json_out)) as progress:
        result = api.convert(src, dst, outtype=outtype, force=force, max_shard_size=max_shard_size,
                             revision=revision, allow_pickle=allow_pickle, progress=progress)  # fmt: skip
    if json_out:
        print_json(result.to_dict())
        return
    types = ", ".join(f"{n}×{t}" for t, n in sorted(result.types.items()))
    typer.echo(
        printable(
            f"{result.direction} {result.arch}: {result.n_tensors} tensors ({types}) → {result.dst} "
            f"[{result.outtype}, {human_bytes(result.output_bytes)}, {result.seconds:.1f} s]"
        )
    )


def register(app: typer.Typer) -> None:
    app.command("convert")(convert_cmd)
