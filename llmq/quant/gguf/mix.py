"""llama.cpp file types ("mixes") and the per-tensor type each one chooses.

A port of the rules of ``llama_tensor_get_type`` (src/llama-quant.cpp in the llama.cpp vendored by
llama-cpp-python 0.3.36): which tensors are quantized at all, the attn_v / ffn_down / attn_output / output /
token_embd bumps, ``use_more_bits``, the fallbacks for row lengths that do not divide the block size, and the
llama-quantize options ``--pure``, ``--output-tensor-type``, ``--token-embedding-type``, ``--leave-output-tensor``
and ``--tensor-type PATTERN=TYPE``.

This module imports neither torch nor numpy-heavy code at import time: the memory estimator calls it with
shapes only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from llmq.errors import BadInput, UnsupportedType
from llmq.io.ggml_types import GGML_TYPES, block_size


@dataclass(frozen=True)
class FileType:
    """One llama.cpp file type: its ``general.file_type`` id and the ggml type most tensors get."""

    name: str
    ftype: int  # llama_ftype value written as general.file_type
    default_type: str  # ggml type name


def _ft(name: str, ftype: int, default_type: str) -> tuple[str, FileType]:
    return name, FileType(name, ftype, default_type)


# llama_ftype values from include/llama.h; default types from llama_ftype_get_default_type.
FILE_TYPES: dict[str, FileType] = dict(
    [
        _ft("F32", 0, "F32"),
        _ft("F16", 1, "F16"),
        _ft("Q4_0", 2, "Q4_0"),
        _ft("Q4_1", 3, "Q4_1"),
        _ft("Q8_0", 7, "Q8_0"),
        _ft("Q5_0", 8, "Q5_0"),
        _ft("Q5_1", 9, "Q5_1"),
        _ft("Q2_K", 10, "Q2_K"),
        _ft("Q3_K_S", 11, "Q3_K"),
        _ft("Q3_K_M", 12, "Q3_K"),
        _ft("Q3_K_L", 13, "Q3_K"),
        _ft("Q4_K_S", 14, "Q4_K"),
        _ft("Q4_K_M", 15, "Q4_K"),
        _ft("Q5_K_S", 16, "Q5_K"),
        _ft("Q5_K_M", 17, "Q5_K"),
        _ft("Q6_K", 18, "Q6_K"),
        _ft("IQ2_XXS", 19, "IQ2_XXS"),
        _ft("IQ2_XS", 20, "IQ2_XS"),
        _ft("Q2_K_S", 21, "Q2_K"),
        _ft("IQ3_XS", 22, "IQ3_S"),
        _ft("IQ3_XXS", 23, "IQ3_XXS"),
        _ft("IQ1_S", 24, "IQ1_S"),
        _ft("IQ4_NL", 25, "IQ4_NL"),
        _ft("IQ3_S", 26, "IQ3_S"),
        _ft("IQ3_M", 27, "IQ3_S"),
        _ft("IQ2_S", 28, "IQ2_XS"),
        _ft("IQ2_M", 29, "IQ2_S"),
        _ft("IQ4_XS", 30, "IQ4_XS"),
        _ft("IQ1_M", 31, "IQ1_M"),
        _ft("BF16", 32, "BF16"),
        _ft("TQ1_0", 36, "TQ1_0"),
        _ft("TQ2_0", 37, "TQ2_0"),
        _ft("MXFP4_MOE", 38, "MXFP4"),
        _ft("Q1_0", 40, "Q1_0"),
        _ft("Q2_0", 41, "Q2_0"),
    ]
)
# llama-quantize's other names for a file type (QUANT_OPTIONS in tools/quantize/quantize.cpp): same meaning
FILE_TYPE_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

# ggml types that are not block-quantized (ggml_is_quantized is false for them)
PLAIN_TYPES = frozenset({"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"})

_FALLBACK = {
    "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL",
    "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL",
    "Q2_K": "Q4_0", "Q3_K": "Q4_0", "TQ1_0": "Q4_0", "TQ2_0": "Q4_0",
    "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
}  # fmt: skip

_NOT_QUANTIZED_PARTS = (
    "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
    "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
    "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",
    "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos",
    ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)  # fmt: skip

_LOW_IQ = frozenset({"IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"})


def parse_ggml_type(name: str) -> str:
    """A ggml type name as llama-quantize accepts it (case-insensitive)."""
    up = name.strip().upper()
    if up not in GGML_TYPES:
        raise BadInput(f"unknown ggml type {name!r}")
    return up


def parse_tensor_type_override(spec: str) -> tuple[str, str]:
    """``PATTERN=TYPE`` as llama-quantize's --tensor-type: the pattern is lower-cased, the type case-insensitive."""
    pattern, sep, tname = spec.partition("=")
    if not sep or not pattern:
        raise BadInput(f"malformed --tensor-type {spec!r} (expected PATTERN=TYPE)")
    if not tname:
        raise BadInput(f"--tensor-type {spec!r} is missing the type")
    try:
        re.compile(pattern.lower())
    except re.error as e:
        raise BadInput(f"--tensor-type pattern {pattern!r} is not a valid regex: {e}") from None
    return pattern.lower(), parse_ggml_type(tname)


