"""Bytes of every tensor after a target quantization, as the format stores them.

Each target names a *format* (memory depends on the layout, not the algorithm that chose the codes):

- ``stored``: the bytes in the headers, as they are.
- ``fp32`` / ``fp16`` / ``bf16``: every floating tensor cast.
- GGUF file types (``Q4_K_M``, ``Q8_0``, ``F16``, ...): llama.cpp's per-tensor type mix, chosen by
  ``llmq.quant.gguf.mix.choose_types`` (shared with the GGUF quantizer), sized with ``llmq.io.ggml_types.type_nbytes``.
- ``gptq<b>[-g<G>]``: GPTQ v1 — qweight int32 [in·b/32, out], qzeros int32 [n_g, out·b/32], scales fp16
  [n_g, out], g_idx int32 [in].
- ``awq4[-g<G>]``: AutoAWQ GEMM — qweight int32 [in, out/8], qzeros int32 [n_g, out/8], scales fp16 [n_g, out].
- ``ct<b>[-g<G>][-asym][-act]`` (alias ``rtn<b>``, ``w<b>a16``): compressed-tensors pack-quantized —
  weight_packed int32 [out, in·b/32], weight_scale [out, n_g] in the model dtype, weight_zero_point int32
  [⌈out·b/32⌉, n_g] when asymmetric, weight_g_idx int32 [in] with act-order, weight_shape int64 [2].
- ``nf4`` / ``fp4`` [``-dq``] [``-b<blocksize>``]: bitsandbytes 4-bit — packed uint8 [⌈n/2⌉], absmax fp32 per block
  (or uint8 per block + nested_absmax fp32 per 256 blocks + nested_quant_map fp32 [256] with double quant),
  quant_map fp32 [16], the quant_state JSON.
- ``int8``: bitsandbytes LLM.int8 — CB int8 [out, in], SCB fp32 [out].
- ``fp8``: compressed-tensors float-quantized, channel-wise — F8_E4M3 [out, in], weight_scale fp32 [out, 1].

Only the 2-D weights of Linear layers inside the decoder blocks are quantized by the non-GGUF formats; token
embeddings, lm_head, norms, biases, MoE routers and everything else stay in the model dtype.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from llmq.errors import BadInput, UnsupportedArchitecture, UnsupportedType
from llmq.io.base import ELEMENT_SIZES, TensorInfo
from llmq.io.ggml_types import type_nbytes

GGUF_FTYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1",
               "Q4_0", "IQ4_NL", "IQ4_XS", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "Q2_K_S", "TQ1_0", "TQ2_0")  # fmt: skip
_CASTS = {"fp32": "F32", "f32": "F32", "fp16": "F16", "f16": "F16", "half": "F16", "bf16": "BF16"}
_FLOAT = {"F64", "F32", "F16", "BF16"}


@dataclass(frozen=True)
class QuantSpec:
    name: str  # as the user wrote it, normalised
    family: str  # stored | cast | gguf | gptq | awq | ct | bnb4 | int8 | fp8
    bits: int = 16
    group_size: int = 128  # -1: one group per row (channel-wise)
    sym: bool = True
    act_order: bool = False
    double_quant: bool = False
    blocksize: int = 64
    dtype: str = ""  # cast target / GGUF ftype / bnb quant type

    @property
    def is_gguf(self) -> bool:
        return self.family == "gguf"


_LINEAR_FMT = re.compile(r"^(gptq|awq|ct|rtn|w)(\d)(?:a16)?(?:-g(\d+|channel))?(-asym|-sym)?(-act)?$")
_BNB4 = re.compile(r"^(nf4|fp4)(-dq)?(?:-b(\d+))?$")


def parse_quant(text: str) -> QuantSpec:
    """Parse a --quant value; raises BadInput listing the accepted forms."""
    raw = text.strip()
    low = raw.lower()
    if low in ("stored", "none", "orig", "original"):
        return QuantSpec("stored", "stored")
    if low in _CASTS and not raw.isupper():
        return QuantSpec(low, "cast", bits=8 * ELEMENT_SIZES[_CASTS[low]], dtype=_CASTS[low])
    if raw.upper() in GGUF_FTYPES:
        return QuantSpec(raw.upper(), "gguf", dtype=raw.upper())
    m = _LINEAR_FMT.match(low)
    if m:
        fam = {"rtn": "ct", "w": "ct"}.get(m.group(1), m.group(1))
        bits = int(m.group(2))
        group = -1 if m.group(3) == "channel" else int(m.group(3) or 128)
        if bits not in (2, 3, 4, 8) or (fam == "awq" and bits != 4) or (fam == "ct" and bits == 3):
            raise BadInput(f"--quant {text}: {fam} does not store {bits}-bit weights")
        if group == 0 or (group > 0 and group & (group - 1)):
            raise BadInput(f"--quant {text}: group size must be a power of two or 'channel'")
        sym = m.group(4) != "-asym" if fam == "ct" else fam == "gptq"  # gptq/awq always store zeros
        return QuantSpec(low, fam, bits=bits, group_size=group, sym=sym, act_order=bool(m.group(5)))
    m = _BNB4.match(low)
    if m:
        bs = int(m.group(3) or 64)
        if bs < 32 or bs > 4096 or bs & (bs - 1):
            raise BadInput(f"--quant {text}: bitsandbytes blocksize must be a power of two in 32..4096")
        return QuantSpec(low, "bnb4", bits=4, double_quant=bool(m.group(2)), blocksize=bs, dtype=m.group(1))
    if low == "int8":
        return QuantSpec("int8", "int8", bits=8)
    if low == "fp8":
        return QuantSpec("fp8", "fp8", bits=8)
    raise BadInput(
        f"unknown --quant {text!r}: use stored, fp16, bf16, fp32, a GGUF type ({', '.join(GGUF_FTYPES[:10])}, ...), "
        "gptq4[-g128], awq4, ct4[-g128][-asym][-act], rtn8, nf4[-dq], fp4, int8 or fp8"
    )


# (the GGUF output.weight and token_embd are outside the blocks, so the layer test below already keeps them)
_KEEP = re.compile(r"(norm|embed|lm_head|wte|wpe|\.gate\.weight$|router|shared_expert_gate|gate_inp)")
_INTEGER = {"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64", "BOOL"}


def is_quantizable_linear(t: TensorInfo) -> bool:
    """A decoder-block Linear weight: 2-D, real-valued (float, fp8 or a ggml block type — a GGUF source is
    re-quantized from its dequantized values), inside a layer, and not a norm or MoE router."""
    if len(t.shape) != 2 or not t.name.endswith("weight") or t.dtype in _INTEGER:
        return False
    if not re.search(r"(layers|blk|\.h)\.\d+\.", t.name):
        return False
    return not _KEEP.search(t.name)


def is_expert(name: str) -> bool:
    return ".experts." in name or "_exps" in name


@dataclass
class TensorBytes:
    name: str
    shape: tuple[int, ...]
    source_dtype: str
    target: str  # a dtype / ggml type / "<format> <bits>-bit"
    nbytes: int
    quantized: bool


def _n_groups(in_features: int, group: int) -> int:
    return 1 if group == -1 else -(-in_features // group)


def linear_bytes(spec: QuantSpec, out_f: int, in_f: int, model_dtype: str) -> int:
    """Bytes the format stores for one quantized [out_f, in_f] Linear weight (bias excluded)."""
    b, g = spec.bits, _n_groups(in_f, spec.group_size)
    if spec.family == "gptq":
        _need(
            in_f * b % 32 == 0 and out_f * b % 32 == 0,
            spec,
            out_f,
            in_f,
            "in·bits and out·bits multiples of 32",
        )
        return 4 * (in_f * b // 32) * out_f + 4 * g * (out_f * b // 32) + 2 * g * out_f + 4 * in_f
    if spec.family == "awq":
        _need(out_f % 8 == 0, spec, out_f, in_f, "out_features a multiple of 8")
        return 4 * in_f * (out_f // 8) + 4 * g * (out_f // 8) + 2 * g * out_f
    if spec.family == "ct":
        _need(in_f * b % 32 == 0, spec, out_f, in_f, "in·bits a multiple of 32")
        size = 4 * out_f * (in_f * b // 32) + ELEMENT_SIZES[model_dtype] * out_f * g + 16
        if not spec.sym:
            size += 4 * -(-out_f * b // 32) * g
        if spec.act_order:
            size += 4 * in_f
        return size
    if spec.family == "bnb4":
        n = out_f * in_f
        blocks = -(-n // spec.blocksize)
        size = (n + 1) // 2 + 16 * 4 + len(_bnb_state_json(spec, out_f, in_f, model_dtype))
        if spec.double_quant:
            return size + blocks + 4 * -(-blocks // 256) + 4 * 256
        return size + 4 * blocks
    if spec.family == "int8":
        return out_f * in_f + 4 * out_f
    if spec.family == "fp8":
        return out_f * in_f + 4 * out_f
    raise AssertionError(spec.family)


def _bnb_state_json(spec: QuantSpec, out_f: int, in_f: int, model_dtype: str) -> bytes:
    # the JSON bitsandbytes stores as quant_state.bitsandbytes__<type>; nested_offset is the mean absmax, a
    # float32 whose Python repr is typically 19 characters long (±2: the one term that is not exact)
    state: dict[str, object] = {"quant_type": spec.dtype, "blocksize": spec.blocksize,
                                "dtype": {"BF16": "bfloat16", "F16": "float16"}.get(model_dtype, "float32"),
                                "shape": [out_f, in_f]}  # fmt: skip
    if spec.double_quant:
        state.update(nested_blocksize=256, nested_dtype="float32", nested_offset=0.20862437784671783)
    return json.dumps(state).encode()


def _need(ok: bool, spec: QuantSpec, out_f: int, in_f: int, what: str) -> None:
    if not ok:
        raise UnsupportedType(f"{spec.name} cannot store a [{out_f}, {in_f}] weight: the format needs {what}")


def target_bytes(spec: QuantSpec, tensors: Sequence[TensorInfo], model_dtype: str, arch: str = "",
                 n_layers: int = 0, is_gguf_names: bool = False, n_expert: int = 0,
                 n_gqa: int = 1) -> list[TensorBytes]:  # fmt: skip
    """Per-tensor bytes after quantizing to ``spec``."""
    if spec.family == "stored":
        return [
            TensorBytes(t.name, t.shape, t.dtype, t.dtype, t.nbytes, t.dtype not in _FLOAT) for t in tensors
        ]
    if spec.family == "cast":
        out = []
        for t in tensors:
            if t.dtype not in _INTEGER:
                out.append(
                    TensorBytes(
                        t.name, t.shape, t.dtype, spec.dtype, t.numel * ELEMENT_SIZES[spec.dtype], False
                    )
                )
            else:
                out.append(TensorBytes(t.name, t.shape, t.dtype, t.dtype, t.nbytes, False))
        return out
    if spec.family == "gguf":
        return gguf_target_bytes(spec, tensors, arch, n_layers, is_gguf_names, n_expert, n_gqa)
    out = []
    for t in tensors:
        if is_quantizable_linear(t):
            nbytes = linear_bytes(spec, t.shape[0], t.shape[1], model_dtype)
            out.append(TensorBytes(t.name, t.shape, t.dtype, f"{spec.name}", nbytes, True))
        else:
            keep = (
                t.dtype if t.dtype in _INTEGER else model_dtype
            )  # ggml block types dequantize to the model dtype
            if spec.family in ("gptq", "awq") and t.dtype not in _INTEGER:
                keep = "F16"  # GPTQ/AWQ checkpoints are saved in float16
            out.append(TensorBytes(t.name, t.shape, t.dtype, keep, t.numel * ELEMENT_SIZES[keep], False))
    return out


# --------------------------------------------------------------------------------------------- GGUF


def gguf_arch_name(arch: str) -> str:
    """GGUF architecture name of an HF model_type (GGUF names pass through)."""
    return {"mistral": "llama", "mixtral": "llama", "qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe",
            "gpt_oss": "gpt-oss", "gemma3_text": "gemma3", "deepseek_v3": "deepseek2",
            "deepseek_v2": "deepseek2"}.get(arch, arch)  # fmt: skip


def hf_to_gguf_names(tensors: Sequence[TensorInfo], arch: str, n_layers: int) -> list[TensorInfo]:
    """Rename HF tensors to GGUF names: by llmq's architecture registry, else (families llmq cannot convert)
    by gguf-py's TensorNameMap, which is what convert_hf_to_gguf.py writes."""
    from llmq.archs import FAMILIES, lookup

    family = lookup({"model_type": arch}) or FAMILIES.get(arch)
    if family is not None:
        out = []
        for t in tensors:
            new = family.hf_to_gguf_name(t.name)
            if new is not None:
                out.append(TensorInfo(new, t.dtype, t.shape, t.nbytes))
        return out
    import gguf

    gguf_arch = gguf_arch_name(arch)
    arch_id = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == gguf_arch), None)
    if arch_id is None:
        raise UnsupportedArchitecture(f"no GGUF architecture for model_type {arch!r}")
    name_map = gguf.get_tensor_name_map(arch_id, n_layers)
    out = []
    for t in tensors:
        new = name_map.get_name(t.name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise UnsupportedArchitecture(f"{arch}: no GGUF name for tensor {t.name}")
        out.append(TensorInfo(new, t.dtype, t.shape, t.nbytes))
    return out


def _gguf_mix():
    try:
        from llmq.quant.gguf import mix as gguf_mix
    except ImportError:
        raise UnsupportedType(
            "GGUF targets need llmq.quant.gguf.mix (llama.cpp's per-tensor type rules), which this build lacks"
        ) from None
    return gguf_mix


def gguf_target_bytes(spec: QuantSpec, tensors: Sequence[TensorInfo], arch: str, n_layers: int,
                      is_gguf_names: bool, n_expert: int = 0, n_gqa: int = 1) -> list[TensorBytes]:  # fmt: skip
    """llama.cpp's per-tensor mix for ``spec``: an HF checkpoint is first named as convert_hf_to_gguf.py names it
    (written as F16, 1-D tensors F32 — what llama-quantize then starts from)."""
    mix = _gguf_mix()
    named = list(tensors) if is_gguf_names else hf_to_gguf_names(tensors, arch, n_layers)
    if is_gguf_names:
        src_types = {t.name: t.dtype for t in named}
    else:
        src_types = {t.name: "F32" if len(t.shape) < 2 else "F16" for t in named}
    types = mix.choose_types([(t.name, tuple(t.shape)) for t in named], spec.dtype, n_layers,
                             arch=gguf_arch_name(arch), n_expert=n_expert, n_gqa=n_gqa, src_types=src_types)  # fmt: skip
    out = []
    for t in named:
        type_name = str(types[t.name])
        nbytes = int(type_nbytes(type_name, t.shape))
        out.append(TensorBytes(t.name, t.shape, t.dtype, type_name, nbytes, type_name not in _FLOAT))
    return out
