"""The ``gguf`` quantizer: llama.cpp file types (Q4_K_M, Q8_0, ...) written by llmq, byte-identical to llama-quantize.

SRC is an f32/f16/bf16 GGUF or an HF directory, streamed through llmq's converter plan (the values are those of
the f32 GGUF convert_hf_to_gguf.py would write for llama-quantize, with no intermediate file). The output keeps the source's metadata in order, sets
``general.file_type`` and ``general.quantization_version`` like llama.cpp, adds the ``quantize.imatrix.*`` keys
when an importance matrix is used, and lists the tensors in llama.cpp's order. Tensors are streamed in order
through llmq.io's GGUF reader and GGUFFileWriter: their rows are encoded by :mod:`llmq.quant.gguf.workers`
(forked processes where possible) while the finished ones are written.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from llmq.errors import BadInput, UnsupportedType
from llmq.io.base import AtomicOutput, TensorInfo, check_output
from llmq.io.ggml_types import type_nbytes
from llmq.io.gguf import GGUFFileWriter
from llmq.io.rows import PLAIN_FLOAT
from llmq.quant.base import Progress, QuantConfig, QuantizeResult, no_progress, quantizers
from llmq.quant.gguf.mix import (
    FILE_TYPES,
    PLAIN_TYPES,
    choose_types,
    file_type,
    llama_sort_key,
    parse_ggml_type,
    parse_tensor_type_override,
)
from llmq.quant.gguf.sources import GGUFSource, open_source

GGML_QNT_VERSION = 2


@dataclass(frozen=True)
class GGUFQuantConfig(QuantConfig):
    type: str = "Q4_K_M"
    format: str = "gguf"
    imatrix: str | None = None
    save_imatrix: str | None = None
    calibration: str | None = None
    nsamples: int = 64
    seqlen: int = 512
    seed: int = 0
    allow_requantize: bool = False
    pure: bool = False
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    leave_output_tensor: bool = False
    tensor_type: tuple[str, ...] = ()
    threads: int | None = None
    # budgeted mixes (llmq.quant.gguf.budget)
    target_bpw: float | None = None
    target_size: str | None = None
    fit: str | None = None
    context: int | None = None
    batch: int | None = None
    kv_cache_dtype: str | None = None
    budget_types: str | None = None
    recipe: str | None = None
    save_recipe: str | None = None

    def __post_init__(self) -> None:
        ft = file_type(self.type)  # raises BadInput on an unknown name
        object.__setattr__(self, "type", ft.name)
        if self.format != "gguf":
            raise BadInput(f"--method gguf writes --format gguf, not {self.format}")
        from llmq.quant.gguf.blocks import SUPPORTED_TYPES

        if ft.default_type not in SUPPORTED_TYPES and ft.default_type not in PLAIN_FLOAT:
            raise UnsupportedType(
                f"GGUF file type {ft.name} needs {ft.default_type}, which llmq cannot encode yet"
            )
        for opt in ("output_tensor_type", "token_embedding_type"):
            v = getattr(self, opt)
            if v is not None:
                object.__setattr__(self, opt, parse_ggml_type(v))
        object.__setattr__(self, "tensor_type", tuple(self.tensor_type))
        for spec in self.tensor_type:
            parse_tensor_type_override(spec)
        if self.imatrix and self.calibration:
            raise BadInput("--imatrix and --calibration cannot be used together")
        if self.calibration:
            from llmq.quant.gguf.imatrix import check_calibration

            check_calibration(self.calibration)
        if self.save_imatrix and not self.calibration:
            raise BadInput("--save-imatrix needs --calibration (an imatrix to compute)")
        if self.nsamples < 1 or self.seqlen < 8:
            raise BadInput("--nsamples must be >= 1 and --seqlen >= 8")
        if self.threads is not None and self.threads < 1:
            raise BadInput("--threads must be >= 1")
        if isinstance(self.budget_types, list | tuple):
            object.__setattr__(self, "budget_types", ",".join(self.budget_types))
        from llmq.quant.gguf.budget import check_options

        check_options(self)


def _arch_info(meta: Mapping[str, Any]) -> dict[str, Any]:
    arch = str(meta.get("general.architecture", "llama"))

    def get(key: str, default: int) -> int:
        v = meta.get(f"{arch}.{key}", default)
        if isinstance(v, list | tuple | np.ndarray):  # per-layer arrays: llama.cpp uses layer 0
            v = v[0] if len(v) else default
        return int(v)

    n_layers = get("block_count", 0)
    n_head, n_kv = get("attention.head_count", 1), get("attention.head_count_kv", 0)
    n_kv = n_kv or n_head
    return {
        "arch": arch,
        "n_layers": n_layers,
        "n_expert": get("expert_count", 0),
        "n_gqa": n_head // n_kv if n_kv else 1,
        "is_70b": arch == "llama" and n_layers == 80 and n_head != n_kv,
    }


def plan_types(infos: Sequence[TensorInfo], meta: Mapping[str, Any], config: GGUFQuantConfig,
               has_imatrix: bool = False) -> dict[str, str]:  # fmt: skip
    """Per-tensor ggml types for ``config`` (llama_tensor_get_type over the whole model)."""
    info = _arch_info(meta)
    return choose_types(
        [(t.name, tuple(t.shape)) for t in infos], config.type, info["n_layers"], info["arch"],
        pure=config.pure, output_tensor_type=config.output_tensor_type,
        token_embedding_type=config.token_embedding_type, leave_output_tensor=config.leave_output_tensor,
        tensor_type_overrides=config.tensor_type, n_expert=info["n_expert"], n_gqa=info["n_gqa"],
        has_imatrix=has_imatrix, is_70b=info["is_70b"], src_types={t.name: t.dtype for t in infos},
    )  # fmt: skip


@quantizers.register("gguf")
class GGUFQuantizer:
    name: ClassVar[str] = "gguf"
    config_cls: ClassVar[type[QuantConfig]] = GGUFQuantConfig
    formats: ClassVar[tuple[str, ...]] = ("gguf",)

    def plan(self, src: Path, config: QuantConfig) -> list[TensorInfo]:
        cfg = self._cfg(config)
        src = Path(src)
        with open_source(src) as s:  # an HF directory: the f32 GGUF the converter would write, from headers
            infos, meta = s.infos(), s.meta
        types = plan_types(infos, meta, cfg, has_imatrix=bool(cfg.imatrix or cfg.calibration))
        if cfg.recipe:
            from llmq.quant.gguf import budget

            types = budget.recipe_types(budget.load_recipe(cfg.recipe), infos, cfg.leave_output_tensor)
        elif budget_given(cfg):
            raise BadInput("--dry-run cannot show a budgeted mix without measuring the weights: run it, or "
                           "pass the --recipe it wrote")  # fmt: skip
        return [TensorInfo(t.name, types[t.name], t.shape, type_nbytes(types[t.name], t.shape))
                for t in sorted(infos, key=lambda t: llama_sort_key(t.name))]  # fmt: skip

    @staticmethod
    def _cfg(config: QuantConfig) -> GGUFQuantConfig:
        if not isinstance(config, GGUFQuantConfig):
            raise BadInput(f"the gguf quantizer needs a GGUFQuantConfig, got {type(config).__name__}")
        return config

    def run(self, src: Path, out: Path, config: QuantConfig, *, force: bool = False,
            progress: Progress = no_progress) -> QuantizeResult:  # fmt: skip
        cfg = self._cfg(config)
        src, out = Path(src), Path(out)
        if not src.exists():
            raise BadInput(f"{src} does not exist")
        check_output(out, force, [src])
        with open_source(src):  # validates config.json / GGUF metadata against the family before any write
            pass
        t0 = time.perf_counter()
        result = quantize_gguf(src, out, cfg, force=force, progress=progress)
        result.seconds = time.perf_counter() - t0
        return result


def quantize_gguf(src: Path, out: Path, cfg: GGUFQuantConfig, *, force: bool = False,
                  progress: Progress = no_progress) -> QuantizeResult:  # fmt: skip
    """Quantize the GGUF file or HF directory ``src`` into ``out`` (the body of ``llmq quantize --method gguf``).
    An HF directory is streamed through the converter's per-tensor plan: no intermediate file."""
    with open_source(Path(src)) as s:
        return _quantize_source(s, out, cfg, force, progress)


