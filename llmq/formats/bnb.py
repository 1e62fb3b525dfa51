"""bitsandbytes 4-bit (NF4/FP4) as transformers saves a ``load_in_4bit`` model.

Per Linear ``L`` (bitsandbytes ``QuantState.as_dict(packed=True)``): ``L.weight`` uint8 ``[(n+1)//2, 1]``,
``L.weight.absmax`` (fp32, or uint8 codes with double quantization), ``L.weight.quant_map`` fp32 ``[16]``, with
double quantization ``L.weight.nested_absmax`` fp32 and ``L.weight.nested_quant_map`` fp32 ``[256]``, and
``L.weight.quant_state.bitsandbytes__<type>``: the remaining settings as UTF-8 JSON bytes in a uint8 tensor.
config.json gets transformers' ``BitsAndBytesConfig`` dict.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import torch

from llmq.errors import CorruptFile, UnsupportedType
from llmq.formats import formats
from llmq.formats.base import Blockwise4bit, Format, LayerSpec, Scheme, tensor_info

_TORCH_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
_CODES = {v: k for k, v in _TORCH_NAMES.items()}


def _state_json(scheme: Scheme, layer: LayerSpec, dtype: str, offset: float | None) -> bytes:
    # key order and json.dumps defaults as bitsandbytes' pack_dict_to_tensor writes them
    d: dict[str, Any] = {
        "quant_type": scheme.quant_type,
        "blocksize": scheme.blocksize,
        "dtype": _TORCH_NAMES[dtype],
        "shape": [layer.out_features, layer.in_features],
    }
    if scheme.double_quant:
        d.update({"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": offset})
    return json.dumps(d).encode("utf-8")


@formats.register("bnb", "bitsandbytes", "bnb-nf4", "bnb-fp4")
class BnbFormat(Format):
    name = "bnb"
    marker = "weight.quant_map"
    suffixes = (
        "weight",
        "weight.absmax",
        "weight.quant_map",
        "weight.nested_absmax",
        "weight.nested_quant_map",
    )
    bits_supported = (4,)

    def check(self, scheme: Scheme, layer: LayerSpec) -> None:
        if scheme.quant_type not in ("nf4", "fp4"):
            raise UnsupportedType(f"bnb holds nf4 or fp4, not {scheme.quant_type}")
        if scheme.double_quant and "nested_offset" not in layer.meta:
            raise UnsupportedType(
                f"{layer.name}: double quantization needs the layer's nested_offset to plan"
            )

    def plan(self, scheme: Scheme, layer: LayerSpec) -> list:
        n, numel = layer.name, layer.out_features * layer.in_features
        blocks = -(-numel // scheme.blocksize)
        dtype = layer.meta.get("dtype", "F16")
        infos = [
            tensor_info(f"{n}.weight", "U8", ((numel + 1) // 2, 1)),
            tensor_info(f"{n}.weight.absmax", "U8" if scheme.double_quant else "F32", (blocks,)),
            tensor_info(f"{n}.weight.quant_map", "F32", (16,)),
        ]
        if scheme.double_quant:
            infos += [
                tensor_info(f"{n}.weight.nested_absmax", "F32", (-(-blocks // 256),)),
                tensor_info(f"{n}.weight.nested_quant_map", "F32", (256,)),
            ]
        js = _state_json(scheme, layer, dtype, layer.meta.get("nested_offset"))
        infos.append(
            tensor_info(f"{n}.weight.quant_state.bitsandbytes__{scheme.quant_type}", "U8", (len(js),))
        )
        return infos

    def pack(self, name: str, q: Blockwise4bit, scheme: Scheme) -> dict[str, torch.Tensor]:
        if not isinstance(q, Blockwise4bit):
            raise UnsupportedType(f"format bnb cannot hold {type(q).__name__}")
        layer = LayerSpec(name, q.shape[0], q.shape[1])
        out = {
            f"{name}.weight": q.packed,
            f"{name}.weight.absmax": q.absmax,
            f"{name}.weight.quant_map": q.code.float(),
        }
        if q.double_quant:
            out[f"{name}.weight.nested_absmax"] = q.nested_absmax
            out[f"{name}.weight.nested_quant_map"] = q.nested_code.float()
        js = _state_json(scheme, layer, q.dtype, q.offset)
        out[f"{name}.weight.quant_state.bitsandbytes__{q.quant_type}"] = torch.tensor(
            list(js), dtype=torch.uint8
        )
        return out

    def unpack(
        self, name: str, get: Callable[[str], torch.Tensor], config: Mapping[str, Any]
    ) -> Blockwise4bit:
        qt = str(config.get("bnb_4bit_quant_type", "nf4"))
        raw = bytes(get(f"{name}.weight.quant_state.bitsandbytes__{qt}").tolist())
        try:
            st = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptFile(f"{name}: unreadable bitsandbytes quant_state ({e})") from None
        nested = "nested_offset" in st
        return Blockwise4bit(
            packed=get(f"{name}.weight"),
            absmax=get(f"{name}.weight.absmax"),
            code=get(f"{name}.weight.quant_map").float(),
            shape=tuple(st["shape"]),
            quant_type=st["quant_type"],
            blocksize=int(st["blocksize"]),
            dtype=_CODES.get(st["dtype"], "F16"),
            nested_absmax=get(f"{name}.weight.nested_absmax") if nested else None,
            nested_code=get(f"{name}.weight.nested_quant_map").float() if nested else None,
            nested_blocksize=int(st.get("nested_blocksize", 256)),
            offset=float(st["nested_offset"]) if nested else None,
        )

    def config(self, scheme: Scheme, ignore: list[str]) -> dict[str, Any]:
        return {
            "quant_method": "bitsandbytes",
            "_load_in_8bit": False,
            "_load_in_4bit": True,
            "llm_int8_threshold": 6.0,
            "llm_int8_skip_modules": sorted(set(ignore) | {"lm_head"}),
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "bnb_4bit_quant_type": scheme.quant_type,
            "bnb_4bit_use_double_quant": scheme.double_quant,
            "bnb_4bit_compute_dtype": scheme.compute_dtype,
            "bnb_4bit_quant_storage": "uint8",
            "load_in_4bit": True,
            "load_in_8bit": False,
        }
