"""`llmq eval ...` commands. Module level imports only typer/rich/llmq.errors (no torch at --help time)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from llmq.cli.options import cell

eval_app = typer.Typer(help="Evaluate models: perplexity and KL divergence.", no_args_is_help=True)


class _TokensPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} tok/s" if speed else "- tok/s", style="progress.data.speed")


def _progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f} tok"),
        _TokensPerSecond(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def _pm(est, digits: int = 4) -> str:
    if abs(est.value) >= 1000:
        digits = 1
    return f"{est.value:.{digits}f} ± {est.se:.{digits}f}"


def _name(spec: str) -> str:
    return cell(Path(spec).name or spec)


def _summary(base, results) -> list[Table]:
    """The comparison table (size, bpw, PPL, ΔPPL, KLD, top-1) and, with a base, llama-perplexity's KL details."""
    has_kld = any(r.kld is not None for r in results)
    t = Table(title="Perplexity" + (" and KL divergence vs base" if has_kld else ""))
    t.add_column("model", overflow="fold")
    for col in ("MiB", "bpw", "PPL") + (("ΔPPL", "mean KLD", "same top %") if has_kld else ()) + ("tok/s",):
        t.add_column(col, justify="right", no_wrap=True)
    rows = ([(base, True)] if base is not None else []) + [(r, False) for r in results]
    for r, is_base in rows:
        cells = [_name(r.model) + (" (base)" if is_base else ""), f"{r.size_bytes / 2**20:,.1f}",
                 f"{r.bits_per_weight:.3f}", _pm(r.ppl)]  # fmt: skip
        if has_kld:
            k = r.kld
            cells += ["-"] * 3 if k is None else [
                _pm(k.ppl_diff), _pm(k.kld_mean, 5), f"{100 * k.same_top.value:.2f} ± {100 * k.same_top.se:.2f}"
            ]  # fmt: skip
        cells.append(f"{r.tokens_per_s:,.0f}")
        t.add_row(*cells)
    if not has_kld:
        return [t]
    d = Table(title="KL divergence details (as llama-perplexity --kl-divergence)")
    d.add_column("model", overflow="fold")
    for col in ("PPL(Q)/PPL(base)", "median KLD", "99% KLD", "99.9% KLD", "max KLD", "Δp RMS %"):
        d.add_column(col, justify="right", no_wrap=True)
    for r in results:
        k = r.kld
        if k is not None:
            d.add_row(_name(r.model), _pm(k.ppl_ratio), _pm(k.kld_median, 5), _pm(k.kld_p99, 4),
                      _pm(k.kld_p999, 4), f"{k.kld_max:.4f}",
                      f"{100 * k.dp_rms.value:.3f} ± {100 * k.dp_rms.se:.3f}")  # fmt: skip
    return [t, d]


@eval_app.command("perplexity")
def perplexity(
    models: Annotated[
        list[str], typer.Argument(help="Models: GGUF files, HF checkpoint dirs, or 'smollm2'.")
    ],
    base: Annotated[
        str | None, typer.Option("--base", help="Base model, or a saved base-logits file, for KLD.")
    ] = None,
    dataset: Annotated[
        str, typer.Option("--dataset", help="wikitext2, pydocs or a text file.")
    ] = "wikitext2",
    ctx: Annotated[int, typer.Option("--ctx", help="Tokens per window.")] = 512,
    chunks: Annotated[
        int | None, typer.Option("--chunks", help="Evaluate at most this many windows.")
    ] = None,
    stride: Annotated[
        int | None,
        typer.Option("--stride", help="Strided sliding window (transformers guide) with this stride."),
    ] = None,
    batch: Annotated[int | None, typer.Option("--batch", help="Windows per forward pass.")] = None,
    backend: Annotated[
        str | None, typer.Option("--backend", help="torch or llamacpp (default: from input).")
    ] = None,
    device: Annotated[
        str, typer.Option("--device", help="cpu or cuda (torch backend; llama.cpp GPU builds).")
    ] = "cpu",
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="torch compute dtype: float32/float16/bfloat16.")
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads.")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Base log-probs kept per token for KLD.")] = 64,
    save_logits: Annotated[
        Path | None,
        typer.Option("--save-logits", help="Write the base's (or first model's) compact logits here."),
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Save the results as JSON.")] = None,
    chart: Annotated[
        Path | None, typer.Option("--chart", help="PNG: bits per weight against KLD (needs matplotlib).")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite --output/--chart/--save-logits files.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Perplexity (llama-perplexity's protocol by default) and, with --base, KL divergence of each model."""
    from llmq import api
    from llmq.eval.perplexity import PerplexityConfig

    config = PerplexityConfig(dataset=dataset, ctx=ctx, chunks=chunks, stride=stride, batch=batch, backend=backend,
                              device=device, dtype=dtype, threads=threads, top_k=top_k)  # fmt: skip
    console = Console(stderr=True)
    with _progress_bar(console) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: float, total: float) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(_name(stage), total=total)
            bar.update(tasks[stage], completed=done, total=total)

        report = api.compare_perplexity(models, config, base=base, save_base=save_logits, output=output,
                                        chart=chart, force=force, progress=progress)  # fmt: skip
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        out_console = Console()
        if not out_console.is_terminal:  # a pipe or file: do not squeeze the table into 80 columns
            out_console = Console(width=200)
        for table in _summary(report.base, report.results):
            out_console.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