def _quantize_source(s: GGUFSource, out: Path, cfg: GGUFQuantConfig, force: bool,
                     progress: Progress) -> QuantizeResult:  # fmt: skip
    from llmq.quant.gguf import budget
    from llmq.quant.gguf import imatrix as imx
    from llmq.quant.gguf import workers as gguf_workers
    from llmq.quant.gguf.blocks import default_threads

    infos = s.infos()
    recipe_out = _recipe_output(cfg, out, force)
    replay = budget.load_recipe(cfg.recipe) if cfg.recipe else None
    if replay is not None:
        cfg = replace(cfg, type=file_type(replay["base_type"]).name)
    im, im_name = _get_imatrix(cfg, s)
    weights = im.weights() if im is not None else {}
    types = plan_types(infos, s.meta, cfg, has_imatrix=im is not None)
    recipe = None
    if replay is not None:
        types = budget.recipe_types(replay, infos, cfg.leave_output_tensor)
    elif budget_given(cfg):
        types, recipe = budget.choose(cfg, infos, types, weights, _rows_of(s), _header_bytes(s, infos),
                                      str(s.hf_dir or s.path), progress)  # fmt: skip
    notes = _validate(infos, types, cfg, weights)
    ordered = sorted(infos, key=lambda t: llama_sort_key(t.name))
    recipe_kv = budget.recipe_metadata(cfg.type, types) if replay is not None or recipe is not None else None
    kv = _output_metadata(s, FILE_TYPES[cfg.type].ftype, im, im_name, len(weights), recipe_kv)
    out_infos = []
    for t in ordered:
        dst = types[t.name]
        nbytes = t.nbytes if dst == t.dtype else type_nbytes(dst, t.shape)
        out_infos.append(TensorInfo(t.name, dst, t.shape, nbytes))
    total = max(1, sum(t.numel for t in ordered))
    # before the writer starts its thread: the encoder processes are forked here
    nthreads = cfg.threads or default_threads()
    largest = gguf_workers.largest_job_bytes(ordered, types)
    runner = gguf_workers.make_runner(weights, nthreads, largest, rows=s.rows)
    try:
        with AtomicOutput(out, is_dir=False, force=force) as tmp:
            w = GGUFFileWriter(tmp, None, alignment=s.alignment)
            try:
                for key, (val, vtype, sub) in kv.items():
                    w.add(key, val, vtype, sub)
                w.plan(out_infos)
                done = 0
                data = gguf_workers.encoded_tensors(ordered, types, weights.__contains__, runner, s.raw)
                for t, parts in zip(ordered, data, strict=True):
                    w.write(t.name, parts)
                    done += t.numel
                    progress("quantize", done, total)
                w.close()
            except BaseException:
                w.abort()
                raise
    except BaseException:
        runner.close(abort=True)
        raise
    runner.close()
    if cfg.save_imatrix and im is not None:
        imx.save_imatrix(im, cfg.save_imatrix)
    if recipe is not None and recipe_out is not None:
        budget.write_recipe(recipe_out, recipe, force)
        p = recipe["predicted"]
        notes.append(f"budgeted mix: {p['bits_per_weight']:.3f} bpw, proxy loss {p['proxy_loss']:.4g} "
                     f"({'optimal' if p['optimal'] else 'lower bound ' + format(p['lower_bound'], '.4g')}), "
                     f"recipe written to {recipe_out}")  # fmt: skip
    return QuantizeResult(
        output=out, method="gguf", format="gguf", config=cfg.to_dict(), input_bytes=s.input_bytes,
        output_bytes=out.stat().st_size, tensors=out_infos, notes=notes,
    )  # fmt: skip


