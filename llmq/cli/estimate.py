"""`llmq estimate ...` commands. Imports only typer/rich/llmq.errors at module level (no torch, ever)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from llmq.cli.options import cell
from llmq.errors import BadInput

estimate_app = typer.Typer(
    help="Estimate memory: weights, KV cache, overhead; what fits where.", no_args_is_help=True
)

GIB = 1024**3
GB = 10**9


def register(app: typer.Typer) -> None:
    app.add_typer(estimate_app, name="estimate")


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def _ctx(n: int | None, limit: int) -> str:
    if n is None:
        return "-"
    return f"{n:,}" + ("*" if limit and n > limit else "")


# (header, justify) of the memory table: short headers, the unit in the title, so it fits 80 columns
_COLUMNS = (("quant", "left"), ("weights", "right"), ("KV", "right"), ("other", "right"), ("total", "right"),
            ("GB", "right"), ("fits", "right"), ("max ctx", "right"), ("seqs", "right"), ("GPUs", "right"))  # fmt: skip
_TITLE = "Memory per GPU in GiB (2^30 B); GB = 10^9 B"
_LEGEND = ("other: runtime overhead (see the terms); max ctx: the longest context that fits{beyond}; seqs: "
           "concurrent sequences at the context")  # fmt: skip


def _memory_rows(est) -> list[list[str]]:

    limit = est.arch["max_context"]
    rows = []
    for r in est.results:
        kv_b = sum(t.nbytes for t in r.terms if t.name.startswith(("KV", "recurrent")))
        w_b = sum(t.nbytes for t in r.terms if t.name in ("weights", "vocab padding"))
        fits = "-" if r.fits is None else ("[green]yes[/]" if r.fits else "[red]no[/]")
        rows.append([cell(r.quant), _gib(w_b), _gib(kv_b), _gib(r.total_bytes - w_b - kv_b), _gib(r.total_bytes),
                     f"{r.total_bytes / GB:.2f}", fits, _ctx(r.max_context, limit),
                     "-" if r.max_sequences is None else f"{r.max_sequences:,}",
                     "-" if r.gpus_needed is None and r.fits is None else str(r.gpus_needed or ">64")])  # fmt: skip
    return rows


def _memory_tables(est, width: int) -> list:
    """One row per quantization where that fits ``width``; otherwise the table turned on its side (one column
    per quantization, as many per table as fit), so no header or number is ever cut."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    rows = _memory_rows(est)
    measure = Console(width=10_000).measure
    wide = Table(title=_TITLE)
    for head, justify in _COLUMNS:
        wide.add_column(head, justify=justify, no_wrap=True)
    for row in rows:
        wide.add_row(*row)
    limit = est.arch["max_context"]
    beyond = f" (* beyond the model's {limit:,})" if any(r[7].endswith("*") for r in rows) else ""
    legend = Text(_LEGEND.format(beyond=beyond), style="dim")
    if measure(wide).maximum <= width:
        return [wide, legend]
    label_w = max(len(h) for h, _ in _COLUMNS[1:])
    per = 1  # quantizations per side table: as many as fit, then spread evenly over the tables
    while per < len(rows) and measure(_side_table(rows[: per + 1], label_w, "")).maximum <= width:
        per += 1
    n_tables = -(-len(rows) // per)
    per = -(-len(rows) // n_tables)
    chunks = [rows[i : i + per] for i in range(0, len(rows), per)]
    return [_side_table(c, label_w, _TITLE if i == 0 else "") for i, c in enumerate(chunks)] + [legend]


def _side_table(rows: list[list[str]], label_w: int, title: str):
    from rich.table import Table

    t = Table(title=title or None)
    t.add_column("", no_wrap=True, min_width=label_w)
    for row in rows:
        t.add_column(row[0], justify="right", overflow="fold")
    for i, (head, _) in enumerate(_COLUMNS[1:], start=1):
        t.add_row(head, *(row[i] for row in rows))
    return t


@estimate_app.command("memory")
def memory(
    model: Annotated[str, typer.Argument(help="Hub id (owner/name[:file.gguf]), directory, .safetensors, .gguf or config.json.")],
    quant: Annotated[list[str] | None, typer.Option("--quant", "-q", help="Target format(s): stored, bf16, Q4_K_M, gptq4-g128, awq4, ct8, nf4-dq, int8, fp8, ... (repeatable)")] = None,
    context: Annotated[int | None, typer.Option("--context", "-c", help="Tokens per sequence (default: min(model max, 4096)).")] = None,
    batch: Annotated[int, typer.Option("--batch", "-b", help="Concurrent sequences.")] = 1,
    kv_cache_dtype: Annotated[str | None, typer.Option("--kv-cache-dtype", help="f16|bf16|fp8|q8_0|q4_0 (default: the engine's).")] = None,
    v_cache_dtype: Annotated[str | None, typer.Option("--v-cache-dtype", help="V cache type when it differs from K (llama.cpp).")] = None,
    gpu: Annotated[str | None, typer.Option("--gpu", help="GPU from the catalog (see `llmq estimate gpus`).")] = None,
    vram: Annotated[float | None, typer.Option("--vram", help="GPU memory in GiB (instead of --gpu).")] = None,
    num_gpus: Annotated[int, typer.Option("--num-gpus", help="GPUs available.")] = 1,
    tp: Annotated[int | None, typer.Option("--tp", help="Tensor-parallel degree (vLLM).")] = None,
    engine: Annotated[str | None, typer.Option("--engine", "-e", help="transformers|vllm|llama.cpp (default: llama.cpp for GGUF, else transformers).")] = None,
    fit: Annotated[bool, typer.Option("--fit", help="Find the best quantization that fits the GPU.")] = False,
    flash_attn: Annotated[bool, typer.Option("--flash-attn/--no-flash-attn", help="llama.cpp flash attention (quantized V needs it).")] = True,
    swa_full: Annotated[bool, typer.Option("--swa-full/--no-swa-full", help="llama.cpp: full-size SWA cache (library default) or window-sized (llama-server default).")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print every term with its formula as JSON.")] = False,
) -> None:  # fmt: skip
    """Memory for weights, KV cache and runtime overhead; what fits, max context, GPUs needed."""
    if fit and gpu is None and vram is None:
        raise BadInput("--fit needs --gpu or --vram")
    from llmq import api

    est = api.estimate_memory(model, quants=tuple(quant or ()), context=context, batch=batch,
                              kv_cache_dtype=kv_cache_dtype, v_cache_dtype=v_cache_dtype, gpu=gpu, vram_gib=vram,
                              num_gpus=num_gpus, tp=tp, engine=engine, fit=fit, flash_attn=flash_attn,
                              swa_full=swa_full)  # fmt: skip
    if as_json:
        typer.echo(json.dumps(est.to_dict(), indent=2, default=str))
        return
    _render(est)


def _render(est) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    a = est.arch
    gpu = est.gpu["name"] if est.gpu else "no GPU given"
    budget = f", budget {_gib(est.budget_bytes)} GiB" if est.budget_bytes else ""
    console.print(f"[bold]{cell(est.model)}[/]")
    console.print(cell(f"{a['arch']}, {a['n_layers']} layers, engine {est.engine}, context {est.context:,} × "
                       f"batch {est.batch}, {gpu}{budget}"))  # fmt: skip
    for table in _memory_tables(est, console.width):
        console.print(table)
    first = next((r for r in est.results if r.quant == est.best_fit), est.results[0])
    terms = Table(title=f"Terms for {cell(first.quant)}")
    for col in ("term", "MiB", "kind", "formula"):
        terms.add_column(col, justify="right" if col == "MiB" else "left", overflow="fold")
    for t in first.terms:
        terms.add_row(
            cell(t.name), f"{t.nbytes / 2**20:,.2f}", t.kind, cell(t.formula)
        )  # formulas hold [dtype]
    console.print(terms)
    if first.params_active != first.params_total:
        console.print(
            f"MoE: {first.params_total:,} parameters in total, {first.params_active:,} active per token"
        )
    if first.perf:
        p = first.perf
        parts = [f"{p['flops_per_token'] / 1e9:.2f} GFLOP/token"]
        if "crossover_batch" in p:
            parts.append(f"memory/compute crossover batch ≈ {p['crossover_batch']:.0f}")
        if "decode_latency_s" in p:
            parts.append(f"decode ≥ {p['decode_latency_s'] * 1e3:.2f} ms/token")
        if "prefill_time_s" in p:
            parts.append(f"prefill ≥ {p['prefill_time_s'] * 1e3:.1f} ms")
        console.print("Roofline: " + "; ".join(parts))
    if est.best_fit:
        console.print(f"Best that fits: [bold]{cell(est.best_fit)}[/]")
    elif est.budget_bytes:
        console.print("[red]Nothing fits[/] on one GPU; see the GPUs column.")
    for note in est.notes:
        console.print(f"note: {cell(note)}")


@estimate_app.command("gpus")
def gpus(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The GPU catalog: memory, bandwidth, dense 16-bit FLOP/s."""
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    from llmq.estimate.hardware import CATALOG

    if as_json:
        typer.echo(json.dumps([asdict(g) for g in CATALOG], indent=2))
        return
    table = Table(title="GPU catalog")
    for col in ("name", "memory GiB", "usable GiB", "bandwidth GB/s", "dense TFLOP/s"):
        table.add_column(col, justify="left" if col == "name" else "right")
    for g in CATALOG:
        table.add_row(g.name, f"{g.memory_bytes / GIB:.1f}", f"{g.usable_bytes / GIB:.1f}", f"{g.bandwidth / 1e9:,.0f}",
                      f"{g.flops / 1e12:,.1f}")  # fmt: skip
    Console().print(table)
