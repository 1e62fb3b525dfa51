"""The contract between quantization methods and on-disk formats.

A method (RTN, GPTQ, AWQ) produces, for each Linear it quantizes, a :class:`QuantizedLinear`: unsigned integer
codes, per-group scales and zero points, the group of every input column (``g_idx``), and the scheme (bits,
group size, symmetric). The dequantized weight is always::

    W[o, i] = scales[o, g] * (qweight[o, i] - zeros[o, g])      with g = g_idx[i]

A :class:`Format` lays that out on disk (``pack``), says what it will write from shapes alone (``plan``), reads
it back (``unpack``) and writes the ``quantization_config`` consumers expect (``config``). NF4/FP4 produce a
:class:`Blockwise4bit` instead (codebook codes + absmax per block), which only the ``bnb`` format holds.

Formats are looked up with :func:`llmq.formats.get_format`; complete output directories are written by
:func:`llmq.formats.writer.write_checkpoint`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from llmq.errors import ShapeError, UnsupportedType
from llmq.io.base import TensorInfo


@dataclass
class QuantizedLinear:
    """One quantized Linear weight, format-free. Shapes are in torch order (``[out, in]``).

    - ``qweight``: integer codes ``[out, in]`` in ``[0, 2**bits)`` (any integer dtype);
    - ``scales``: float ``[out, n_groups]``; ``zeros``: integer ``[out, n_groups]`` in ``[0, 2**bits)``
      (symmetric schemes use ``2**(bits-1)`` everywhere);
    - ``g_idx``: int ``[in]``, the group of each input column; ``None`` means ``i // group_size``
      (act-order methods pass a permuted one);
    - ``group_size``: columns per group, ``-1`` for one group per output channel.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    sym: bool
    g_idx: torch.Tensor | None = None

    def __post_init__(self) -> None:
        out, inp = self.qweight.shape
        if self.scales.shape != self.zeros.shape or self.scales.shape[0] != out:
            raise ShapeError(f"scales {tuple(self.scales.shape)} / zeros {tuple(self.zeros.shape)} "
                             f"do not fit qweight {tuple(self.qweight.shape)}")  # fmt: skip
        if self.g_idx is not None and self.g_idx.shape != (inp,):
            raise ShapeError(f"g_idx has shape {tuple(self.g_idx.shape)}, expected ({inp},)")

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.qweight.shape[1])

    @property
    def n_groups(self) -> int:
        return int(self.scales.shape[1])

    def group_index(self) -> torch.Tensor:
        """``g_idx`` as a long tensor, built from ``group_size`` when not given."""
        if self.g_idx is not None:
            return self.g_idx.long()
        gs = self.in_features if self.group_size == -1 else self.group_size
        return torch.arange(self.in_features, device=self.qweight.device) // gs

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g = self.group_index()
        s = self.scales.to(torch.float32)[:, g]
        z = self.zeros.to(torch.float32)[:, g]
        return (s * (self.qweight.to(torch.float32) - z)).to(dtype)

    def split_rows(self, sizes: list[int]) -> list[QuantizedLinear]:
        """Consecutive row slices (the Linears a stacked q/k/v or gate/up matrix was built from)."""
        out, start = [], 0
        for n in sizes:
            sl = slice(start, start + n)
            g_idx = None if self.g_idx is None else self.g_idx.clone()
            out.append(QuantizedLinear(self.qweight[sl].contiguous(), self.scales[sl].contiguous(),
                                       self.zeros[sl].contiguous(), self.bits, self.group_size, self.sym,
                                       g_idx))  # fmt: skip
            start += n
        return out


@dataclass
class Blockwise4bit:
    """bitsandbytes-style 4-bit weight: codebook codes over the flattened weight in blocks of ``blocksize``.

    ``packed`` uint8 ``[(n+1)//2, 1]`` (first code in the high nibble); ``absmax`` float32 ``[n_blocks]`` or,
    with double quantization, uint8 codes of ``absmax - offset`` plus ``nested_absmax`` / ``nested_code`` /
    ``offset``. ``code`` is the 16-entry codebook (NF4 or FP4).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    shape: tuple[int, int]
    quant_type: str  # "nf4" | "fp4"
    blocksize: int = 64
    dtype: str = "F16"  # dtype of the original weight (what dequantization returns)
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = 256
    offset: float | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight back in ``dtype`` (default: the original dtype)."""
        from llmq.formats.packing import unpack_nibbles_high_first
        from llmq.io.base import torch_dtype

        n = 1
        for d in self.shape:
            n *= d
        absmax = self.absmax
        if self.double_quant:
            nested = self.nested_code.to(absmax.device)[absmax.long()]
            absmax = _scale_blocks(nested, self.nested_absmax, self.nested_blocksize) + self.offset
        values = self.code.to(absmax.device)[unpack_nibbles_high_first(self.packed, n).long()]
        out = _scale_blocks(values, absmax.float(), self.blocksize)
        return out.reshape(self.shape).to(dtype or torch_dtype(self.dtype))


