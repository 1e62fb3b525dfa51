"""AutoAWQ checkpoint format, GEMM version.

Per Linear ``L``: ``L.qweight`` int32 ``[in, out/8]`` and ``L.qzeros`` int32 ``[n_groups, out/8]``, both packed
along the output dim with the nibble order ``[0, 2, 4, 6, 1, 3, 5, 7]``, zero points stored as they are;
``L.scales`` fp16 ``[n_groups, out]``; no g_idx. 4-bit, grouped only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from llmq.errors import ShapeError, UnsupportedType
from llmq.formats import formats
from llmq.formats.base import Format, LayerSpec, QuantizedLinear, Scheme, tensor_info
from llmq.formats.packing import pack_awq, unpack_awq


@formats.register("awq", "awq-gemm")
class AWQFormat(Format):
    name = "awq"
    marker = "qweight"
    suffixes = ("qweight", "qzeros", "scales")
    bits_supported = (4,)

    def check(self, scheme: Scheme, layer: LayerSpec) -> None:
        super().check(scheme, layer)
        if scheme.group_size == -1:
            raise UnsupportedType("format awq needs a group size (AutoAWQ GEMM has no per-channel layout)")
        if layer.out_features % 8:
            raise ShapeError(f"{layer.name}: out_features {layer.out_features} is not a multiple of 8")

    def plan(self, scheme: Scheme, layer: LayerSpec) -> list:
        g = self.n_groups(scheme, layer)
        out, inp, n = layer.out_features, layer.in_features, layer.name
        return [
            tensor_info(f"{n}.qweight", "I32", (inp, out // 8)),
            tensor_info(f"{n}.qzeros", "I32", (g, out // 8)),
            tensor_info(f"{n}.scales", "F16", (g, out)),
        ]

    def pack(self, name: str, q: QuantizedLinear, scheme: Scheme) -> dict[str, torch.Tensor]:
        if not isinstance(q, QuantizedLinear):
            raise UnsupportedType(f"format awq cannot hold {type(q).__name__}")
        if q.g_idx is not None and not torch.equal(q.group_index().cpu(), _plain_g_idx(q)):
            raise UnsupportedType(f"{name}: AWQ has no g_idx; an act-order permutation cannot be stored")
        return {
            f"{name}.qweight": pack_awq(q.qweight.t()),
            f"{name}.qzeros": pack_awq(q.zeros.t()),
            f"{name}.scales": q.scales.t().to(torch.float16).contiguous(),
        }

    def unpack(
        self, name: str, get: Callable[[str], torch.Tensor], config: Mapping[str, Any]
    ) -> QuantizedLinear:
        gs = int(config.get("group_size", 128))
        codes = unpack_awq(get(f"{name}.qweight")).t()
        zeros = unpack_awq(get(f"{name}.qzeros")).t()
        scales = get(f"{name}.scales").t()
        return QuantizedLinear(qweight=codes, scales=scales, zeros=zeros, bits=4, group_size=gs, sym=False)

    def config(self, scheme: Scheme, ignore: list[str]) -> dict[str, Any]:
        return {
            "quant_method": "awq",
            "bits": scheme.bits,
            "group_size": scheme.group_size,
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": [i for i in ignore if i != "lm_head"] or None,
        }


def _plain_g_idx(q: QuantizedLinear) -> torch.Tensor:
    return torch.arange(q.in_features) // (q.in_features if q.group_size == -1 else q.group_size)
