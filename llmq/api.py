"""The public Python API. The CLI is a thin layer over these functions; each takes paths/ids plus options and
returns a result object (or a plain dict for reports)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmq.io.base import bits_per_weight
from llmq.io.hub import resolve_model
from llmq.progress import Progress
from llmq.progress import no_progress as _noop


def convert(src: str | os.PathLike, dst: str | os.PathLike, outtype: str = "auto", *, force: bool = False,
            max_shard_size: str | int | None = None, revision: str | None = None, allow_pickle: bool = False,
            progress: Progress = _noop):  # fmt: skip
    """Convert an HF safetensors model (directory or hub id) to GGUF, or a GGUF file to an HF directory."""
    from llmq.conversion import convert as _convert

    return _convert(resolve_model(src, revision), dst, outtype, force=force, max_shard_size=max_shard_size,
                    allow_pickle=allow_pickle, progress=progress)  # fmt: skip


def _method(method: str):
    from llmq.quant.base import quantizers

    return quantizers.get(method)


def _config(method: str, options: dict[str, Any], config_file: str | os.PathLike | None = None,
            set_options: Sequence[str] = ()):  # fmt: skip
    from llmq.quant.base import gather_options

    cls = _method(method)
    extra = gather_options(set_options, config_file)
    return cls, cls.config_cls.from_options(method, options, extra)


def quantize(src: str | os.PathLike, output: str | os.PathLike, method: str, *, force: bool = False,
             progress: Progress = _noop, config_file: str | os.PathLike | None = None,
             set_options: Sequence[str] = (), **options: Any):  # fmt: skip
    """Quantize ``src`` with ``method`` (rtn, nf4, gguf, gptq, awq or a plugin) into ``output``.

    ``options`` are the method's config fields (bits=4, group_size=128, type="Q4_K_M", ...); options the method
    does not take raise BadInput. ``config_file`` (TOML/JSON) and ``set_options`` ("key=value" strings, as
    ``-O``) give more of them as text, converted to the fields' types; ``options`` override both.
    """
    from llmq.io.base import check_output

    cls, config = _config(method, options, config_file, set_options)
    src_path = resolve_model(src)
    check_output(output, force, inputs=[src_path])
    result = cls().run(src_path, Path(output), config, force=force, progress=progress)
    if not result.n_params:
        result.n_params = _n_params(src_path)
    return result


def _n_params(path: Path) -> int:
    from llmq.io import open_checkpoint

    with open_checkpoint(path, header_only=True) as reader:
        return sum(t.numel for t in reader.infos())


def quantize_plan(src: str | os.PathLike, method: str, *, config_file: str | os.PathLike | None = None,
                  set_options: Sequence[str] = (), **options: Any) -> dict[str, Any]:  # fmt: skip
    """What ``quantize`` would write, from the headers alone (``--dry-run``)."""
    cls, config = _config(method, options, config_file, set_options)
    src_path = resolve_model(src)
    infos = list(cls().plan(src_path, config))
    total = sum(t.nbytes for t in infos)
    n = _n_params(src_path)
    return {
        "method": method,
        "config": config.to_dict(),
        "total_bytes": total,
        "bits_per_weight": bits_per_weight(total, n),
        "tensors": [
            {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes} for t in infos
        ],
    }


def inspect(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, Any]:
    """Header-only report of a checkpoint: metadata, per-tensor dtype/shape/bytes/bits per weight."""
    from llmq.io import open_checkpoint

    p = resolve_model(path)
    with open_checkpoint(p, allow_pickle=allow_pickle, header_only=True) as reader:
        infos = list(reader.infos())
        meta: dict[str, str] = {}
        for k, v in (reader.metadata or {}).items():
            if isinstance(v, list) or type(v).__name__ == "SkippedStrings":
                meta[k] = f"[{len(v)} items]" if len(v) > 8 else repr(v)
            else:
                s = repr(v) if not isinstance(v, str) else v
                meta[k] = s if len(s) <= 120 else s[:117] + "..."
        if reader.config:
            for k in (
                "architectures",
                "model_type",
                "hidden_size",
                "num_hidden_layers",
                "quantization_config",
            ):
                if k in reader.config:
                    meta[f"config.{k}"] = repr(reader.config[k])
        recipe = (reader.metadata or {}).get("quantize.recipe")
    types: dict[str, int] = {}
    for t in infos:
        types[t.dtype] = types.get(t.dtype, 0) + 1
    n_params = sum(t.numel for t in infos)
    total = sum(t.nbytes for t in infos)
    extra: dict[str, Any] = {}
    if isinstance(recipe, str | bytes):
        from llmq.quant.gguf.budget import recipe_summary

        text = recipe.decode("utf-8", "replace") if isinstance(recipe, bytes) else recipe
        extra["recipe"] = recipe_summary(text)
    return {
        **extra,
        "path": str(p),
        "kind": reader.kind,
        "metadata": meta,
        "summary": {
            "n_tensors": len(infos),
            "n_params": n_params,
            "tensor_bytes": total,
            "bits_per_weight": bits_per_weight(total, n_params),
            "types": types,
        },
        "tensors": [
            {
                "name": t.name,
                "dtype": t.dtype,
                "shape": list(t.shape),
                "nbytes": t.nbytes,
                "bpw": t.bits_per_weight,
            }
            for t in infos
        ],
    }


def perplexity(model: str, config=None, **kwargs: Any):
    """Perplexity (and KL divergence with a base) of one model: llmq.eval.perplexity.evaluate, which returns
    (result, base_record). ``config`` is an llmq.eval.perplexity.PerplexityConfig (defaults when None)."""
    from llmq.eval import perplexity as ppl

    return ppl.evaluate(model, config if config is not None else ppl.PerplexityConfig(), **kwargs)


@dataclass
class PerplexityReport:
    """What ``compare_perplexity`` returns: the config, the base's result (when the base is a model) and the
    models' results (llmq.eval.perplexity.PerplexityResult)."""

    config: Any
    base: Any | None
    results: list[Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "base": self.base.to_dict() if self.base is not None else None,
            "results": [r.to_dict() for r in self.results],
        }


