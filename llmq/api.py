"""The public Python API. The CLI is a thin layer over these functions; each takes paths/ids plus options and
returns a result object (or a plain dict for reports)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmq.io.hub import resolve_model

Progress = Callable[[str, float, float], None]


def _noop(stage: str, done: float, total: float) -> None:
    return None


def convert(src: str | os.PathLike, dst: str | os.PathLike, outtype: str = "auto", *, force: bool = False,
            max_shard_size: str | int | None = None, revision: str | None = None, progress: Progress = _noop):  # fmt: skip
    """Convert an HF safetensors model (directory or hub id) to GGUF, or a GGUF file to an HF directory."""
    from llmq.convert import convert as _convert

    return _convert(resolve_model(src, revision), dst, outtype, force=force, max_shard_size=max_shard_size,
                    progress=progress)  # fmt: skip


def _method(method: str):
    from llmq.quant.base import quantizers

    return quantizers.get(method)


def _config(method: str, options: dict[str, Any]):
    cls = _method(method)
    return cls, cls.config_cls.from_options(method, options)


def quantize(src: str | os.PathLike, output: str | os.PathLike, method: str, *, force: bool = False,
             progress: Progress = _noop, **options: Any):  # fmt: skip
    """Quantize ``src`` with ``method`` (rtn, nf4, gguf, gptq, awq or a plugin) into ``output``.

    ``options`` are the method's config fields (bits=4, group_size=128, type="Q4_K_M", ...); options the method
    does not take raise BadInput.
    """
    from llmq.io.base import check_output

    cls, config = _config(method, options)
    src_path = resolve_model(src)
    check_output(output, force, inputs=[src_path])
    return cls().run(src_path, Path(output), config, force=force, progress=progress)


def quantize_plan(src: str | os.PathLike, method: str, **options: Any) -> dict[str, Any]:
    """What ``quantize`` would write, from the headers alone (``--dry-run``)."""
    cls, config = _config(method, options)
    infos = list(cls().plan(resolve_model(src), config))
    total = sum(t.nbytes for t in infos)
    n = sum(t.numel for t in infos)
    return {
        "method": method,
        "config": config.to_dict(),
        "total_bytes": total,
        "bits_per_weight": 8.0 * total / n if n else 0.0,
        "tensors": [
            {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes} for t in infos
        ],
    }


def inspect(path: str | os.PathLike) -> dict[str, Any]:
    """Header-only report of a checkpoint: metadata, per-tensor dtype/shape/bytes/bits per weight."""
    from llmq.io import open_checkpoint

    p = resolve_model(path)
    with open_checkpoint(p) as reader:
        infos = list(reader.infos())
        meta: dict[str, str] = {}
        for k, v in (reader.metadata or {}).items():
            if isinstance(v, list):
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
    types: dict[str, int] = {}
    for t in infos:
        types[t.dtype] = types.get(t.dtype, 0) + 1
    n_params = sum(t.numel for t in infos)
    total = sum(t.nbytes for t in infos)
    return {
        "path": str(p),
        "kind": reader.kind,
        "metadata": meta,
        "summary": {
            "n_tensors": len(infos),
            "n_params": n_params,
            "tensor_bytes": total,
            "bits_per_weight": 8.0 * total / n_params if n_params else 0.0,
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


def perplexity(*args: Any, **kwargs: Any):
    """Perplexity / KL divergence of one or more models (see llmq.eval.perplexity.evaluate)."""
    from llmq.eval.perplexity import evaluate

    return evaluate(*args, **kwargs)


def estimate_memory(*args: Any, **kwargs: Any):
    """Memory needed to run a model (see llmq.estimate.memory.estimate)."""
    from llmq.estimate.memory import estimate

    return estimate(*args, **kwargs)
