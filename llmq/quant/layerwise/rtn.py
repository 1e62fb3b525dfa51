"""Round-to-nearest weight-only quantization: 2-8 bits, per output channel or per group, symmetric or not.

The grid is the shared one of :mod:`llmq.quant.grid` (GPTQ's, and compressed-tensors' min-max observer).
Data-free, so it streams one tensor at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmq.errors import BadInput, ShapeError
from llmq.formats.base import QuantizedLinear
from llmq.quant.base import QuantConfig, quantizers
from llmq.quant.grid import quantize_rtn
from llmq.quant.layerwise.pipeline import LayerwiseQuantizer
from llmq.quant.select import check_patterns

RTN_BITS = (2, 3, 4, 5, 6, 8)


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
        for name in ("ignore", "only"):
            object.__setattr__(self, name, check_patterns(getattr(self, name)))
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
        from llmq.quant.select import select_layers

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
