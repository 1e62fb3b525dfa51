"""Budgeted GGUF mixes: a ggml type per tensor, chosen by measured sensitivity for a byte budget.

``llmq quantize --method gguf`` with ``--target-bpw``, ``--target-size`` or ``--fit GPU --context N``:

1. the budget in tensor bytes (the estimator's, for ``--fit``: its GPU budget less the KV cache and overhead);
2. for every weight matrix with importance data and every candidate type (``--budget-types``, each resolved
   through llama-quantize's fallback for rows that do not divide the block size), the proxy loss
   ``sum_j imatrix_j * (w_ij - q(w)_ij)^2`` over the tensor's rows (a fixed, evenly spaced sample of at most
   ``max_rows`` rows, scaled to the whole tensor), with the same encoders and imatrix the file is written with;
3. the exact multiple-choice knapsack over the real per-tensor bytes (:mod:`llmq.quant.allocate`).

Tensors without importance data (token_embd; the tied output), 3-D expert tensors and those pinned by
``--tensor-type``/``--output-tensor-type``/``--token-embedding-type`` keep the type the base mix (``--type``)
gives them, and their bytes count against the budget.

The chosen map is a *recipe*: a readable JSON file, and the compact key ``quantize.recipe`` in the GGUF
metadata. ``--recipe FILE`` replays it without measuring: with the same source and imatrix the output is the
same file, byte for byte.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmq.errors import BadInput
from llmq.io.base import TensorInfo, parse_size
from llmq.io.ggml_types import type_nbytes
from llmq.quant.gguf.mix import (
    PLAIN_TYPES,
    _fallback,
    allows_quantization,
    parse_ggml_type,
)

DEFAULT_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
RECIPE_KEY = "quantize.recipe"
RECIPE_FORMAT = "llmq.gguf-recipe"
RECIPE_VERSION = 1
MAX_ROWS = 512  # rows sampled per tensor for the proxy loss
# GGUF bytes besides the tensor data, beyond the source's own header: the recipe key is added separately
_HEADER_MARGIN = 4096


# ------------------------------------------------------------------------------------------------ options


def parse_types(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """``--budget-types Q3_K,Q4_K,...`` (comma-separated or repeated) as ggml type names."""
    if spec is None:
        return DEFAULT_TYPES
    parts = spec.split(",") if isinstance(spec, str) else [p for s in spec for p in s.split(",")]
    from llmq.quant.gguf.blocks import SUPPORTED_TYPES

    out: list[str] = []
    for p in parts:
        if not p.strip():
            continue
        t = parse_ggml_type(p)
        if t not in SUPPORTED_TYPES and t not in ("F16", "BF16", "F32"):
            raise BadInput(f"--budget-types: llmq has no encoder for {t}")
        if t not in out:
            out.append(t)
    if not out:
        raise BadInput("--budget-types is empty")
    return tuple(out)


def parse_target_size(value: str) -> int:
    try:
        n = parse_size(value)
    except BadInput:
        n = None
    if not n or n <= 0:
        raise BadInput(f"--target-size {value!r} is not a size like 4.5GiB, 800MB or a byte count")
    return n


def check_options(cfg: Any) -> None:
    """The budget options of a GGUFQuantConfig make sense together (raises BadInput)."""
    given = [n for n, v in (("--target-bpw", cfg.target_bpw), ("--target-size", cfg.target_size),
                            ("--fit", cfg.fit)) if v is not None]  # fmt: skip
    if len(given) > 1:
        raise BadInput(f"{' and '.join(given)} are exclusive: give one budget")
    if cfg.recipe and given:
        raise BadInput(f"--recipe replays a chosen mix: it cannot be combined with {given[0]}")
    if cfg.target_bpw is not None and not 0 < cfg.target_bpw <= 32:
        raise BadInput(f"--target-bpw must be in (0, 32], got {cfg.target_bpw}")
    if cfg.target_size is not None:
        parse_target_size(cfg.target_size)
    if cfg.fit is not None and cfg.context is None:
        raise BadInput("--fit needs --context N")
    if cfg.fit is None and (cfg.context is not None or cfg.batch is not None or cfg.kv_cache_dtype):
        raise BadInput("--context, --batch and --kv-cache-dtype go with --fit GPU")
    if cfg.context is not None and cfg.context < 1 or cfg.batch is not None and cfg.batch < 1:
        raise BadInput("--context and --batch must be at least 1")
    if (cfg.budget_types is not None or cfg.save_recipe) and not given:
        raise BadInput(
            "--budget-types and --save-recipe need a budget (--target-bpw, --target-size or --fit)"
        )
    if given and not (cfg.imatrix or cfg.calibration):
        raise BadInput(
            "a budget needs importance data to measure sensitivity: pass --imatrix or --calibration"
        )
    if cfg.budget_types is not None:
        parse_types(cfg.budget_types)


def has_budget(cfg: Any) -> bool:
    return cfg.target_bpw is not None or cfg.target_size is not None or cfg.fit is not None


# ------------------------------------------------------------------------------------------------ sensitivity


def candidates(shape: Sequence[int], types: Sequence[str]) -> list[str]:
    """The distinct types ``types`` become on a tensor of ``shape`` through llama-quantize's fallbacks."""
    out: list[str] = []
    for t in types:
        r = t if t in PLAIN_TYPES else _fallback(int(shape[-1]), t)
        if r not in out:
            out.append(r)
    return out


