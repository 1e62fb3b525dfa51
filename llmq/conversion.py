"""safetensors (Hugging Face layout) ⇄ GGUF conversion, streamed one tensor at a time.

Each direction validates everything it can from the headers first (architecture, names, shapes, types, output
path), then loops read → transform → write → drop, so peak memory is about one tensor. Outputs are written under
a temporary name and renamed when complete. Tensor math is numpy; torch is never imported here.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from llmq import __version__
from llmq.archs import Family, for_gguf, for_hf, permute_qk, unpermute_qk
from llmq.archs.base import f32_short as _f32
from llmq.archs.base import head_dim
from llmq.archs.rope import hf_rope_scaling
from llmq.archs.validate import (
    check_hf_config,
    check_hf_model,
    check_tensors,
    gguf_int,
    gguf_number,
    optional_int,
)
from llmq.convert_rows import Job, PlannedTensor, encode, write_all
from llmq.errors import BadConfig, BadInput, ShapeError, UnsupportedType
from llmq.io import (
    AtomicOutput,
    GGUFFileWriter,
    GGUFReader,
    SafetensorsReader,
    SafetensorsWriter,
    check_output,
    detect_kind,
    open_checkpoint,
)
from llmq.io.base import DEFAULT_SHARD_BYTES, TensorInfo, parse_size
from llmq.io.ggml_types import GGUFValueType, type_nbytes
from llmq.io.rows import from_float32
from llmq.progress import Progress, no_progress
from llmq.quant.gguf.mix import FILE_TYPES

# the --outtype values the converter writes (their llama_ftype ids are FILE_TYPES[name.upper()])
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
HF_OUTTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
SOURCE_CONFIG_KEY = "llmq.hf_config"  # the source config.json, so GGUF -> HF restores it exactly


@dataclass
class ConvertResult:
    src: Path
    dst: Path
    direction: str  # "hf->gguf" | "gguf->hf"
    outtype: str
    arch: str
    n_tensors: int
    input_bytes: int
    output_bytes: int
    seconds: float
    files: list[Path] = field(default_factory=list)
    types: dict[str, int] = field(default_factory=dict)  # output tensor type -> count

    def to_dict(self) -> dict[str, Any]:
        return {
            "src": str(self.src), "dst": str(self.dst), "direction": self.direction, "outtype": self.outtype,
            "arch": self.arch, "n_tensors": self.n_tensors, "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes, "seconds": round(self.seconds, 3),
            "files": [str(f) for f in self.files], "types": self.types,
        }  # fmt: skip


def convert(src: str | os.PathLike, dst: str | os.PathLike, outtype: str = "auto", *, force: bool = False,
            max_shard_size: str | int | None = None, allow_pickle: bool = False,
            progress: Progress = no_progress) -> ConvertResult:  # fmt: skip
    """Convert an HF safetensors directory to GGUF, or a GGUF file to an HF safetensors directory.

    The direction follows the input. ``outtype``: f32|f16|bf16|q8_0|auto for HF → GGUF; f32|f16|bf16|auto for
    GGUF → HF (auto keeps a 16-bit source type and dequantizes everything else to f32).
    """
    src, dst = Path(src), Path(dst)
    kind = detect_kind(src)
    check_output(dst, force, inputs=[src])
    if kind == "gguf":
        return gguf_to_hf(src, dst, outtype, force=force, max_shard_size=max_shard_size, progress=progress)
    if not src.is_dir():
        raise BadInput(
            f"{src}: converting to GGUF needs a Hugging Face model directory (config.json + tokenizer)"
        )
    return hf_to_gguf(src, dst, outtype, force=force, allow_pickle=allow_pickle, progress=progress)


# ----------------------------------------------------------------------------------------------------------------
# HF -> GGUF


def hf_metadata(
    arch: Family, config: Mapping[str, Any], name: str, file_type: int
) -> list[tuple[str, Any, Any]]:
    """The general.* and architecture KVs llama.cpp reads, as convert_hf_to_gguf.py writes them."""
    a = arch.gguf_arch
    U32, F32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
    kv: list[tuple[str, Any, Any]] = [
        ("general.type", "model", None),
        ("general.name", name, None),
        (f"{a}.block_count", int(config["num_hidden_layers"]), U32),
    ]
    ctx = config.get("max_position_embeddings")
    if ctx is not None:
        kv.append((f"{a}.context_length", int(ctx), U32))
    kv += [
        (f"{a}.embedding_length", int(config["hidden_size"]), U32),
        (f"{a}.feed_forward_length", int(config["intermediate_size"]), U32),
        (f"{a}.attention.head_count", int(config["num_attention_heads"]), U32),
        (
            f"{a}.attention.head_count_kv",
            int(config.get("num_key_value_heads") or config["num_attention_heads"]),
            U32,
        ),
    ]
    kv += arch.rope_kv(config)
    kv.append((f"{a}.attention.layer_norm_rms_epsilon", float(config.get("rms_norm_eps", 1e-6)), F32))
    if config.get("head_dim") is not None:
        kv += [(f"{a}.attention.key_length", int(config["head_dim"]), U32),
               (f"{a}.attention.value_length", int(config["head_dim"]), U32)]  # fmt: skip
    kv += arch.gguf_kv(config)
    kv.append(("general.file_type", file_type, U32))
    if arch.writes_vocab_size:
        kv.append((f"{a}.vocab_size", int(config["vocab_size"]), U32))
        kv.append((f"{a}.rope.dimension_count", head_dim(config), U32))
    kv.append(("general.quantization_version", 2, U32))
    return kv


def _auto_outtype(reader: SafetensorsReader) -> str:
    for t in reader.infos():
        if len(t.shape) < 2:
            continue
        return "bf16" if t.dtype == "BF16" else "f16"
    return "f16"


def _target_type(gguf_name: str, shape: tuple[int, ...], outtype: str) -> str:
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return "F32"
    t = outtype.upper()
    if t == "Q8_0" and shape[-1] % 32:
        return "F16"  # as convert_hf_to_gguf.py: rows that don't fill Q8_0 blocks fall back to F16
    return t


@dataclass
class HFPlan:
    """Everything an HF → GGUF conversion writes, decided from the headers: metadata in order, the extra
    tensors computed from the config, then the planned tensors in source order."""

    reader: SafetensorsReader
    arch: Family
    outtype: str
    kv: list[tuple[str, Any, Any]]
    extra: list[tuple[TensorInfo, np.ndarray]]
    tensors: list[PlannedTensor]

    def add_metadata(self, w: GGUFFileWriter) -> None:
        for key, value, vtype in self.kv:
            w.add(key, value, vtype)

    def infos(self) -> list[TensorInfo]:
        return [t for t, _ in self.extra] + [p.target for p in self.tensors]


def plan_hf_to_gguf(src: Path, outtype: str = "auto", *, allow_pickle: bool = False) -> HFPlan:
    """Validate an HF directory from its headers and plan its conversion to a GGUF of ``outtype``."""
    if outtype not in (*OUTTYPES, "auto"):
        raise BadInput(f"--outtype {outtype!r} is not one of f32, f16, bf16, q8_0, auto for HF → GGUF")
    reader = open_checkpoint(src, allow_pickle=allow_pickle)
    config = reader.config
    if config is None:
        raise BadInput(f"{src}: no config.json; is this a Hugging Face model directory?")
    arch = for_hf(config)
    config = arch.source_config(config)
    dims = check_hf_model(arch, config, {i.name: i.shape for i in reader.infos()}, src.name)
    if outtype == "auto":
        outtype = _auto_outtype(reader)
    n_head, n_head_kv = dims.heads, dims.kv_heads

    # Validate every tensor from the header before writing anything.
    plan: list[PlannedTensor] = []
    for info in reader.infos():
        gname = arch.hf_to_gguf_name(info.name)
        if gname is None:
            continue
        if info.dtype not in ("F32", "F16", "BF16", "F64"):
            raise UnsupportedType(
                f"tensor {info.name} is {info.dtype}; only float checkpoints convert to GGUF"
            )
        heads = arch.qk_heads(info.name, n_head, n_head_kv)
        if heads and info.shape[0] % (2 * heads):
            raise ShapeError(
                f"tensor {info.name}: {info.shape[0]} rows do not split into {heads} rotary heads"
            )
        ttype = _target_type(gname, info.shape, outtype)
        shift = np.float32(arch.norm_shift) if arch.shifted_norm(gname) else None
        plan.append(PlannedTensor(info, TensorInfo(gname, ttype, info.shape, type_nbytes(ttype, info.shape)),
                                  heads, shift))  # fmt: skip
    if not plan:
        raise BadInput(f"{src}: no tensors to convert")
    extra = [(TensorInfo(n, "F32", a.shape, a.nbytes), a) for n, a in arch.extra_tensors(config)]

    from llmq.io.tokenizer import gguf_tokenizer_kv

    name = str(config.get("_name_or_path") or src.name).rstrip("/").split("/")[-1] or src.name
    kv = [("general.architecture", arch.gguf_arch, None)]
    kv += hf_metadata(arch, config, name, FILE_TYPES[outtype.upper()].ftype)
    kv += gguf_tokenizer_kv(src, config)
    kv.append((SOURCE_CONFIG_KEY, json.dumps(config, sort_keys=True), None))
    return HFPlan(reader, arch, outtype, kv, extra, plan)


def hf_to_gguf(src: Path, dst: Path, outtype: str = "auto", *, force: bool = False, allow_pickle: bool = False,
               progress: Progress = no_progress) -> ConvertResult:  # fmt: skip
    t0 = time.perf_counter()
    p = plan_hf_to_gguf(src, outtype, allow_pickle=allow_pickle)
    total = sum(t.target.nbytes for t in p.tensors)
    with AtomicOutput(dst, is_dir=False, force=force) as tmp:
        w = GGUFFileWriter(tmp, None)
        p.add_metadata(w)
        w.plan(p.infos())
        for t, data in p.extra:
            w.write(t.name, data)
        jobs = [
            Job(t.src, t.target.name, t.heads, t.shift, functools.partial(encode, ggml_type=t.target.dtype),
                 t.target.nbytes, t.target.dtype)
            for t in p.tensors
        ]  # fmt: skip
        write_all(w, p.reader, jobs, permute_qk, progress, total)
        w.close()
    types: dict[str, int] = {}
    for t in p.tensors:
        types[t.target.dtype] = types.get(t.target.dtype, 0) + 1
    return ConvertResult(src, dst, "hf->gguf", p.outtype, p.arch.gguf_arch, len(p.tensors) + len(p.extra),
                         sum(t.src.nbytes for t in p.tensors), dst.stat().st_size, time.perf_counter() - t0,
                         [dst], types)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# GGUF -> HF


def gguf_config(reader: GGUFReader, arch: Family, torch_dtype: str) -> dict[str, Any]:
    """config.json for the GGUF's model: the embedded source config if llmq wrote it, else from the KVs."""
    meta = reader.metadata
    a = arch.gguf_arch
    src_cfg = meta.get(SOURCE_CONFIG_KEY)
    if isinstance(src_cfg, str):
        try:
            cfg = json.loads(src_cfg)
        except json.JSONDecodeError:
            cfg = None
        if isinstance(cfg, dict):
            cfg = dict(cfg)
            cfg.pop("torch_dtype", None)
            cfg["dtype"] = torch_dtype
            return cfg
    src = reader.path.name
    n_head = gguf_int(src, meta, f"{a}.attention.head_count")
    hidden = gguf_int(src, meta, f"{a}.embedding_length")
    tokens = meta.get("tokenizer.ggml.tokens")
    emb = reader.info("token_embd.weight") if "token_embd.weight" in reader.names() else None
    if isinstance(tokens, list):
        vocab = len(tokens)
    else:
        vocab = emb.shape[0] if emb else gguf_int(src, meta, f"{a}.vocab_size")
    head_dim = (
        optional_int(src, meta, f"{a}.attention.key_length")
        or optional_int(src, meta, f"{a}.rope.dimension_count")
        or hidden // n_head
    )
    cfg: dict[str, Any] = {
        "architectures": [arch.hf_class],
        "model_type": arch.model_types[0],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": gguf_int(src, meta, f"{a}.feed_forward_length"),
        "num_hidden_layers": gguf_int(src, meta, f"{a}.block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": gguf_int(src, meta, f"{a}.attention.head_count_kv", n_head),
        "head_dim": int(head_dim),
        "hidden_act": "silu",
        "max_position_embeddings": gguf_int(src, meta, f"{a}.context_length", 4096),
        "rms_norm_eps": _f32(gguf_number(src, meta, f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(gguf_number(src, meta, f"{a}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in reader.names(),
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": torch_dtype,
    }
    scaling = hf_rope_scaling(a, meta)
    if scaling is not None:
        cfg["rope_scaling"] = scaling
    derived = [n for n in arch.gguf_only if n in reader.names()]
    if derived:
        raise UnsupportedType(
            f"{derived[0]} (rope factors) in a GGUF without its source config cannot be restored"
        )
    if arch.attention_bias is not None:
        cfg["attention_bias"] = arch.attention_bias
    cfg.update(arch.extra_config)
    cfg.update(arch.hf_config(meta, int(head_dim)))
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("padding_token_id", "pad_token_id")):  # fmt: skip
        if meta.get(f"tokenizer.ggml.{key}") is not None:
            cfg[hf_key] = gguf_int(src, meta, f"tokenizer.ggml.{key}", minimum=0)
    return cfg


def _check_kv_agree(reader: GGUFReader, arch: Family, config: Mapping[str, Any], src: str) -> None:
    """The architecture KVs llama.cpp reads must be those llmq wrote from the embedded source config: a GGUF
    whose keys were edited since would otherwise convert back to a model llama.cpp never ran."""
    meta = reader.metadata
    for key, want, _ in hf_metadata(arch, config, "", 0):
        if not key.startswith(arch.gguf_arch + "."):
            continue
        got = meta.get(key)
        same = (
            got is not None
            and not isinstance(got, (str, list, bool))
            and (np.float32(got) == np.float32(want) if isinstance(want, float) else got == want)
        )
        if isinstance(want, str):
            same = got == want
        if not same:
            raise BadConfig(f"{src}: {key} = {got!r} disagrees with {SOURCE_CONFIG_KEY} ({want!r})")


def _auto_hf_outtype(reader: GGUFReader) -> str:
    kinds = {t.dtype for t in reader.infos() if len(t.shape) >= 2}
    if kinds == {"F16"}:
        return "f16"
    if kinds == {"BF16"}:
        return "bf16"
    return "f32"


def _cast_hf(data: np.ndarray, outtype: str) -> np.ndarray:
    return from_float32(data, HF_OUTTYPES[outtype])


def gguf_to_hf(src: Path, dst: Path, outtype: str = "auto", *, force: bool = False,
               max_shard_size: str | int | None = None, allow_pickle: bool = False,
            progress: Progress = no_progress) -> ConvertResult:  # fmt: skip
    t0 = time.perf_counter()
    if outtype not in (*HF_OUTTYPES, "auto"):
        raise BadInput(f"--outtype {outtype!r} is not one of f32, f16, bf16, auto for GGUF → HF")
    shard_bytes = parse_size(max_shard_size) if max_shard_size is not None else DEFAULT_SHARD_BYTES
    reader = GGUFReader(src)
    arch = for_gguf(reader.arch)
    if outtype == "auto":
        outtype = _auto_hf_outtype(reader)
    torch_dtype = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[outtype]
    config = gguf_config(reader, arch, torch_dtype)
    embedded = isinstance(reader.metadata.get(SOURCE_CONFIG_KEY), str)
    dims = check_hf_config(config, arch, f"{src.name}: {SOURCE_CONFIG_KEY}" if embedded else src.name)
    check_tensors(arch, replace(dims, vocab=None), {t.name: t.shape for t in reader.infos()}, src.name)
    if embedded:
        _check_kv_agree(reader, arch, config, src.name)
    n_head, n_head_kv = dims.heads, dims.kv_heads
    st_type = HF_OUTTYPES[outtype]
    plan: list[tuple[TensorInfo, TensorInfo, int | None]] = []
    for info in reader.infos():
        hname = arch.gguf_to_hf_name(info.name)
        if hname is None:
            continue
        heads = arch.qk_heads(hname, n_head, n_head_kv)
        if heads and info.shape[0] % (2 * heads):
            raise ShapeError(
                f"tensor {info.name}: {info.shape[0]} rows do not split into {heads} rotary heads"
            )
        # norms and biases stay f32 in llama.cpp; keep them at the output precision HF expects
        target = TensorInfo(
            hname, st_type, info.shape, int(np.prod(info.shape)) * (4 if st_type == "F32" else 2)
        )
        plan.append((info, target, heads))
    if not plan:
        raise BadInput(f"{src}: no tensors to convert")
    order = sorted(plan, key=lambda p: _hf_sort_key(p[1].name))

    from llmq.io.tokenizer import hf_tokenizer_files

    tok_files = hf_tokenizer_files(reader.metadata)
    total = sum(i.nbytes for i, _, _ in order)
    with AtomicOutput(dst, is_dir=True, force=force) as tmp:
        w = SafetensorsWriter(tmp, max_shard_bytes=shard_bytes, metadata={"llmq_version": __version__})
        w.plan([t for _, t, _ in order])
        jobs = [
            Job(info, target.name, heads, -np.float32(arch.norm_shift) if arch.shifted_norm(info.name) else None,
                 functools.partial(_cast_hf, outtype=outtype), info.nbytes, target.dtype)
            for info, target, heads in order
        ]  # fmt: skip
        write_all(w, reader, jobs, unpermute_qk, progress, total)
        files = w.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        for fname, content in tok_files.items():
            (tmp / fname).write_bytes(content)
    types: dict[str, int] = {}
    for info, _, _ in plan:
        types[info.dtype] = types.get(info.dtype, 0) + 1
    out_bytes = sum(f.stat().st_size for f in dst.iterdir() if f.suffix == ".safetensors")
    return ConvertResult(src, dst, "gguf->hf", outtype, arch.gguf_arch, len(plan),
                         sum(i.nbytes for i, _, _ in plan), out_bytes, time.perf_counter() - t0,
                         [dst / f.name for f in files], types)  # fmt: skip


def _hf_sort_key(name: str) -> tuple:
    # model.embed_tokens, then layers in numeric order, then norm and lm_head: the order HF itself saves
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit():
        return (1, int(parts[2]), name)
    if "embed_tokens" in name:
        return (0, 0, name)
    return (2, 0, name)
