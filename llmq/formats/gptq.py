"""AutoGPTQ / GPTQModel checkpoint format "gptq" (v1).

Per Linear ``L``: ``L.qweight`` int32 ``[in*bits/32, out]`` (codes packed along the input dim, LSB first, 3-bit
straddling words), ``L.qzeros`` int32 ``[n_groups, out*bits/32]`` (packed along out, storing **zero - 1**: v1
kernels add the 1 back), ``L.scales`` fp16 ``[n_groups, out]``, ``L.g_idx`` int32 ``[in]``. The same settings go in
``quantize_config.json`` and in config.json's ``quantization_config``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from llmq.errors import ShapeError, UnsupportedType
from llmq.formats import formats
from llmq.formats.base import Format, LayerSpec, QuantizedLinear, Scheme, tensor_info
from llmq.formats.packing import pack_int32, packed_len, unpack_int32


@formats.register("gptq", "gptq-v1")
class GPTQFormat(Format):
    name = "gptq"
    marker = "qweight"
    suffixes = ("qweight", "qzeros", "scales", "g_idx")
    bits_supported = (2, 3, 4, 8)
    min_zero = 1  # zero - 1 must not wrap below 0

    def check(self, scheme: Scheme, layer: LayerSpec) -> None:
        super().check(scheme, layer)
        if (layer.in_features * scheme.bits) % 32 or (layer.out_features * scheme.bits) % 32:
            raise ShapeError(f"{layer.name}: {layer.out_features}x{layer.in_features} does not pack into "
                             f"int32 words at {scheme.bits} bits")  # fmt: skip

    def plan(self, scheme: Scheme, layer: LayerSpec) -> list:
        g = self.n_groups(scheme, layer)
        b, out, inp, n = scheme.bits, layer.out_features, layer.in_features, layer.name
        return [
            tensor_info(f"{n}.qweight", "I32", (packed_len(inp, b), out)),
            tensor_info(f"{n}.qzeros", "I32", (g, packed_len(out, b))),
            tensor_info(f"{n}.scales", "F16", (g, out)),
            tensor_info(f"{n}.g_idx", "I32", (inp,)),
        ]

    def pack(self, name: str, q: QuantizedLinear, scheme: Scheme) -> dict[str, torch.Tensor]:
        if not isinstance(q, QuantizedLinear):
            raise UnsupportedType(f"format gptq cannot hold {type(q).__name__}")
        if int(q.zeros.min()) < self.min_zero:
            raise ShapeError(f"{name}: a zero point of 0 cannot be stored in GPTQ v1 (it stores zero-1)")
        mask = (1 << q.bits) - 1
        return {
            f"{name}.qweight": pack_int32(q.qweight.t(), q.bits, dim=0),
            f"{name}.qzeros": pack_int32((q.zeros.t().to(torch.int64) - 1) & mask, q.bits, dim=1),
            f"{name}.scales": q.scales.t().to(torch.float16).contiguous(),
            f"{name}.g_idx": q.group_index().to(torch.int32),
        }

    def unpack(
        self, name: str, get: Callable[[str], torch.Tensor], config: Mapping[str, Any]
    ) -> QuantizedLinear:
        bits = int(config["bits"])
        scales = get(f"{name}.scales")
        qweight = get(f"{name}.qweight")
        g_idx = get(f"{name}.g_idx")
        out = scales.shape[1]
        codes = unpack_int32(qweight, bits, g_idx.shape[0], dim=0).t()
        # v1: the kernels use stored + 1 as the zero point
        zeros = unpack_int32(get(f"{name}.qzeros"), bits, out, dim=1).t() + 1
        return QuantizedLinear(qweight=codes, scales=scales.t(), zeros=zeros, bits=bits,
                               group_size=int(config.get("group_size", -1)), sym=bool(config.get("sym", True)),
                               g_idx=g_idx)  # fmt: skip

    def config(self, scheme: Scheme, ignore: list[str]) -> dict[str, Any]:
        cfg = {
            "bits": scheme.bits,
            "group_size": scheme.group_size,
            "desc_act": scheme.desc_act,
            "sym": scheme.sym,
            "damp_percent": scheme.extra.get("damp_percent", 0.01),
            "static_groups": scheme.extra.get("static_groups", False),
            "true_sequential": scheme.extra.get("true_sequential", True),
            "quant_method": "gptq",
            "checkpoint_format": "gptq",
            "meta": {"quantizer": [f"llmq:{_version()}"], "method": scheme.method},
        }
        return cfg

    def extra_files(self, scheme: Scheme, ignore: list[str]) -> dict[str, Any]:
        return {"quantize_config.json": self.config(scheme, ignore)}


def _version() -> str:
    from llmq import __version__

    return __version__