def sample_rows(n_rows: int, max_rows: int = MAX_ROWS) -> np.ndarray:
    """Evenly spaced row indices (all rows when there are at most ``max_rows``)."""
    if n_rows <= max_rows:
        return np.arange(n_rows)
    return np.unique(np.linspace(0, n_rows - 1, max_rows).round().astype(np.int64))


def roundtrip(x: np.ndarray, type_name: str, qw: np.ndarray | None) -> np.ndarray:
    """``x`` (rows, n) encoded as ``type_name`` with importance ``qw`` and decoded back to float32."""
    from llmq.quant.gguf import blocks

    if type_name == "F32":
        return x
    if type_name == "F16":
        return x.astype(np.float16).astype(np.float32)
    if type_name == "BF16":
        from llmq.quant.gguf.workers import to_bf16

        return (to_bf16(x).astype(np.uint32) << 16).view(np.float32)
    raw = blocks.quantize(x, type_name, qw, threads=1)
    return blocks.dequantize(raw, type_name, x.shape)


def proxy_loss(x: np.ndarray, xq: np.ndarray, qw: np.ndarray) -> float:
    """sum_rows sum_j qw_j (x - xq)^2: the expected squared output error of the rows, under the diagonal
    second moments ``qw`` of their inputs."""
    d = (x.astype(np.float64) - xq) ** 2
    return float(d.sum(axis=0) @ qw.astype(np.float64))


def tensor_losses(x: np.ndarray, qw: np.ndarray, types: Sequence[str], scale: float) -> dict[str, float]:
    return {t: proxy_loss(x, roundtrip(x, t, qw), qw) * scale for t in types}


def measure(jobs: Sequence[tuple[TensorInfo, list[str]]], weights: Mapping[str, np.ndarray],
            rows_of: Callable[[TensorInfo, np.ndarray], np.ndarray], max_rows: int = MAX_ROWS,
            progress: Callable[[str, float, float], None] | None = None) -> dict[str, dict[str, float]]:  # fmt: skip
    """Proxy loss of each (tensor, candidate type): ``rows_of(info, idx)`` gives float32 rows ``idx``."""
    out: dict[str, dict[str, float]] = {}
    for i, (t, types) in enumerate(jobs):
        from llmq.io.rows import n_rows

        rows = n_rows(t)
        idx = sample_rows(rows, max_rows)
        x = np.ascontiguousarray(rows_of(t, idx), dtype=np.float32).reshape(len(idx), t.shape[-1])
        out[t.name] = tensor_losses(x, weights[t.name], types, rows / len(idx))
        if progress is not None:
            progress("sensitivity", i + 1, len(jobs))
    return out


# ------------------------------------------------------------------------------------------------ budget


def _nbytes(t: TensorInfo, dst: str) -> int:
    return t.nbytes if dst == t.dtype else type_nbytes(dst, t.shape)


