"""safetensors (Hugging Face layout) ⇄ GGUF conversion, streamed one tensor at a time.

Each direction validates everything it can from the headers first (architecture, names, shapes, types, output
path), then loops read → transform → write → drop, so peak memory is about one tensor. Outputs are written under
a temporary name and renamed when complete. Tensor math is numpy; torch is never imported here.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
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
from llmq.io.ggml_types import GGUFValueType, is_block_type, type_nbytes
from llmq.io.rows import row_chunks, to_float32

# llama.cpp's LlamaFileType for the types the converter writes
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}
GGML_OF_OUTTYPE = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
HF_OUTTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
SOURCE_CONFIG_KEY = "llmq.hf_config"  # the source config.json, so GGUF -> HF restores it exactly

Progress = Callable[[str, float, float], None]


def _no_progress(stage: str, done: float, total: float) -> None:
    return None


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
            progress: Progress = _no_progress) -> ConvertResult:  # fmt: skip
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
    t = GGML_OF_OUTTYPE[outtype]
    if t == "Q8_0" and shape[-1] % 32:
        return "F16"  # as convert_hf_to_gguf.py: rows that don't fill Q8_0 blocks fall back to F16
    return t


def encode(data: np.ndarray, ggml_type: str) -> np.ndarray:
    """float32 data → the bytes of ``ggml_type`` (F32/F16/BF16 exact casts; Q8_0 as ggml's reference)."""
    if ggml_type == "F32":
        return data.astype(np.float32, copy=False)
    if ggml_type == "F16":
        return to_f16(data)
    if ggml_type == "BF16":
        return f32_to_bf16_bits(data)
    if ggml_type == "Q8_0":
        return quantize_q8_0(data)
    raise UnsupportedType(f"the converter cannot write {ggml_type}; use `llmq quantize --method gguf`")


def to_f16(x: np.ndarray) -> np.ndarray:
    """float32 → float16, round to nearest even (numpy; torch would be faster per slice, but its import and
    allocator cost hundreds of MB of resident memory, and the converter promises a small, flat footprint)."""
    with np.errstate(over="ignore"):  # overflow to ±inf is the IEEE result, as in ggml
        return x.astype(np.float16)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 → bfloat16 bit patterns (uint16), NaNs kept quiet (as ggml does)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = ((u.astype(np.uint64) + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    if nan.any():
        r[nan] = ((u[nan] >> 16) | 64).astype(np.uint16)
    return r


def roundf(x: np.ndarray) -> np.ndarray:
    """C's roundf (half away from zero), exactly: x + 0.5 would round in float32 before the floor."""
    a = np.abs(x)
    fl = np.floor(a)
    return np.copysign(fl + np.floor(2 * (a - fl)), x)


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q8_0_ref over every block: d = amax/127 (fp16), q = round(x/d)."""
    rows = x.reshape(-1, x.shape[-1]).astype(np.float32, copy=False)
    blocks = rows.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    d = amax / 127.0
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(d != 0, 1.0 / d, 0.0).astype(np.float32)
    q = roundf(blocks * inv).astype(np.int8)
    out = np.empty((blocks.shape[0], 34), dtype=np.uint8)
    with np.errstate(over="ignore"):  # an fp16 overflow of d becomes inf, exactly as in ggml
        out[:, :2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.view(np.uint8)
    return out.reshape(rows.shape[0], -1)


def hf_to_gguf(src: Path, dst: Path, outtype: str = "auto", *, force: bool = False, allow_pickle: bool = False,
               progress: Progress = _no_progress) -> ConvertResult:  # fmt: skip
    t0 = time.perf_counter()
    if outtype not in (*FILE_TYPES, "auto"):
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
    plan: list[tuple[TensorInfo, TensorInfo, int | None]] = []  # (source, target, heads to permute)
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
        plan.append((info, TensorInfo(gname, ttype, info.shape, type_nbytes(ttype, info.shape)), heads))
    if not plan:
        raise BadInput(f"{src}: no tensors to convert")
    extra = [(TensorInfo(n, "F32", a.shape, a.nbytes), a) for n, a in arch.extra_tensors(config)]

    from llmq.io.tokenizer import gguf_tokenizer_kv

    tok_kv = gguf_tokenizer_kv(src, config)
    name = str(config.get("_name_or_path") or src.name).rstrip("/").split("/")[-1] or src.name
    total = sum(t.nbytes for _, t, _ in plan)
    with AtomicOutput(dst, is_dir=False, force=force) as tmp:
        w = GGUFFileWriter(tmp, arch.gguf_arch)
        for key, value, vtype in hf_metadata(arch, config, name, FILE_TYPES[outtype]):
            w.add(key, value, vtype)
        for key, value, vtype in tok_kv:
            w.add(key, value, vtype)
        w.add(SOURCE_CONFIG_KEY, json.dumps(config, sort_keys=True))
        w.plan([t for t, _ in extra] + [t for _, t, _ in plan])
        for t, data in extra:
            w.write(t.name, data)
        jobs = [
            _Job(info, target.name, heads, np.float32(arch.norm_shift) if arch.shifted_norm(target.name) else None,
                 functools.partial(encode, ggml_type=target.dtype), target.nbytes, target.dtype)
            for info, target, heads in plan
        ]  # fmt: skip
        _write_all(w, reader, jobs, permute_qk, progress, total)
        w.close()
    types: dict[str, int] = {}
    for _, t, _ in plan:
        types[t.dtype] = types.get(t.dtype, 0) + 1
    return ConvertResult(src, dst, "hf->gguf", outtype, arch.gguf_arch, len(plan) + len(extra),
                         sum(i.nbytes for i, _, _ in plan), dst.stat().st_size, time.perf_counter() - t0,
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
    if outtype == "f32":
        return data.astype(np.float32, copy=False)
    if outtype == "f16":
        return to_f16(data)
    return f32_to_bf16_bits(data)


def gguf_to_hf(src: Path, dst: Path, outtype: str = "auto", *, force: bool = False,
               max_shard_size: str | int | None = None, allow_pickle: bool = False,
            progress: Progress = _no_progress) -> ConvertResult:  # fmt: skip
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
            _Job(info, target.name, heads, -np.float32(arch.norm_shift) if arch.shifted_norm(info.name) else None,
                 functools.partial(_cast_hf, outtype=outtype), info.nbytes, target.dtype)
            for info, target, heads in order
        ]  # fmt: skip
        _write_all(w, reader, jobs, unpermute_qk, progress, total)
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


@functools.lru_cache(maxsize=1)
def bf16_to_f16_table() -> np.ndarray:
    """All 65,536 bf16 bit patterns → float16 bits, by the exact path (bf16 → f32 exactly → f16 round to nearest
    even). Casting by lookup is 5x faster than through float32 and gives the same bits."""
    allbits = np.arange(1 << 16, dtype=np.uint32)
    with np.errstate(over="ignore"):
        return (allbits << 16).view(np.float32).astype(np.float16).view(np.uint16)


@dataclass
class _Job:
    info: TensorInfo  # source tensor
    name: str  # output name
    heads: int | None  # rotary heads to (un)permute over, for q/k
    shift: np.float32 | None  # added to the values (Gemma's norm offset)
    encode: Callable[[np.ndarray], np.ndarray]
    progress_bytes: int
    target: str = ""  # output element type when it is a plain type (F32/F16/BF16)

    def raw_path(self) -> Callable[[np.ndarray], np.ndarray] | None:
        """A cast that never materialises float32: a copy when the types agree, a table for bf16 → f16."""
        if self.shift is not None or is_block_type(self.info.dtype):
            return None
        if self.info.dtype == self.target:
            return lambda raw: raw
        if (self.info.dtype, self.target) == ("BF16", "F16"):
            table = bf16_to_f16_table()
            return lambda raw: table[raw]
        return None


def _write_all(w, reader, jobs: list[_Job], permute, progress: Progress, total: int) -> None:
    """Every tensor as encoded slices of rows (whole rotary heads for q/k), converted by a small thread pool a
    few slices ahead of the writer: numpy's casts release the GIL, so conversion runs on every core while the
    main thread writes in order. Memory holds a few slices, never a whole tensor."""
    work: list[tuple[int, int, int]] = []  # (job index, first row, end row)
    counts = [0] * len(jobs)
    for k, job in enumerate(jobs):
        per_head = job.info.shape[0] // job.heads if job.heads else 1
        for start, stop in row_chunks(job.info, per_head):
            work.append((k, start, stop))
            counts[k] += 1

    fast = [job.raw_path() for job in jobs]

    def convert_slice(item: tuple[int, int, int]) -> np.ndarray:
        k, start, stop = item
        job = jobs[k]
        raw = reader.read_rows(job.info.name, start, stop)
        n_heads = (stop - start) * job.heads // job.info.shape[0] if job.heads else 0
        if fast[k] is not None:  # the permutation only moves rows: it applies to raw elements as well
            return fast[k](permute(raw, n_heads) if n_heads else raw)
        x = to_float32(raw, job.info.dtype)
        if n_heads:
            x = permute(x, n_heads)
        if job.shift is not None:
            x = x + job.shift
        return job.encode(x)

    _return_big_blocks_to_os()
    workers = max(1, min(4, os.cpu_count() or 1))
    done = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = _in_order(pool, convert_slice, work, lookahead=2 * workers)
        for k, job in enumerate(jobs):
            w.write(job.name, itertools.islice(results, counts[k]))
            done += job.progress_bytes
            progress("convert", done, total)


def _return_big_blocks_to_os() -> None:
    """glibc raises its mmap threshold after the first big free, after which every slice buffer comes from a
    per-thread arena that keeps freed memory: resident memory would grow with the worker count. A fixed 4 MiB
    threshold keeps slice buffers mmapped, so each is returned to the OS when dropped."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc (musl, ...): its allocator returns big blocks anyway
        return


def _in_order(pool: ThreadPoolExecutor, fn, items, lookahead: int) -> Iterator:
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= lookahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _hf_sort_key(name: str) -> tuple:
    # model.embed_tokens, then layers in numeric order, then norm and lm_head: the order HF itself saves
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit():
        return (1, int(parts[2]), name)
    if "embed_tokens" in name:
        return (0, 0, name)
    return (2, 0, name)