def compare_perplexity(models: list[str], config=None, *, base: str | None = None,
                       save_base: str | os.PathLike | None = None, output: str | os.PathLike | None = None,
                       chart: str | os.PathLike | None = None, force: bool = False,
                       progress: Progress = _noop) -> PerplexityReport:  # fmt: skip
    """Perplexity of each of ``models`` and, with ``base`` (a model or a saved base-logits file), their KL
    divergence from it. ``config``: an llmq.eval.perplexity.PerplexityConfig (defaults when None).

    ``save_base`` writes the compact base record (of ``base``, or of the first model without one), ``output``
    the returned report as JSON, ``chart`` a PNG of bits per weight against KLD. Every output is checked before
    the evaluation starts, not after minutes of it.
    """
    import json

    from llmq.errors import BadInput, require
    from llmq.eval import perplexity as ppl
    from llmq.io.base import AtomicOutput, check_output

    outs = [Path(p) for p in (output, chart, save_base) if p is not None]
    for out in outs:
        check_output(out, force)
    if len({p.resolve() for p in outs}) < len(outs):
        raise BadInput("--output, --chart and --save-logits must be different files")
    if chart is not None:
        require("matplotlib", "plot")
    config = config if config is not None else ppl.PerplexityConfig()
    base_result, results = ppl.compare(list(models), config, base=base, save_base=save_base, force=force,
                                       progress=progress)  # fmt: skip
    report = PerplexityReport(config, base_result, results)
    if output is not None:
        with AtomicOutput(output, is_dir=False, force=force) as tmp:
            tmp.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    if chart is not None:
        from llmq.eval.chart import write_chart

        write_chart(chart, results, force=force)
    return report


def estimate_memory(model: str, **options: Any):
    """Memory needed to run ``model`` (options: the fields of llmq.estimate.EstimateConfig: quants, context,
    batch, kv_cache_dtype, gpu, vram_gib, num_gpus, tp, engine, fit, ...)."""
    from llmq.estimate import EstimateConfig
    from llmq.estimate import estimate_memory as _estimate

    return _estimate(EstimateConfig(model, **options))
