"""Options shared by the block-by-block methods (GPTQ, AWQ, ...): the grid, calibration, layer selection, output.

Its own module so the methods and the pipeline can both import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from llmq.errors import BadInput
from llmq.quant.base import QuantConfig
from llmq.quant.select import check_patterns

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128)
WRITE_FORMATS = ("gptq", "compressed-tensors", "fake-quant")


@dataclass(frozen=True)
class BlockwiseConfig(QuantConfig):
    """Options shared by the block-by-block methods (GPTQ, AWQ)."""

    format: str = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    calibration: str = "pydocs"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    ignore: tuple[str, ...] = ()  # llmq.quant.select: the head, embeddings and norms are never quantized
    only: tuple[str, ...] = ()
    device: str = "cpu"
    resume: bool = False
    skip_indivisible: bool = False
    max_shard_size: str | None = None

    formats: ClassVar[tuple[str, ...]] = WRITE_FORMATS

    @property
    def min_zero(self) -> int:
        """Smallest zero point the output format stores (GPTQ v1: 1)."""
        return 1 if self.format == "gptq" and not self.sym else 0

    def __post_init__(self) -> None:
        if self.format not in self.formats:
            raise BadInput(
                f"--format {self.format} is not available here (choose from {', '.join(self.formats)})"
            )
        if self.bits not in SUPPORTED_BITS:
            raise BadInput(f"--bits {self.bits} is not supported (choose from {SUPPORTED_BITS})")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise BadInput(
                f"--group-size {self.group_size} is not supported (choose from {SUPPORTED_GROUP_SIZES})"
            )
        if self.nsamples < 1 or self.seqlen < 8:
            raise BadInput("--nsamples must be >= 1 and --seqlen >= 8")
        for name in ("ignore", "only"):
            object.__setattr__(self, name, check_patterns(getattr(self, name)))