def budget_given(cfg: GGUFQuantConfig) -> bool:
    return cfg.target_bpw is not None or cfg.target_size is not None or cfg.fit is not None


def _recipe_output(cfg: GGUFQuantConfig, out: Path, force: bool) -> Path | None:
    """Where a budgeted run writes its recipe (--save-recipe, else OUT.recipe.json), checked before any work."""
    if not budget_given(cfg):
        return None
    p = Path(cfg.save_recipe) if cfg.save_recipe else out.with_name(out.name + ".recipe.json")
    check_output(p, force, [])
    return p


def _rows_of(s: GGUFSource):
    """Rows ``idx`` of a tensor as float32 (the budget's sampled rows), read as the encoders read them."""
    if s.hf_dir is not None:
        return lambda info, idx: np.concatenate([s.rows(info, int(i), int(i) + 1) for i in idx])

    def rows(info: TensorInfo, idx: np.ndarray) -> np.ndarray:
        from llmq.io.rows import map_rows, to_float32

        raw = np.ascontiguousarray(map_rows(info)[idx])  # 2-D: (rows, n) values or (rows, row bytes) blocks
        return to_float32(raw, info.dtype).reshape(len(idx), info.shape[-1])

    return rows


def _header_bytes(s: GGUFSource, infos: Sequence[TensorInfo]) -> int:
    """An upper bound of the output's bytes besides tensor data: the source's header and padding, the recipe
    key, a margin, and one alignment of padding per tensor."""
    src_header = s.header_bytes(infos)
    recipe = sum(len(t.name) + 16 for t in infos) + 64
    return src_header + recipe + 4096 + s.alignment * len(infos)


