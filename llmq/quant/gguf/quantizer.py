"""The ``gguf`` quantizer: llama.cpp file types (Q4_K_M, Q8_0, ...) written by llmq, byte-identical to llama-quantize.

SRC is an f32/f16/bf16 GGUF or an HF directory (converted to an f32 GGUF with llmq's converter first, as
convert_hf_to_gguf.py + llama-quantize would). The output keeps the source's metadata in order, sets
``general.file_type`` and ``general.quantization_version`` like llama.cpp, adds the ``quantize.imatrix.*`` keys
when an importance matrix is used, and lists the tensors in llama.cpp's order. Tensors are streamed in order
through llmq.io's GGUF reader and GGUFFileWriter: their rows are encoded by :mod:`llmq.quant.gguf.workers`
(forked processes where possible) while the finished ones are written.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from llmq.errors import BadInput, UnsupportedType
from llmq.io import temporaries
from llmq.io.base import AtomicOutput, TensorInfo, check_output
from llmq.io.gguf import GGUFFileWriter
from llmq.quant.base import Progress, QuantConfig, QuantizeResult, no_progress, quantizers
from llmq.quant.gguf.mix import (
    FILE_TYPES,
    PLAIN_TYPES,
    choose_types,
    file_type,
    ggml_type_nbytes,
    llama_sort_key,
    parse_ggml_type,
    parse_tensor_type_override,
)

GGML_QNT_VERSION = 2
_PLAIN_OUT = ("F32", "F16", "BF16")


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

    def __post_init__(self) -> None:
        ft = file_type(self.type)  # raises BadInput on an unknown name
        object.__setattr__(self, "type", ft.name)
        if self.format != "gguf":
            raise BadInput(f"--method gguf writes --format gguf, not {self.format}")
        from llmq.quant.gguf.blocks import SUPPORTED_TYPES

        if ft.default_type not in SUPPORTED_TYPES and ft.default_type not in _PLAIN_OUT:
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
        if self.save_imatrix and not self.calibration:
            raise BadInput("--save-imatrix needs --calibration (an imatrix to compute)")
        if self.nsamples < 1 or self.seqlen < 8:
            raise BadInput("--nsamples must be >= 1 and --seqlen >= 8")
        if self.threads is not None and self.threads < 1:
            raise BadInput("--threads must be >= 1")


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


class _GGUFSource:
    """A GGUF input through llmq.io's reader: metadata (with its value types, in order), tensor infos, data."""

    def __init__(self, path: Path):
        from llmq.io.gguf import GGUFReader

        self.path = path
        # vocabularies are copied to the output byte for byte, never decoded and re-encoded
        self.reader = GGUFReader(path, decode_strings="raw")
        self.meta = self.reader.metadata
        self.kv_types = self.reader.kv_types
        self.alignment = self.reader.alignment

    def infos(self) -> list[TensorInfo]:
        return list(self.reader.infos())

    def raw(self, name: str) -> np.ndarray:
        return self.reader.read_raw(name)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> _GGUFSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@quantizers.register("gguf")
