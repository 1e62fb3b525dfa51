"""`llmq quantize SRC -o OUT --method M`: every method is a plugin; the options it does not use are refused."""

from __future__ import annotations

from typing import Annotated

import typer

from llmq.cli.options import Force, Json, Quiet, cell, human_bytes, print_json, printable, progress_bar

_M = "Method"
_G = "GPTQ / AWQ / RTN"
_F = "GGUF"
_C = "Calibration"
_N = "NF4 / FP4"
_B = "GGUF budget"

# The config fields among quantize_cmd's parameters are those that default to None ("not given"), but these
# two; two fields have a parameter name of their own.
_NOT_OPTIONS = {"set_options", "config_file"}
_RENAMED = {"fmt": "format", "gguf_type": "type"}


def _config_options(params: dict) -> dict:
    """The config options the user gave, from quantize_cmd's parameters (lists as tuples)."""
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(quantize_cmd).parameters.items()}
    return {_RENAMED.get(k, k): tuple(v) if isinstance(v, list) else v for k, v in params.items()
            if defaults.get(k, ...) is None and k not in _NOT_OPTIONS and v is not None}  # fmt: skip


def quantize_cmd(
    src: Annotated[str, typer.Argument(help="HF model directory, GGUF file, hub repo id, or 'smollm2'.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Output .gguf file or directory.")],
    method: Annotated[
        str, typer.Option("--method", "-m", help="rtn | nf4 | gguf | gptq | awq", rich_help_panel=_M)
    ],
    set_options: Annotated[
        list[str] | None,
        typer.Option(
            "--option",
            "-O",
            help="KEY=VALUE: any option of the method's config, plugins' own included (repeatable; "
            "see docs/quantize.md).",
            rich_help_panel=_M,
        ),
    ] = None,
    config_file: Annotated[
        str | None,
        typer.Option(
            "--config",
            help="TOML or JSON file of the method's options; -O and the flags override it.",
            rich_help_panel=_M,
        ),
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format", help="gptq | awq | compressed-tensors | bnb | fake | gguf", rich_help_panel=_M
        ),
    ] = None,
    bits: Annotated[
        int | None, typer.Option("--bits", help="Integer bits (2-8).", rich_help_panel=_G)
    ] = None,
    group_size: Annotated[
        int | None,
        typer.Option("--group-size", help="Columns per scale; -1 = per channel.", rich_help_panel=_G),
    ] = None,
    sym: Annotated[
        bool | None,
        typer.Option("--sym/--asym", help="Symmetric or asymmetric (zero point).", rich_help_panel=_G),
    ] = None,
    act_order: Annotated[
        bool | None, typer.Option("--act-order/--no-act-order", help="GPTQ desc_act.", rich_help_panel=_G)
    ] = None,
    static_groups: Annotated[
        bool | None, typer.Option("--static-groups/--no-static-groups", rich_help_panel=_G)
    ] = None,
    true_sequential: Annotated[
        bool | None, typer.Option("--true-sequential/--no-true-sequential", rich_help_panel=_G)
    ] = None,
    damp_percent: Annotated[
        float | None,
        typer.Option(
            "--damp-percent",
            help="GPTQ dampening (fraction of mean diag H; default 0.2).",
            rich_help_panel=_G,
        ),
    ] = None,
    token_clip: Annotated[
        float | None,
        typer.Option(
            "--token-clip",
            help="GPTQ: scale calibration tokens whose input norm exceeds K x the median down to K x (0 = off).",
            rich_help_panel=_G,
        ),
    ] = None,
    mse: Annotated[
        float | None,
        typer.Option(
            "--mse",
            help="GPTQ: search each group's range for the smallest sum |w - q|^P (P, e.g. 2.4; 0 = full range).",
            rich_help_panel=_G,
        ),
    ] = None,
    float_target: Annotated[
        float | None,
        typer.Option(
            "--float-target",
            help="GPTQ: fit each layer to the unquantized model's outputs (GPTAQ-style), weight A in [0, 1] "
            "(default 1; 0 = plain GPTQ, about half the time).",
            rich_help_panel=_G,
        ),
    ] = None,
    skip_indivisible: Annotated[
        bool | None,
        typer.Option(
            "--skip-indivisible/--no-skip-indivisible",
            help="Leave layers whose width does not divide the group size unquantized.",
            rich_help_panel=_G,
        ),
    ] = None,
    ignore: Annotated[
        list[str] | None,
        typer.Option(
            "--ignore",
            help="Module pattern to leave unquantized (repeatable): a glob over the name or whole dotted parts "
            "of it (q_proj, layers.0, *.mlp.*) or re:REGEX. See docs/quantize.md 'Choosing layers'.",
            rich_help_panel=_G,
        ),
    ] = None,
    only: Annotated[
        list[str] | None,
        typer.Option(
            "--only",
            help="Quantize only modules matching a pattern (repeatable; same patterns as --ignore, which still "
            "wins); overrides the default exclusion of embeddings, lm_head and norms.",
            rich_help_panel=_G,
        ),
    ] = None,
    resume: Annotated[
        bool | None,
        typer.Option(
            "--resume/--no-resume",
            help="GPTQ/AWQ: skip blocks finished by an interrupted run.",
            rich_help_panel=_G,
        ),
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="cpu | cuda | cuda:N", rich_help_panel=_G)
    ] = None,
    quant_type: Annotated[
        str | None, typer.Option("--quant-type", help="nf4 | fp4", rich_help_panel=_N)
    ] = None,
    blocksize: Annotated[
        int | None,
        typer.Option(
            "--blocksize", help="NF4/FP4 block size (64); GPTQ lazy-batch columns (128).", rich_help_panel=_N
        ),
    ] = None,
    double_quant: Annotated[
        bool | None, typer.Option("--double-quant/--no-double-quant", rich_help_panel=_N)
    ] = None,
    compute_dtype: Annotated[
        str | None, typer.Option("--compute-dtype", help="bnb_4bit_compute_dtype.", rich_help_panel=_N)
    ] = None,
    gguf_type: Annotated[
        str | None,
        typer.Option(
            "--type",
            help="GGUF file type as llama-quantize takes it: Q4_K_M, q8_0, Q4_K, 15, ... (list: docs/quantize-gguf.md).",
            rich_help_panel=_F,
        ),
    ] = None,
    imatrix: Annotated[
        str | None,
        typer.Option("--imatrix", help="llama.cpp importance matrix (.dat or .gguf).", rich_help_panel=_F),
    ] = None,
    save_imatrix: Annotated[
        str | None,
        typer.Option("--save-imatrix", help="Write the computed imatrix here.", rich_help_panel=_F),
    ] = None,
    allow_requantize: Annotated[
        bool | None,
        typer.Option("--allow-requantize", help="Allow a quantized GGUF as input.", rich_help_panel=_F),
    ] = None,
    pure: Annotated[
        bool | None,
        typer.Option("--pure", help="No per-tensor mix rules: one type everywhere.", rich_help_panel=_F),
    ] = None,
    output_tensor_type: Annotated[
        str | None, typer.Option("--output-tensor-type", rich_help_panel=_F)
    ] = None,
    token_embedding_type: Annotated[
        str | None, typer.Option("--token-embedding-type", rich_help_panel=_F)
    ] = None,
    leave_output_tensor: Annotated[
        bool | None, typer.Option("--leave-output-tensor", rich_help_panel=_F)
    ] = None,
    tensor_type: Annotated[
        list[str] | None,
        typer.Option("--tensor-type", help="PATTERN=TYPE override (repeatable).", rich_help_panel=_F),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            help="Encoding workers: processes on Linux, threads elsewhere (default: the CPUs available, "
            "as llama-quantize).",
            rich_help_panel=_F,
        ),
    ] = None,
    target_bpw: Annotated[
        float | None,
        typer.Option(
            "--target-bpw",
            help="Budget: bits per weight over all tensors; types chosen per tensor "
            "by measured sensitivity (needs --imatrix or --calibration).",
            rich_help_panel=_B,
        ),
    ] = None,
    target_size: Annotated[
        str | None,
        typer.Option(
            "--target-size", help="Budget: the output file's size, e.g. 4.5GiB.", rich_help_panel=_B
        ),
    ] = None,
    fit: Annotated[
        str | None,
        typer.Option(
            "--fit",
            help="Budget: what fits this GPU (llmq estimate's names) at --context, "
            "KV cache and overhead taken off first.",
            rich_help_panel=_B,
        ),
    ] = None,
    context: Annotated[
        int | None, typer.Option("--context", help="--fit: context length.", rich_help_panel=_B)
    ] = None,
    batch: Annotated[
        int | None, typer.Option("--batch", help="--fit: parallel sequences (1).", rich_help_panel=_B)
    ] = None,
    kv_cache_dtype: Annotated[
        str | None, typer.Option("--kv-cache-dtype", help="--fit: KV cache type (f16).", rich_help_panel=_B)
    ] = None,
    budget_types: Annotated[
        str | None,
        typer.Option(
            "--budget-types",
            help="Candidate ggml types, comma-separated (Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q8_0).",
            rich_help_panel=_B,
        ),
    ] = None,
    recipe: Annotated[
        str | None,
        typer.Option(
            "--recipe",
            help="Replay a budgeted mix: its recipe JSON (or a GGUF holding one).",
            rich_help_panel=_B,
        ),
    ] = None,
    save_recipe: Annotated[
        str | None,
        typer.Option(
            "--save-recipe",
            help="Where a budgeted run writes its recipe (OUT.recipe.json).",
            rich_help_panel=_B,
        ),
    ] = None,
    calibration: Annotated[
        str | None,
        typer.Option(
            "--calibration", help="pydocs | wikitext2 | c4 | pile-val | ptb | FILE", rich_help_panel=_C
        ),
    ] = None,
    nsamples: Annotated[
        int | None, typer.Option("--nsamples", help="Calibration samples.", rich_help_panel=_C)
    ] = None,
    seqlen: Annotated[
        int | None, typer.Option("--seqlen", help="Tokens per calibration sample.", rich_help_panel=_C)
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", rich_help_panel=_C)] = None,
    max_shard_size: Annotated[str | None, typer.Option("--max-shard-size", help="e.g. 5GB")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be written; read no weights.")
    ] = False,
    force: Force = False,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Quantize a model with one of the built-in or plugin methods."""
    # The flags are the method's config fields under their own names: read them from the parameters instead
    # of writing each one a second time. This must stay the first statement (nothing else in locals() yet).
    options = _config_options(dict(locals()))
    from llmq import api

    given = {"config_file": config_file, "set_options": tuple(set_options or ())}
    if dry_run:
        plan = api.quantize_plan(src, method, **given, **options)
        if json_out:
            print_json(plan)
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(
            "tensor",
            "dtype",
            "shape",
            "bytes",
            title=f"{cell(method)}: would write {len(plan['tensors'])} tensors",
        )
        for t in plan["tensors"]:
            table.add_row(
                cell(t["name"]), cell(t["dtype"]), "×".join(map(str, t["shape"])), f"{t['nbytes']:,}"
            )
        Console().print(table)
        typer.echo(f"total {human_bytes(plan['total_bytes'])}, {plan['bits_per_weight']:.3f} bits/weight")
        return
    try:
        with progress_bar(method, enabled=not (quiet or json_out)) as progress:
            result = api.quantize(src, output, method, force=force, progress=progress, **given, **options)
    except KeyboardInterrupt:
        from llmq.io.temporaries import resume_dir

        kept = resume_dir(output)
        if kept.is_dir():  # the one temporary kept on purpose: say where it is and what it is for
            typer.echo(f"note: kept {printable(kept)} (the finished blocks): the same command with --resume "
                       "continues from it; delete it otherwise", err=True)  # fmt: skip
        raise
    if json_out:
        print_json(result.to_dict())
        return
    for note in result.notes:
        typer.echo(f"note: {printable(note)}", err=True)
    d = result.to_dict()
    bpw = f", {d['bits_per_weight']:.3f} bits/weight" if d["bits_per_weight"] else ""
    typer.echo(
        printable(
            f"{result.method} → {result.output} [{result.format}, {human_bytes(result.output_bytes)}{bpw}, "
            f"{result.seconds:.1f} s]"
        )
    )


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize_cmd)
