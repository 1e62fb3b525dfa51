"""Round-to-nearest weight-only quantization: 2-8 bits, per output channel or per group, symmetric or not.

The grid is GPTQ's (and compressed-tensors' min-max observer): symmetric schemes use ``scale = 2*absmax/maxq``
with the zero point at ``2**(bits-1)``; asymmetric ones stretch ``[min(w, 0), max(w, 0)]`` over ``[0, maxq]``.
Data-free, so it streams one tensor at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmq.errors import BadInput, ShapeError
from llmq.formats.base import QuantizedLinear
from llmq.formats.writer import LayerwiseQuantizer
from llmq.quant.base import QuantConfig, quantizers

RTN_BITS = (2, 3, 4, 5, 6, 8)


def quantize_rtn(W: torch.Tensor, bits: int, group_size: int = -1, sym: bool = True,
                 min_zero: int = 0) -> QuantizedLinear:  # fmt: skip
    """Quantize a ``[out, in]`` weight to ``bits``; ``group_size=-1`` is one scale per output channel.

    ``min_zero=1`` keeps every zero point >= 1 (GPTQ v1 stores zero-1): a group whose range starts at 0 gets
    zero 1 and a scale stretched over ``maxq - 1`` steps instead.
    """
    if bits not in RTN_BITS:
        raise BadInput(f"RTN supports {RTN_BITS} bits, not {bits}")
    out_f, in_f = W.shape
    gs = in_f if group_size == -1 else group_size
    if gs <= 0 or in_f % gs:
        raise ShapeError(f"in_features {in_f} is not divisible by group size {group_size}")
    maxq = (1 << bits) - 1
    x = W.to(torch.float32).reshape(out_f, in_f // gs, gs)
    if sym:
        amax = x.abs().amax(dim=-1)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        xmin = x.amin(dim=-1).clamp(max=0)
        xmax = x.amax(dim=-1).clamp(min=0)
        scale = (xmax - xmin) / maxq
        zero = torch.round(-xmin / torch.where(scale > 0, scale, 1.0)).clamp(0, maxq)
        if min_zero > 0:
            low = zero < min_zero
            scale = torch.where(low, xmax / (maxq - min_zero), scale)
            zero = torch.where(low, torch.full_like(zero, float(min_zero)), zero)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero groups: any scale works
    q = torch.clamp(torch.round(x / scale[..., None]) + zero[..., None], 0, maxq)
    return QuantizedLinear(
        qweight=q.reshape(out_f, in_f).to(torch.uint8),
        scales=scale,
        zeros=zero.to(torch.int32),
        bits=bits,
        group_size=group_size,
        sym=sym,
    )


@dataclass(frozen=True)
class RTNConfig(QuantConfig):
    format: str = "compressed-tensors"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    ignore: tuple[str, ...] = ()
    only: tuple[str, ...] = ()
    skip_indivisible: bool = False
    max_shard_size: str | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.bits not in RTN_BITS:
            raise BadInput(f"--bits {self.bits} is not supported by rtn ({', '.join(map(str, RTN_BITS))})")
        if self.group_size != -1 and self.group_size <= 0:
            raise BadInput(f"--group-size must be positive or -1 (per channel), not {self.group_size}")
        if self.format not in RTNQuantizer.formats:
            raise BadInput(f"rtn writes {', '.join(RTNQuantizer.formats)}, not {self.format}")


@quantizers.register("rtn")
class RTNQuantizer(LayerwiseQuantizer):
    name = "rtn"
    config_cls = RTNConfig
    formats = ("compressed-tensors", "gptq", "awq")

    def _prepare(self, reader, config: RTNConfig):
        from llmq.formats import get_format
        from llmq.formats.base import Scheme
        from llmq.formats.writer import select_layers

        fmt = get_format(config.format)
        infos = {i.name: i for i in reader.infos()}
        layers = select_layers(infos.values(), ignore=config.ignore, only=config.only)
        dtype = infos[layers[0].name + ".weight"].dtype
        scheme = Scheme(method="rtn", bits=config.bits, group_size=config.group_size, sym=config.sym,
                        dtype=dtype if dtype in ("F16", "BF16") else "F16")  # fmt: skip
        if config.skip_indivisible:
            layers = [layer for layer in layers if _fits(fmt, scheme, layer)]
            if not layers:
                raise ShapeError("no selected layer fits the format and group size")
        return fmt, scheme, layers

    def _quantize_layer(self, W, config: RTNConfig, fmt) -> QuantizedLinear:
        return quantize_rtn(W, config.bits, config.group_size, config.sym, fmt.min_zero)


def _fits(fmt, scheme, layer) -> bool:
    try:
        fmt.check(scheme, layer)
    except (ShapeError, BadInput):
        return False
    return True
