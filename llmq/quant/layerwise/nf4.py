"""NF4 / FP4 with bitsandbytes semantics, without needing bitsandbytes to quantize.

Blockwise over the flattened weight: each block of ``blocksize`` (64) values is scaled by its absmax (fp32) and
each value becomes the index of the nearest of 16 codebook entries (ties go to the lower entry, as bitsandbytes'
midpoint bucketing does). Codes are packed two per byte, the first in the high nibble. Double quantization stores
``absmax - mean(absmax)`` as 8-bit codes of bitsandbytes' signed dynamic map, in blocks of 256 with fp32 absmax.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from llmq.errors import BadInput
from llmq.formats.base import Blockwise4bit
from llmq.formats.packing import pack_nibbles_high_first
from llmq.quant.base import QuantConfig, quantizers
from llmq.quant.layerwise.pipeline import LayerwiseQuantizer
from llmq.quant.select import check_patterns

# QLoRA's NormalFloat4 (bitsandbytes get_4bit_type("nf4"))
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
# bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit) in its code order, normalised by the largest value 12
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
FP4_CODE = tuple(v / 12.0 for v in _FP4_RAW)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def codebook(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(NF4_CODE, dtype=torch.float32)
    if quant_type == "fp4":
        return torch.tensor(FP4_CODE, dtype=torch.float32)
    raise BadInput(f"--quant-type must be nf4 or fp4, not {quant_type!r}")


@cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True, 7, 8)): 256 sorted values."""
    data: list[float] = []
    max_exp, non_sign = 7, 7
    for i in range(max_exp):
        items = 2 ** (i + non_sign - max_exp) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        # scaled in float32 as bitsandbytes does, so the map is bit-identical
        data += ((10 ** (-(max_exp - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exp - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


def _absmax_scaled(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax per block, values scaled to [-1, 1]); a short last block gets its own absmax."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=-1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)[:, None]), -1, 1).reshape(-1)
    if full < n:
        am = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, am[None]])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    return absmax, scaled


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index into ``code`` of the nearest entry (midpoint bucketing over the sorted code)."""
    order = torch.argsort(code)
    srt = code[order]
    idx = torch.bucketize(scaled, (srt[:-1] + srt[1:]) / 2, out_int32=True)
    return order[idx.long()]


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 codes of the dynamic map and fp32 absmax per block (the double quantization of absmax).

    Exact nearest-code rounding, as bitsandbytes' pure-torch kernel does. Its native CPU kernel picks a
    neighbouring code for roughly 0.2% of values (an approximate search), so double-quantized absmax codes can
    differ from a bitsandbytes-on-CPU run by one step there; the 4-bit codes themselves are identical.
    """
    absmax, scaled = _absmax_scaled(x.reshape(-1).float(), blocksize)
    return _nearest(scaled, dynamic_map()).to(torch.uint8), absmax


def quantize_4bit(W: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                  double_quant: bool = False) -> Blockwise4bit:  # fmt: skip
    """bitsandbytes.functional.quantize_4bit (uint8 storage), as a :class:`Blockwise4bit`."""
    if blocksize not in BLOCKSIZES:
        raise BadInput(f"--blocksize must be one of {BLOCKSIZES}, not {blocksize}")
    from llmq.io.base import dtype_code

    code = codebook(quant_type)
    absmax, scaled = _absmax_scaled(W.reshape(-1).float(), blocksize)
    packed = pack_nibbles_high_first(_nearest(scaled, code))
    q = Blockwise4bit(packed=packed, absmax=absmax, code=code, shape=tuple(W.shape), quant_type=quant_type,
                      blocksize=blocksize, dtype=dtype_code(W.dtype))  # fmt: skip
    if double_quant:
        offset = absmax.mean()
        q.absmax, q.nested_absmax = quantize_blockwise_8bit(absmax - offset, 256)
        q.nested_code = dynamic_map().clone()
        q.offset = float(offset)
    return q


@dataclass(frozen=True)
class NF4Config(QuantConfig):
    format: str = "bnb"
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    ignore: tuple[str, ...] = ()
    only: tuple[str, ...] = ()
    max_shard_size: str | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("ignore", "only"):
            object.__setattr__(self, name, check_patterns(getattr(self, name)))
        codebook(self.quant_type)
        if self.blocksize not in BLOCKSIZES:
            raise BadInput(f"--blocksize must be one of {BLOCKSIZES}, not {self.blocksize}")
        if self.format != "bnb":
            raise BadInput(f"nf4/fp4 write the bnb format only, not {self.format}")
        if self.compute_dtype not in ("float16", "bfloat16", "float32"):
            raise BadInput(f"--compute-dtype must be float16, bfloat16 or float32, not {self.compute_dtype}")


@quantizers.register("nf4", "bnb")
class NF4Quantizer(LayerwiseQuantizer):
    name = "nf4"
    config_cls = NF4Config
    formats = ("bnb",)

    def _prepare(self, reader, config: NF4Config):
        from llmq.formats import get_format
        from llmq.formats.base import Scheme
        from llmq.quant.select import select_layers

        layers = select_layers(reader.infos(), ignore=config.ignore, only=config.only)
        layers = [self._with_meta(reader, layer, config) for layer in layers]
        scheme = Scheme(method=config.quant_type, bits=4, group_size=config.blocksize, sym=True,
                        quant_type=config.quant_type, blocksize=config.blocksize,
                        double_quant=config.double_quant, compute_dtype=config.compute_dtype)  # fmt: skip
        return get_format("bnb"), scheme, layers

    @staticmethod
    def _with_meta(reader, layer, config: NF4Config):
        """The bnb quant_state JSON holds the weight dtype and the double-quant offset: plan needs both."""
        from dataclasses import replace

        meta = {"dtype": reader.info(layer.name + ".weight").dtype}
        if config.double_quant:
            # one cheap pass (absmax per block) so the planned header has exact sizes
            W = reader.read(layer.name + ".weight")
            absmax, _ = _absmax_scaled(W.reshape(-1).float(), config.blocksize)
            meta["nested_offset"] = float(absmax.mean())
        return replace(layer, meta=meta)

    def _quantize_layer(self, W, config: NF4Config, fmt):
        return quantize_4bit(W, config.quant_type, config.blocksize, config.double_quant)

    def _method_name(self, config: NF4Config) -> str:
        return config.quant_type
