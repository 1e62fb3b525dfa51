"""safetensors (Hugging Face layout) ⇄ GGUF conversion, streamed one tensor at a time.

Each direction validates everything it can from the headers first (architecture, names, shapes, types, output
path), then loops read → transform → write → drop, so peak memory is about one tensor. Outputs are written under
a temporary name and renamed when complete. Tensor math is numpy; torch is never imported here.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmq import __version__
from llmq.convert_rows import Job, PlannedTensor, encode, write_all
from llmq.errors import BadInput, ShapeError, UnsupportedType
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
from llmq.io.names import (
    Arch,
    arch_for_gguf,
    arch_for_hf,
    gguf_to_hf_name,
    hf_to_gguf_name,
    permute_qk,
    qk_heads,
    shifted_norm,
    unpermute_qk,
)
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


def rope_parameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """Rope settings from a transformers 4.x (rope_theta + rope_scaling) or 5.x (rope_parameters) config."""
    params = dict(config.get("rope_parameters") or {})
    if "full_attention" in params and isinstance(params["full_attention"], dict):
        params = dict(params["full_attention"])
    legacy = config.get("rope_scaling") or {}
    for k, v in legacy.items():
        params.setdefault(k, v)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    if "rope_theta" not in params and config.get("rope_theta") is not None:
        params["rope_theta"] = config["rope_theta"]
    return params


def _head_dim(config: Mapping[str, Any]) -> int:
    hd = config.get("head_dim")
    return int(hd) if hd else int(config["hidden_size"]) // int(config["num_attention_heads"])


def _llama3_rope_factors(params: Mapping[str, Any], dim: int) -> np.ndarray:
    # the per-frequency factors llama.cpp reads from rope_freqs.weight for rope_type "llama3"
    base = float(params.get("rope_theta", 10000.0))
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_ctx = params.get("original_max_position_embeddings", 8192)
    low_wl, high_wl = old_ctx / low, old_ctx / high
    out = []
    for f in freqs.tolist():
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(factor)
        else:
            smooth = (old_ctx / wl - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def hf_metadata(
    arch: Arch, config: Mapping[str, Any], name: str, file_type: int
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
    rope = rope_parameters(config)
    rtype = str(rope.get("rope_type") or "default").lower()
    if rtype == "linear" and rope.get("factor") is not None:
        kv += [
            (f"{a}.rope.scaling.type", "linear", None),
            (f"{a}.rope.scaling.factor", float(rope["factor"]), F32),
        ]
    elif rtype == "yarn" and rope.get("factor") is not None:
        kv += [
            (f"{a}.rope.scaling.type", "yarn", None),
            (f"{a}.rope.scaling.factor", float(rope["factor"]), F32),
            (f"{a}.rope.scaling.original_context_length", int(rope["original_max_position_embeddings"]), U32),
        ]
    elif rtype not in ("default", "llama3"):
        raise UnsupportedType(f"rope_type {rtype!r} is not supported by the converter yet")
    kv.append((f"{a}.rope.freq_base", float(rope.get("rope_theta", 10000.0)), F32))
    kv.append((f"{a}.attention.layer_norm_rms_epsilon", float(config.get("rms_norm_eps", 1e-6)), F32))
    if config.get("head_dim") is not None:
        kv += [(f"{a}.attention.key_length", int(config["head_dim"]), U32),
               (f"{a}.attention.value_length", int(config["head_dim"]), U32)]  # fmt: skip
    if a == "gemma2":
        kv += [
            (f"{a}.attn_logit_softcapping", float(config.get("attn_logit_softcapping") or 50.0), F32),
            (f"{a}.final_logit_softcapping", float(config.get("final_logit_softcapping") or 30.0), F32),
            (f"{a}.attention.sliding_window", int(config.get("sliding_window") or 4096), U32),
        ]
    kv.append(("general.file_type", file_type, U32))
    if a == "llama":
        kv.append((f"{a}.vocab_size", int(config["vocab_size"]), U32))
        kv.append((f"{a}.rope.dimension_count", _head_dim(config), U32))
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
    arch: Arch
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
    arch = arch_for_hf(config)
    if outtype == "auto":
        outtype = _auto_outtype(reader)
    n_head = int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads") or n_head)

    # Validate every tensor from the header before writing anything.
    plan: list[PlannedTensor] = []
    for info in reader.infos():
        gname = hf_to_gguf_name(arch, info.name)
        if gname is None:
            continue
        if info.dtype not in ("F32", "F16", "BF16", "F64"):
            raise UnsupportedType(
                f"tensor {info.name} is {info.dtype}; only float checkpoints convert to GGUF"
            )
        heads = qk_heads(info.name, n_head, n_head_kv) if arch.permute_qk else None
        if heads and info.shape[0] % (2 * heads):
            raise ShapeError(
                f"tensor {info.name}: {info.shape[0]} rows do not split into {heads} rotary heads"
            )
        ttype = _target_type(gname, info.shape, outtype)
        shift = np.float32(arch.norm_shift) if shifted_norm(arch, gname) else None
        plan.append(PlannedTensor(info, TensorInfo(gname, ttype, info.shape, type_nbytes(ttype, info.shape)),
                                  heads, shift))  # fmt: skip
    if not plan:
        raise BadInput(f"{src}: no tensors to convert")
    rope = rope_parameters(config)
    extra: list[tuple[TensorInfo, np.ndarray]] = []
    if arch.gguf_arch == "llama" and str(rope.get("rope_type", "")).lower() == "llama3":
        factors = _llama3_rope_factors(rope, _head_dim(config))
        extra.append((TensorInfo("rope_freqs.weight", "F32", factors.shape, factors.nbytes), factors))

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


def _f32(value: Any) -> float:
    """A GGUF float32 as the short decimal it was written from (9.999999747e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _meta(meta: Mapping[str, Any], key: str, default: Any = None) -> Any:
    v = meta.get(key, default)
    if isinstance(v, list):  # per-layer arrays (e.g. head_count_kv in some models)
        if len(set(v)) != 1:
            raise UnsupportedType(f"{key} varies per layer; not supported by the converter yet")
        v = v[0]
    return v


def gguf_config(reader: GGUFReader, arch: Arch, torch_dtype: str) -> dict[str, Any]:
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
    required = ["block_count", "embedding_length", "feed_forward_length", "attention.head_count"]
    missing = [k for k in required if f"{a}.{k}" not in meta]
    if missing:
        raise BadInput(f"{reader.path.name}: GGUF lacks {', '.join(a + '.' + k for k in missing)}")
    n_head = int(_meta(meta, f"{a}.attention.head_count"))
    hidden = int(meta[f"{a}.embedding_length"])
    tokens = meta.get("tokenizer.ggml.tokens")
    emb = reader.info("token_embd.weight") if "token_embd.weight" in reader.names() else None
    vocab = (
        len(tokens) if isinstance(tokens, list) else (emb.shape[0] if emb else meta.get(f"{a}.vocab_size"))
    )
    head_dim = (
        meta.get(f"{a}.attention.key_length") or meta.get(f"{a}.rope.dimension_count") or hidden // n_head
    )
    cfg: dict[str, Any] = {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(_meta(meta, f"{a}.feed_forward_length")),
        "num_hidden_layers": int(meta[f"{a}.block_count"]),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(_meta(meta, f"{a}.attention.head_count_kv", n_head)),
        "head_dim": int(head_dim),
        "hidden_act": "silu",
        "max_position_embeddings": int(meta.get(f"{a}.context_length", 4096)),
        "rms_norm_eps": _f32(meta.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(meta.get(f"{a}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in reader.names(),
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": torch_dtype,
    }
    scaling = meta.get(f"{a}.rope.scaling.type")
    if scaling == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(meta[f"{a}.rope.scaling.factor"])}
    elif scaling == "yarn":
        cfg["rope_scaling"] = {
            "rope_type": "yarn",
            "factor": float(meta[f"{a}.rope.scaling.factor"]),
            "original_max_position_embeddings": int(meta[f"{a}.rope.scaling.original_context_length"]),
        }
    elif scaling not in (None, "none"):
        raise UnsupportedType(f"rope scaling {scaling!r} is not supported by the converter yet")
    if "rope_freqs.weight" in reader.names():
        raise UnsupportedType(
            "llama3-style rope_freqs in a GGUF without its source config cannot be restored"
        )
    if arch.attention_bias is not None:
        cfg["attention_bias"] = arch.attention_bias
    cfg.update(arch.extra_config)
    if a == "gemma2":
        cfg["attn_logit_softcapping"] = _f32(meta.get(f"{a}.attn_logit_softcapping", 50.0))
        cfg["final_logit_softcapping"] = _f32(meta.get(f"{a}.final_logit_softcapping", 30.0))
        cfg["sliding_window"] = int(meta.get(f"{a}.attention.sliding_window", 4096))
        cfg["query_pre_attn_scalar"] = int(
            head_dim
        )  # true for Gemma 2 2B/9B; 27B's is kept in llmq.hf_config
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("padding_token_id", "pad_token_id")):  # fmt: skip
        v = meta.get(f"tokenizer.ggml.{key}")
        if v is not None:
            cfg[hf_key] = int(v)
    return cfg


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
    arch = arch_for_gguf(reader.arch)
    if outtype == "auto":
        outtype = _auto_hf_outtype(reader)
    torch_dtype = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[outtype]
    config = gguf_config(reader, arch, torch_dtype)
    n_head = int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    st_type = HF_OUTTYPES[outtype]
    plan: list[tuple[TensorInfo, TensorInfo, int | None]] = []
    for info in reader.infos():
        hname = gguf_to_hf_name(arch, info.name)
        if hname is None:
            continue
        heads = qk_heads(hname, n_head, n_head_kv) if arch.permute_qk else None
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
            Job(info, target.name, heads, -np.float32(arch.norm_shift) if shifted_norm(arch, info.name) else None,
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