def tensor_budget(cfg: Any, infos: Sequence[TensorInfo], header_bytes: int, model: str) -> tuple[int, dict]:
    """(bytes of tensor data allowed, a description of the budget for the recipe)."""
    numel = sum(t.numel for t in infos)
    if cfg.target_bpw is not None:
        cap = int(cfg.target_bpw * numel // 8)
        return cap, {"kind": "target_bpw", "value": cfg.target_bpw, "tensor_bytes": cap}
    if cfg.target_size is not None:
        size = parse_target_size(cfg.target_size)
        cap = size - header_bytes
        return cap, {"kind": "target_size", "value": size, "header_bytes": header_bytes, "tensor_bytes": cap}
    return fit_budget(cfg, model)


def fit_budget(cfg: Any, model: str) -> tuple[int, dict]:
    """The weight bytes llama.cpp can hold on ``cfg.fit`` at ``cfg.context``: the estimator's budget less every
    other term (KV cache, compute buffers, overhead) for this model."""
    from llmq.estimate.memory import EstimateConfig, estimate_memory

    gpu: dict[str, Any] = {"gpu": cfg.fit}
    if cfg.fit.strip().upper().endswith("B") and cfg.fit.strip()[0].isdigit():  # a memory size: "6GiB"
        gpu = {"vram_gib": parse_target_size(cfg.fit) / 2**30}
    est = estimate_memory(EstimateConfig(model=model, quants=("Q8_0",), context=cfg.context,
                                         batch=cfg.batch or 1, kv_cache_dtype=cfg.kv_cache_dtype,
                                         engine="llama.cpp", **gpu))  # fmt: skip
    r = est.results[0]
    others = sum(t.nbytes for t in r.terms if t.name != "weights")
    assert est.budget_bytes is not None
    cap = est.budget_bytes - others
    desc = {"kind": "fit", "gpu": cfg.fit, "context": cfg.context, "batch": cfg.batch or 1,
            "kv_cache_dtype": cfg.kv_cache_dtype, "gpu_budget_bytes": est.budget_bytes,
            "other_terms_bytes": others, "tensor_bytes": cap}  # fmt: skip
    if cap <= 0:
        raise BadInput(f"--fit {cfg.fit} --context {cfg.context}: the KV cache and overhead alone "
                       f"({others:,} bytes) exceed the GPU budget ({est.budget_bytes:,} bytes)")  # fmt: skip
    return cap, desc


def _pinned(cfg: Any, name: str) -> bool:
    import re

    from llmq.quant.gguf.mix import parse_tensor_type_override

    if cfg.output_tensor_type and name == "output.weight":
        return True
    if cfg.token_embedding_type and name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return True
    return any(re.search(parse_tensor_type_override(s)[0], name) for s in cfg.tensor_type)


def choose(cfg: Any, infos: Sequence[TensorInfo], base: Mapping[str, str], weights: Mapping[str, np.ndarray],
           rows_of: Callable[[TensorInfo, np.ndarray], np.ndarray], header_bytes: int, model: str,
           progress: Callable[[str, float, float], None] | None = None) -> tuple[dict[str, str], dict]:  # fmt: skip
    """The budgeted type of every tensor and the recipe (a JSON-able dict) recording the choice."""
    from llmq.quant.allocate import allocate

    types_req = parse_types(cfg.budget_types)
    free = [t for t in infos
            if allows_quantization(t.name, t.shape, leave_output_tensor=cfg.leave_output_tensor)
            and t.name in weights and len(t.shape) == 2 and not _pinned(cfg, t.name)]  # fmt: skip
    jobs = [(t, candidates(t.shape, types_req)) for t in free]
    names = {t.name for t in free}
    fixed = sum(_nbytes(t, base[t.name]) for t in infos if t.name not in names)
    cap, desc = tensor_budget(cfg, infos, header_bytes, model)
    least = fixed + sum(min(_nbytes(t, ty) for ty in c) for t, c in jobs)
    if cap < least:  # before measuring anything
        raise BadInput(f"the budget ({cap:,} tensor bytes) is below the smallest mix of {', '.join(types_req)} "
                       f"({least:,} bytes, {8 * least / max(1, sum(t.numel for t in infos)):.3f} bpw)")  # fmt: skip
    t0 = time.perf_counter()
    losses = measure(jobs, weights, rows_of, progress=progress)
    seconds = time.perf_counter() - t0
    items = [[(_nbytes(t, ty), losses[t.name][ty]) for ty in c] for t, c in jobs]
    sol = allocate(items, cap - fixed)
    types = dict(base)
    for (t, c), k in zip(jobs, sol.choice, strict=True):
        types[t.name] = c[k]
    total = sum(_nbytes(t, types[t.name]) for t in infos)
    numel = sum(t.numel for t in infos)
    recipe = {
        "format": RECIPE_FORMAT, "version": RECIPE_VERSION, "base_type": cfg.type, "budget": desc,
        "candidate_types": list(types_req),
        "predicted": {"proxy_loss": sol.loss, "lower_bound": sol.lower_bound, "optimal": sol.exact,
                      "granularity_bytes": sol.granularity, "tensor_bytes": total,
                      "bits_per_weight": 8 * total / max(1, numel), "measure_seconds": round(seconds, 3),
                      "rows_per_tensor": MAX_ROWS},
        "types": {t.name: types[t.name] for t in infos},
        "sensitivity": {t.name: losses[t.name] for t, _ in jobs},
    }  # fmt: skip
    return types, recipe


# ------------------------------------------------------------------------------------------------ recipes


def recipe_metadata(base_type: str, types: Mapping[str, str]) -> str:
    """The ``quantize.recipe`` value: compact JSON of the base type and the tensor → type map, sorted keys (a
    function of the map alone, so a replay writes the same bytes)."""
    return json.dumps({"base_type": base_type, "types": dict(types)}, sort_keys=True, separators=(",", ":"))


def load_recipe(path: str | os.PathLike) -> dict:
    """A recipe file (or a GGUF whose ``quantize.recipe`` key holds one): at least base_type and types."""
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"recipe {p} does not exist")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        from llmq.io.gguf import GGUFReader

        with GGUFReader(p, decode_strings=True) as r:
            text = r.metadata.get(RECIPE_KEY)
        if text is None:
            raise BadInput(f"{p} has no {RECIPE_KEY} metadata")
    else:
        text = p.read_text(encoding="utf-8", errors="replace")
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInput(f"recipe {p} is not valid JSON: {e}") from None
    if (
        not isinstance(d, dict)
        or not isinstance(d.get("types"), dict)
        or not isinstance(d.get("base_type"), str)
    ):
        raise BadInput(f"recipe {p} needs a 'base_type' string and a 'types' object")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in d["types"].items()):
        raise BadInput(f"recipe {p}: 'types' maps tensor names to type names (strings)")
    return d