class GGUFQuantizer:
    name: ClassVar[str] = "gguf"
    config_cls: ClassVar[type[QuantConfig]] = GGUFQuantConfig
    formats: ClassVar[tuple[str, ...]] = ("gguf",)

    def plan(self, src: Path, config: QuantConfig) -> list[TensorInfo]:
        cfg = self._cfg(config)
        src = Path(src)
        infos, meta = _hf_header(src) if src.is_dir() else _gguf_header(src)
        types = plan_types(infos, meta, cfg, has_imatrix=bool(cfg.imatrix or cfg.calibration))
        return [TensorInfo(t.name, types[t.name], t.shape, ggml_type_nbytes(types[t.name], t.shape))
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
        _hf_header(src) if src.is_dir() else _gguf_header(src)  # validates config/metadata before any write
        t0 = time.perf_counter()
        with temporaries.temporary_dir(out) as tmp:  # named for this process: a kill leaves nothing lasting
            gguf_src = _as_gguf(src, Path(tmp), progress)
            result = quantize_gguf(
                gguf_src, out, cfg, force=force, progress=progress, hf_dir=src if src.is_dir() else None
            )
        result.seconds = time.perf_counter() - t0
        return result


def _gguf_header(src: Path) -> tuple[list[TensorInfo], Mapping[str, Any]]:
    from llmq.archs import FAMILIES
    from llmq.archs.validate import check_gguf_kv
    from llmq.io.gguf import GGUFReader

    with GGUFReader(src, decode_strings=False) as r:  # the type rules never look at the vocabulary
        infos, meta = list(r.infos()), r.metadata
    family = FAMILIES.get(str(meta.get("general.architecture", "")))
    if family is not None:
        check_gguf_kv(family, meta, src.name)
    return infos, meta


def _hf_header(src: Path) -> tuple[list[TensorInfo], Mapping[str, Any]]:
    """GGUF tensor names/shapes and the hparams the type rules read, from an HF directory's headers only
    (the f32 GGUF that llmq's converter would make: 1-D tensors F32)."""
    from llmq.archs import for_hf
    from llmq.archs.validate import check_hf_model
    from llmq.io.safetensors import SafetensorsReader

    with SafetensorsReader(src) as reader:
        config = reader.config
        if config is None:
            raise BadInput(f"{src}: no config.json; is this a Hugging Face model directory?")
        arch = for_hf(config)
        check_hf_model(arch, config, {i.name: i.shape for i in reader.infos()}, src.name)
        infos = []
        for info in reader.infos():
            gname = arch.hf_to_gguf_name(info.name)
            if gname is not None:
                infos.append(TensorInfo(gname, "F32", info.shape, 4 * info.numel))
    a = arch.gguf_arch
    n_head = int(config["num_attention_heads"])
    meta = {"general.architecture": a, f"{a}.block_count": int(config["num_hidden_layers"]),
            f"{a}.attention.head_count": n_head,
            f"{a}.attention.head_count_kv": int(config.get("num_key_value_heads") or n_head),
            f"{a}.expert_count": int(config.get("num_local_experts") or config.get("num_experts") or 0)}  # fmt: skip
    return infos, meta


def _as_gguf(src: Path, tmp: Path, progress: Progress) -> Path:
    if not src.is_dir():
        return src
    try:
        from llmq.conversion import convert
    except ImportError as e:
        raise BadInput(f"quantizing an HF directory needs llmq's HF->GGUF converter ({e})") from None
    progress("convert", 0, 1)
    dst = tmp / "model-f32.gguf"
    convert(src, dst, outtype="f32")
    progress("convert", 1, 1)
    return dst


def quantize_gguf(src: Path, out: Path, cfg: GGUFQuantConfig, *, force: bool = False,
                  progress: Progress = no_progress, hf_dir: Path | None = None) -> QuantizeResult:  # fmt: skip
    """Quantize the GGUF ``src`` into ``out`` (the body of ``llmq quantize --method gguf``)."""
    s = _GGUFSource(src)
    try:
        return _quantize_source(s, out, cfg, force, progress, hf_dir)
    finally:
        s.close()


def _quantize_source(s: _GGUFSource, out: Path, cfg: GGUFQuantConfig, force: bool, progress: Progress,
                     hf_dir: Path | None) -> QuantizeResult:  # fmt: skip
    from llmq.quant.gguf import imatrix as imx
    from llmq.quant.gguf import workers as gguf_workers
    from llmq.quant.gguf.blocks import default_threads

    infos = s.infos()
    im, im_name = _get_imatrix(cfg, s, hf_dir)
    weights = im.weights() if im is not None else {}
    types = plan_types(infos, s.meta, cfg, has_imatrix=im is not None)
    notes = _validate(infos, types, cfg, weights)
    ordered = sorted(infos, key=lambda t: llama_sort_key(t.name))
    kv = _output_metadata(s, FILE_TYPES[cfg.type].ftype, im, im_name, len(weights))
    out_infos = []
    for t in ordered:
        dst = types[t.name]
        nbytes = t.nbytes if dst == t.dtype else ggml_type_nbytes(dst, t.shape)
        out_infos.append(TensorInfo(t.name, dst, t.shape, nbytes))
    total = max(1, sum(t.numel for t in ordered))
    # before the writer starts its thread: the encoder processes are forked here
    nthreads = cfg.threads or default_threads()
    runner = gguf_workers.make_runner(weights, nthreads, gguf_workers.largest_job_bytes(ordered, types))
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
    return QuantizeResult(
        output=out, method="gguf", format="gguf", config=cfg.to_dict(), input_bytes=s.path.stat().st_size,
        output_bytes=out.stat().st_size, tensors=out_infos, notes=notes,
    )  # fmt: skip


def _output_metadata(s: _GGUFSource, ftype: int, im: Any, im_name: str, n_entries: int) -> dict[str, tuple]:
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
        if dst != t.dtype and dst not in SUPPORTED_TYPES and dst not in _PLAIN_OUT:
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


def _get_imatrix(cfg: GGUFQuantConfig, s: _GGUFSource, hf_dir: Path | None):
    from llmq.quant.gguf import imatrix as imx

    if cfg.imatrix:
        im = imx.load_imatrix(cfg.imatrix)
        bad = [n for n, v in im.weights().items() if not np.isfinite(v).all()]
        if bad:
            raise BadInput(f"imatrix contains non-finite values (e.g. {bad[0]})")
        return im, str(cfg.imatrix)
    if cfg.calibration:
        im = imx.imatrix_from_calibration(
            hf_dir or s.path, cfg.calibration, nsamples=cfg.nsamples, seqlen=cfg.seqlen, seed=cfg.seed
        )
        return im, str(cfg.save_imatrix or "(computed by llmq)")
    return None, ""
