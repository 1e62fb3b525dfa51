"""compressed-tensors "pack-quantized", as llm-compressor writes it (vLLM and transformers load it).

Per Linear ``L``: ``L.weight_packed`` int32 ``[out, ceil(in*bits/32)]`` (signed codes offset by ``2**(bits-1)``,
i.e. llmq's unsigned codes, densely packed along in, LSB first), ``L.weight_scale`` ``[out, n_groups]`` in the
model dtype, ``L.weight_shape`` int64 ``[2]``, and for asymmetric schemes ``L.weight_zero_point`` (zero points
packed the same way along the output dim: ``[ceil(out*bits/32), n_groups]``); ``L.weight_g_idx`` for act-order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from llmq.errors import UnsupportedType
from llmq.formats import formats
from llmq.formats.base import Format, LayerSpec, QuantizedLinear, Scheme, dtype_of, tensor_info
from llmq.formats.packing import pack_int32, packed_len, unpack_int32


@formats.register("compressed-tensors", "ct", "pack-quantized")
class CompressedTensorsFormat(Format):
    name = "compressed-tensors"
    marker = "weight_packed"
    suffixes = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
    bits_supported = (2, 3, 4, 5, 6, 8)

    def plan(self, scheme: Scheme, layer: LayerSpec) -> list:
        g = self.n_groups(scheme, layer)
        b, out, inp, n = scheme.bits, layer.out_features, layer.in_features, layer.name
        infos = [
            tensor_info(f"{n}.weight_packed", "I32", (out, packed_len(inp, b))),
            tensor_info(f"{n}.weight_scale", scheme.dtype, (out, g)),
            tensor_info(f"{n}.weight_shape", "I64", (2,)),
        ]
        if not scheme.sym:
            infos.append(tensor_info(f"{n}.weight_zero_point", "I32", (packed_len(out, b), g)))
        if scheme.desc_act:
            infos.append(tensor_info(f"{n}.weight_g_idx", "I32", (inp,)))
        return infos

    def pack(self, name: str, q: QuantizedLinear, scheme: Scheme) -> dict[str, torch.Tensor]:
        if not isinstance(q, QuantizedLinear):
            raise UnsupportedType(f"format compressed-tensors cannot hold {type(q).__name__}")
        half = 1 << (q.bits - 1)
        if scheme.sym and not bool((q.zeros == half).all()):
            raise UnsupportedType(f"{name}: symmetric compressed-tensors needs every zero point at {half}")
        out = {
            f"{name}.weight_packed": pack_int32(q.qweight, q.bits, dim=1),
            f"{name}.weight_scale": q.scales.to(dtype_of(scheme.dtype)).contiguous(),
            f"{name}.weight_shape": torch.tensor([q.out_features, q.in_features], dtype=torch.int64),
        }
        if not scheme.sym:
            out[f"{name}.weight_zero_point"] = pack_int32(q.zeros, q.bits, dim=0)
        if scheme.desc_act:
            out[f"{name}.weight_g_idx"] = q.group_index().to(torch.int32)
        return out

    def unpack(
        self, name: str, get: Callable[[str], torch.Tensor], config: Mapping[str, Any]
    ) -> QuantizedLinear:
        w = _weights_args(config)
        bits, sym = int(w["num_bits"]), bool(w.get("symmetric", True))
        out_f, in_f = (int(v) for v in get(f"{name}.weight_shape").tolist())
        scales = get(f"{name}.weight_scale")
        codes = unpack_int32(get(f"{name}.weight_packed"), bits, in_f, dim=1)
        if sym:
            zeros = torch.full(scales.shape, 1 << (bits - 1), dtype=torch.int32)
        else:
            zeros = unpack_int32(get(f"{name}.weight_zero_point"), bits, out_f, dim=0)
        gs = w.get("group_size") or -1
        g_idx = get(f"{name}.weight_g_idx") if w.get("actorder") else None
        return QuantizedLinear(qweight=codes, scales=scales, zeros=zeros, bits=bits, group_size=int(gs), sym=sym,
                               g_idx=g_idx)  # fmt: skip

    def config(self, scheme: Scheme, ignore: list[str]) -> dict[str, Any]:
        weights = {
            "num_bits": scheme.bits,
            "type": "int",
            "symmetric": scheme.sym,
            "strategy": "channel" if scheme.group_size == -1 else "group",
            "group_size": None if scheme.group_size == -1 else scheme.group_size,
            "block_structure": None,
            "dynamic": False,
            "actorder": "group" if scheme.desc_act else None,
            "observer": "minmax",
            "observer_kwargs": {},
        }
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": weights,
                    "input_activations": None,
                    "output_activations": None,
                    "format": "pack-quantized",
                }
            },
            "ignore": sorted(set(ignore) | {"lm_head"}),
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
        }


def _weights_args(config: Mapping[str, Any]) -> Mapping[str, Any]:
    groups = config.get("config_groups") or {}
    if len(groups) != 1:
        raise UnsupportedType(
            f"compressed-tensors checkpoints with {len(groups)} config groups are not supported"
        )
    return next(iter(groups.values()))["weights"]