def file_type(name: str | int) -> FileType:
    """The file type llama-quantize means by ``name``: a name of its list (any case), an alias (Q4_K = Q4_K_M) or
    a llama_ftype number ("15" = Q4_K_M)."""
    key = str(name).strip().upper()
    key = FILE_TYPE_ALIASES.get(key, key)
    if key == "COPY":
        raise UnsupportedType("llama-quantize's COPY (tensors copied unchanged) is not a llmq file type")
    if key in FILE_TYPES:
        return FILE_TYPES[key]
    if key.isdigit():
        for ft in FILE_TYPES.values():
            if ft.ftype == int(key):
                return ft
    raise BadInput(
        f"unknown GGUF file type {name!r} (llama-quantize's names, aliases and ftype numbers are listed in "
        "docs/quantize-gguf.md)"
    )


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for part, cat in (
        ("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
        ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
        ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down"),
    ):  # fmt: skip
        if part in name:
            return cat
    return "other"


def _n_dims(shape: Sequence[int]) -> int:
    # ggml_n_dims: trailing (ggml order) dims of size 1 do not count
    ne = list(reversed([int(d) for d in shape])) or [1]
    n = 1
    for i, d in enumerate(ne):
        if d > 1:
            n = i + 1
    return n


def allows_quantization(name: str, shape: Sequence[int], *, leave_output_tensor: bool = False) -> bool:
    """tensor_allows_quantization: only 2-D/3-D ``*weight`` tensors that are not norms, gates, convs..."""
    if _n_dims(shape) < 2 or not name.endswith("weight"):
        return False
    if "_norm.weight" in name or (leave_output_tensor and name == "output.weight"):
        return False
    if name in ("position_embd.weight", "token_types.weight"):
        return False
    return not any(p in name for p in _NOT_QUANTIZED_PARTS)


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return (
        i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or _cdiv_mod(i_layer - n_layers // 8, 3) == 2
    )


def _cdiv_mod(a: int, b: int) -> int:
    # C's % truncates toward zero (Python's floors): -1 % 3 is -1 in C
    r = abs(a) % b
    return -r if a < 0 else r


def llama_sort_key(name: str) -> tuple[int, str]:
    """llama.cpp's weights_map order (layer number, then name; non-block tensors first)."""
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


@dataclass
class _State:
    ftype: str
    arch: str
    n_layers: int
    n_expert: int
    n_gqa: int
    has_imatrix: bool
    is_70b: bool
    tied: bool
    n_attention_wv: int
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0

    def layer(self, counter: int, name: str) -> int:
        if max(1, self.n_expert) > 1:
            m = re.match(r"blk\.(-?\d+)\.", name)
            if not m:
                raise BadInput(f"failed to determine the layer of tensor {name}")
            i = int(m.group(1))
            if not 0 <= i < self.n_layers:
                raise BadInput(f"bad layer {i} for tensor {name}: must be in [0, {self.n_layers})")
            return i
        return counter


def _impl(qs: _State, new_type: str, name: str, ne0: int, cat: str, output_tensor_type: str | None) -> str:
    """llama_tensor_get_type_impl: the mix rules proper."""
    ft, arch, gqa, nexp = qs.ftype, qs.arch, qs.n_gqa, qs.n_expert
    attn_v_like = cat in ("attn_v", "attn_qkv", "attn_kv_b")
    if cat == "output" or (qs.tied and cat == "token_embd"):
        if output_tensor_type is not None:
            return output_tensor_type
        if arch == "falcon" or ne0 % block_size(new_type) != 0:
            return "Q8_0"
        if ft in ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"):
            return "Q5_K"
        return new_type if new_type == "Q8_0" else "Q6_K"
    if cat == "token_embd":
        if ft in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            return "Q2_K"
        if ft in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
            return "IQ3_S"
        if ft in ("TQ1_0", "TQ2_0"):
            return "Q4_K"
        return new_type
    if ft in _LOW_IQ:
        if attn_v_like:
            if gqa >= 4 or nexp >= 4:
                new_type = "Q4_K"
            else:
                new_type = "IQ3_S" if ft in ("IQ2_S", "IQ2_M") else "Q2_K"
            qs.i_attention_wv += 1
        elif nexp == 8 and cat == "attn_k":
            new_type = "Q4_K"
        elif cat == "ffn_down":
            if qs.i_ffn_down < qs.n_layers // 8:
                new_type = "IQ3_S" if ft in ("IQ2_S", "IQ2_M") else "Q2_K"
            qs.i_ffn_down += 1
        elif cat == "attn_output":
            if nexp == 8:
                new_type = "Q5_K"
            elif ft in ("IQ1_S", "IQ1_M"):
                new_type = "IQ2_XXS"
            elif ft in ("IQ2_S", "IQ2_M"):
                new_type = "IQ3_S"
        return new_type
    if attn_v_like:
        return _attn_v(qs, new_type)
    if cat == "attn_k":
        if nexp == 8:
            return "Q8_0"
        if ft == "IQ3_XS":
            return "IQ3_XXS"
        if ft == "IQ3_XXS":
            return "IQ2_S"
        return new_type
    if cat == "attn_q":
        return {"IQ3_XS": "IQ3_XXS", "IQ3_XXS": "IQ2_S"}.get(ft, new_type)
    if cat == "ffn_down":
        return _ffn_down(qs, new_type, name)
    if cat == "attn_output":
        return _attn_output(qs, new_type)
    if cat == "attn_qkv":  # unreachable (attn_v_like) but kept in the same order as llama.cpp
        return new_type
    if cat in ("ffn_gate", "ffn_up"):
        counter = qs.i_ffn_gate if cat == "ffn_gate" else qs.i_ffn_up
        i_layer, n = qs.layer(counter, name), qs.n_layers
        if ft == "IQ3_XS" and n // 8 <= i_layer < 7 * n // 8:
            new_type = "IQ3_XXS"
        if cat == "ffn_gate":
            qs.i_ffn_gate += 1
        else:
            qs.i_ffn_up += 1
    return new_type


def _attn_v(qs: _State, new_type: str) -> str:
    ft, gqa = qs.ftype, qs.n_gqa
    if ft == "Q2_K":
        new_type = "Q4_K" if gqa >= 4 else "Q3_K"
    elif ft == "Q2_K_S" and gqa >= 4:
        new_type = "Q4_K"
    elif ft == "IQ3_XXS":
        new_type = "Q4_K" if gqa >= 4 else ("IQ3_S" if not qs.has_imatrix else "IQ3_XXS")
    elif ft in ("IQ3_XS", "IQ3_S") and gqa >= 4:
        new_type = "Q4_K"
    elif ft == "IQ3_M":
        new_type = "Q4_K"
    elif ft == "Q3_K_M":
        new_type = "Q5_K" if qs.i_attention_wv < 2 else "Q4_K"
    elif ft == "Q3_K_L":
        new_type = "Q5_K"
    elif ft in ("IQ4_NL", "IQ4_XS") and gqa >= 4:
        new_type = "Q5_K"
    elif ft in ("Q4_K_M", "Q5_K_M") and _use_more_bits(qs.i_attention_wv, qs.n_attention_wv):
        new_type = "Q6_K"
    elif ft == "Q4_K_S" and qs.i_attention_wv < 4:
        new_type = "Q5_K"
    if qs.is_70b and new_type in ("Q3_K", "Q4_K"):
        # 8 heads share each attn_v in the 70B: more bits there cost little
        new_type = "Q5_K"
    if qs.n_expert == 8:
        new_type = "Q8_0"
    qs.i_attention_wv += 1
    return new_type


def _ffn_down(qs: _State, new_type: str, name: str) -> str:
    ft, arch = qs.ftype, qs.arch
    i_layer, n = qs.layer(qs.i_ffn_down, name), qs.n_layers
    if ft == "Q2_K":
        new_type = "Q3_K"
    elif ft == "Q2_K_S":
        if i_layer < n // 8:
            new_type = "Q4_K"
    elif ft == "IQ3_XXS" and not qs.has_imatrix:
        new_type = "Q4_K" if i_layer < n // 8 else "Q3_K"
    elif ft == "Q3_K_M":
        if i_layer < n // 16:
            new_type = "Q5_K"
        elif arch != "falcon" or _use_more_bits(i_layer, n):
            new_type = "Q4_K"
        else:
            new_type = "Q3_K"
    elif ft == "IQ3_M" and (i_layer < n // 8 or (qs.n_expert == 8 and _use_more_bits(i_layer, n))):
        new_type = "Q4_K"
    elif ft == "Q3_K_L":
        new_type = "Q4_K" if arch == "falcon" else "Q5_K"
    elif ft == "Q4_K_M":
        if arch == "falcon":
            new_type = "Q6_K" if i_layer < n // 16 else ("Q5_K" if _use_more_bits(i_layer, n) else "Q4_K")
        elif _use_more_bits(i_layer, n):
            new_type = "Q6_K"
    elif i_layer < n // 8 and ft in ("IQ4_NL", "IQ4_XS") and not qs.has_imatrix:
        new_type = "Q5_K"
    elif ft == "Q5_K_M" and _use_more_bits(i_layer, n):
        new_type = "Q6_K"
    elif ft == "Q4_K_S" and arch != "falcon" and i_layer < n // 8:
        new_type = "Q5_K"
    elif ft in ("Q4_0", "Q5_0") and qs.has_imatrix and i_layer < n // 8:
        new_type = "Q4_1" if ft == "Q4_0" else "Q5_1"
    qs.i_ffn_down += 1
    return new_type


def _attn_output(qs: _State, new_type: str) -> str:
    ft = qs.ftype
    if qs.arch != "falcon":
        if qs.n_expert == 8:
            if ft in ("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S",
                      "IQ3_M", "IQ4_XS"):  # fmt: skip
                new_type = "Q5_K"
        else:
            new_type = {
                "Q2_K": "Q3_K",
                "IQ3_XXS": "IQ3_S",
                "Q3_K_M": "Q4_K",
                "Q3_K_L": "Q5_K",
                "IQ3_M": "Q4_K",
            }.get(ft, new_type)
    elif ft == "Q3_K_L":
        new_type = "Q4_K"
    return new_type


def _fallback(ne0: int, target: str) -> str:
    """tensor_type_fallback: a smaller-block type when the row length does not divide the block size."""
    qk = block_size(target)
    if ne0 % qk == 0:
        return target
    if target in _FALLBACK:
        ret = _FALLBACK[target]
    elif qk <= 32:
        ret = target
    else:
        raise UnsupportedType(f"no tensor type fallback is defined for type {target}")
    return "F16" if ne0 % block_size(ret) else ret


def choose_types(
    tensors: Sequence[tuple[str, tuple[int, ...]]],
    ftype: str,
    n_layers: int,
    arch: str = "llama",
    *,
    pure: bool = False,
    output_tensor_type: str | None = None,
    token_embedding_type: str | None = None,
    leave_output_tensor: bool = False,
    tensor_type_overrides: Sequence[tuple[str, str] | str] = (),
    n_expert: int = 0,
    n_gqa: int = 1,
    has_imatrix: bool = False,
    is_70b: bool = False,
    src_types: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The ggml type llama.cpp gives each tensor for file type ``ftype``.

    ``tensors`` are (GGUF name, torch-order shape). Tensors llama.cpp does not quantize keep their source type
    (``src_types[name]``, default F32). ``tensor_type_overrides`` are (regex, type) pairs or "PATTERN=TYPE"
    strings, first match wins. ``n_gqa`` is n_head / n_head_kv; ``is_70b`` mirrors llama.cpp's LLM_TYPE_70B
    (llama, 80 layers, GQA). The returned dict follows the input order.
    """
    ft = file_type(ftype)
    default = ft.default_type
    out_t = parse_ggml_type(output_tensor_type) if output_tensor_type else None
    emb_t = parse_ggml_type(token_embedding_type) if token_embedding_type else None
    overrides = [parse_tensor_type_override(o) if isinstance(o, str) else (o[0], parse_ggml_type(o[1]))
                 for o in tensor_type_overrides]  # fmt: skip
    patterns = [(re.compile(p), t) for p, t in overrides]
    names = [n for n, _ in tensors]
    qs = _State(
        ftype=ft.name, arch=arch.lower(), n_layers=int(n_layers), n_expert=int(n_expert), n_gqa=int(n_gqa),
        has_imatrix=has_imatrix, is_70b=is_70b, tied="output.weight" not in names,
        n_attention_wv=sum(_category(n) in ("attn_v", "attn_qkv", "attn_kv_b") for n in names),
    )  # fmt: skip
    shapes = dict(tensors)
    result: dict[str, str] = {}
    # llama.cpp walks tensors in its weights_map order; the counters (i_attention_wv, i_ffn_down) depend on it
    for name in sorted(names, key=llama_sort_key):
        shape = tuple(shapes[name])
        src = (src_types or {}).get(name, "F32")
        if not allows_quantization(name, shape, leave_output_tensor=leave_output_tensor):
            result[name] = src
            continue
        result[name] = _tensor_type(qs, name, shape, default, out_t, emb_t, patterns, pure)
    return {n: result[n] for n in names}


def _tensor_type(qs: _State, name: str, shape: tuple[int, ...], default: str, out_t: str | None,
                 emb_t: str | None, patterns: list[tuple[re.Pattern[str], str]], pure: bool) -> str:  # fmt: skip
    """llama_tensor_get_type for one tensor that allows quantization."""
    cat = _category(name)
    if emb_t is not None and cat == "token_embd":
        named = name == "per_layer_token_embd.weight" and any(p.search(name) for p, _ in patterns)
        if not named:
            return emb_t
    if out_t is not None and cat == "output":
        return out_t
    if default in PLAIN_TYPES:
        return default
    new_type, manual = default, False
    for pattern, qtype in patterns:
        if pattern.search(name):
            new_type, manual = qtype, True
            break
    ne0 = int(shape[-1])
    if not manual and not pure:
        new_type = _impl(qs, new_type, name, ne0, cat, out_t)
    return _fallback(ne0, new_type)