def _scale_blocks(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``values`` (flat) times the absmax of their block; a short last block uses the last absmax."""
    n = values.numel()
    full = n - n % blocksize
    head = (values[:full].reshape(-1, blocksize) * absmax[: full // blocksize, None]).reshape(-1)
    if full == n:
        return head
    return torch.cat([head, values[full:] * absmax[-1]])


@dataclass(frozen=True)
class Scheme:
    """What every quantized layer of a checkpoint shares; formats turn it into ``quantization_config``."""

    method: str
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    dtype: str = "F16"  # dtype of scales (and of the unquantized tensors' compute)
    desc_act: bool = False
    # bnb only
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str = "float16"
    # method settings recorded in the config / model card (damp_percent, dataset, ...)
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LayerSpec:
    """A Linear that will be quantized, known from the header alone."""

    name: str  # module name, without ".weight"
    out_features: int
    in_features: int
    # data-dependent facts a format needs to plan exact byte sizes (bnb: the double-quant offset)
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


class Format(ABC):
    """An on-disk layout of quantized Linear weights. Subclasses are stateless and registered by name."""

    name: ClassVar[str]
    # the suffix of the tensor that marks a quantized module in a checkpoint ("qweight", "weight_packed", ...)
    marker: ClassVar[str]
    # tensor suffixes this format writes per layer (for detection and loading)
    suffixes: ClassVar[tuple[str, ...]]
    bits_supported: ClassVar[tuple[int, ...]]
    # smallest zero point the format can store (GPTQ v1 stores zero-1, so 0 does not round-trip)
    min_zero: ClassVar[int] = 0

    def check(self, scheme: Scheme, layer: LayerSpec) -> None:
        """Raise UnsupportedType/ShapeError when this format cannot hold ``layer`` under ``scheme``."""
        if scheme.bits not in self.bits_supported:
            raise UnsupportedType(
                f"format {self.name} holds {self.bits_supported}-bit weights, not {scheme.bits}"
            )
        gs = scheme.group_size
        if gs != -1 and (gs <= 0 or layer.in_features % gs):
            raise ShapeError(
                f"{layer.name}: in_features {layer.in_features} is not divisible by group size {gs}"
            )

    @abstractmethod
    def plan(self, scheme: Scheme, layer: LayerSpec) -> list[TensorInfo]:
        """The tensors ``pack`` will return for this layer, in write order (names, dtypes, shapes, bytes)."""

    @abstractmethod
    def pack(self, name: str, q: Any, scheme: Scheme) -> dict[str, torch.Tensor]:
        """Full tensor name -> tensor for the layer ``name`` (in the order of ``plan``)."""

    @abstractmethod
    def unpack(self, name: str, get: Callable[[str], torch.Tensor], config: Mapping[str, Any]) -> Any:
        """Read layer ``name`` back (``get(full_tensor_name)``) given the checkpoint's quantization_config."""

    @abstractmethod
    def config(self, scheme: Scheme, ignore: list[str]) -> dict[str, Any]:
        """``quantization_config`` for config.json (``ignore``: module names left unquantized)."""

    def extra_files(self, scheme: Scheme, ignore: list[str]) -> dict[str, Any]:
        """Other JSON files of the output directory (file name -> object)."""
        return {}

    @staticmethod
    def n_groups(scheme: Scheme, layer: LayerSpec) -> int:
        return 1 if scheme.group_size == -1 else layer.in_features // scheme.group_size


def tensor_info(name: str, dtype: str, shape: tuple[int, ...]) -> TensorInfo:
    from llmq.io.base import ELEMENT_SIZES

    n = 1
    for d in shape:
        n *= d
    return TensorInfo(
        name=name, dtype=dtype, shape=tuple(int(d) for d in shape), nbytes=n * ELEMENT_SIZES[dtype]
    )


def dtype_of(code: str) -> torch.dtype:
    from llmq.io.base import torch_dtype

    return torch_dtype(code)