def recipe_types(recipe: Mapping[str, Any], infos: Sequence[TensorInfo], leave_output_tensor: bool = False
                 ) -> dict[str, str]:  # fmt: skip
    """The recipe's map checked against the source: every tensor named once, types that fit each shape."""
    from llmq.quant.gguf.blocks import SUPPORTED_TYPES

    rt: Mapping[str, str] = recipe["types"]
    have = {t.name for t in infos}
    extra = sorted(set(rt) - have)
    missing = sorted(have - set(rt))
    if extra or missing:
        what = f"names {extra[0]!r}, which the source lacks" if extra else f"lacks {missing[0]!r}"
        raise BadInput(f"the recipe does not match the source: it {what}")
    out = {}
    for t in infos:
        ty = rt[t.name].upper()
        if ty != t.dtype:
            if (
                not allows_quantization(t.name, t.shape, leave_output_tensor=leave_output_tensor)
                and ty != t.dtype
            ):
                raise BadInput(f"the recipe gives {t.name} type {ty}, but llama.cpp keeps it {t.dtype}")
            if ty not in SUPPORTED_TYPES and ty not in ("F32", "F16", "BF16"):
                raise BadInput(f"the recipe gives {t.name} type {rt[t.name]!r}, which llmq cannot encode")
            type_nbytes(ty, t.shape)  # a row length the type's block does not divide: BadInput
        out[t.name] = ty
    return out


def recipe_summary(text: str) -> dict[str, Any]:
    """What ``llmq inspect`` shows of a ``quantize.recipe`` value: base type and tensors per type."""
    try:
        d = json.loads(text)
        counts: dict[str, int] = {}
        for ty in d["types"].values():
            counts[ty] = counts.get(ty, 0) + 1
        return {
            "base_type": d.get("base_type"),
            "tensors": len(d["types"]),
            "types": dict(sorted(counts.items())),
        }
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return {"error": "not a readable recipe"}


def write_recipe(path: Path, recipe: Mapping[str, Any], force: bool) -> None:
    from llmq.io.base import AtomicOutput

    with AtomicOutput(path, is_dir=False, force=force) as tmp:
        tmp.write_text(json.dumps(recipe, indent=1) + "\n", encoding="utf-8")