def _output_metadata(s: GGUFSource, ftype: int, im: Any, im_name: str, n_entries: int,
                     recipe: str | None = None) -> dict[str, tuple]:  # fmt: skip
    """The source's metadata in order with its types (split keys dropped), then llama.cpp's keys: gguf_set_val
    removes a key and appends it again, so file_type & co. move to the end, in the order llama.cpp sets them."""
    from llmq.io.ggml_types import GGUFValueType

    u32, string = GGUFValueType.UINT32, GGUFValueType.STRING
    kv: dict[str, tuple] = {}
    for key, val in s.meta.items():
        vtype, sub = s.kv_types[key]
        kv[key] = (val, vtype, sub)
    extra: list[tuple[str, Any, Any]] = [
        ("general.quantization_version", GGML_QNT_VERSION, u32),
        ("general.file_type", ftype, u32),
    ]
    if im is not None:
        extra.append(("quantize.imatrix.file", im_name[:127], string))
        if im.datasets:
            extra.append(("quantize.imatrix.dataset", im.datasets[0][:127], string))
        extra.append(("quantize.imatrix.entries_count", n_entries, u32))
        if im.chunk_count > 0:
            extra.append(("quantize.imatrix.chunks_count", int(im.chunk_count), u32))
    if recipe is not None:
        extra.append(("quantize.recipe", recipe, string))
    for key, val, vtype in extra:
        kv.pop(key, None)
        kv[key] = (val, vtype, None)
    return kv


def _validate(infos: Sequence[TensorInfo], types: Mapping[str, str], cfg: GGUFQuantConfig,
              weights: Mapping[str, np.ndarray]) -> list[str]:  # fmt: skip
    from llmq.quant.gguf.blocks import SUPPORTED_TYPES

    notes = []
    requant = sorted({t.dtype for t in infos if types[t.name] != t.dtype and t.dtype not in PLAIN_TYPES})
    if requant:
        if not cfg.allow_requantize:
            raise BadInput(f"the source is already quantized ({', '.join(requant)}); requantizing loses quality "
                           "- pass --allow-requantize to do it anyway")  # fmt: skip
        msg = f"requantizing from {', '.join(requant)}: quality will be worse than quantizing the original weights"
        warnings.warn(msg, stacklevel=3)
        notes.append(msg)
    for t in infos:
        dst = types[t.name]
        if dst != t.dtype and dst not in SUPPORTED_TYPES and dst not in PLAIN_FLOAT:
            raise UnsupportedType(f"{t.name}: llmq has no encoder for {dst} yet")
        qw = weights.get(t.name)
        if qw is not None and dst != t.dtype:
            n_mat = t.shape[-3] if len(t.shape) >= 3 else 1
            if qw.size != t.shape[-1] * n_mat and t.name not in (
                "token_embd.weight",
                "per_layer_token_embd.weight",
            ):
                raise BadInput(f"imatrix size {qw.size} is different from tensor size {t.shape[-1] * n_mat} "
                               f"for {t.name}")  # fmt: skip
        needs = (
            dst == "Q2_K" and cfg.type == "Q2_K_S" and t.name not in ("token_embd.weight", "output.weight")
        )
        if needs and dst != t.dtype and qw is None:
            raise BadInput(f"file type Q2_K_S needs an importance matrix (missing for {t.name}): "
                           "pass --imatrix or --calibration")  # fmt: skip
    return notes


def _get_imatrix(cfg: GGUFQuantConfig, s: GGUFSource):
    from llmq.quant.gguf import imatrix as imx

    if cfg.imatrix:
        im = imx.load_imatrix(cfg.imatrix)
        bad = [n for n, v in im.weights().items() if not np.isfinite(v).all()]
        if bad:
            raise BadInput(f"imatrix contains non-finite values (e.g. {bad[0]})")
        return im, str(cfg.imatrix)
    if cfg.calibration:
        im = imx.imatrix_from_calibration(
            s.hf_dir or s.path, cfg.calibration, nsamples=cfg.nsamples, seqlen=cfg.seqlen, seed=cfg.seed
        )
        return im, str(cfg.save_imatrix or "(computed by llmq)")
    return None, ""
