"""The quantizer plugin contract.

A quantizer is stateless. ``plan`` says what it will write from the header alone (so --dry-run, GGUF headers and
the memory estimator work without reading weights); ``run`` streams the checkpoint and writes the output.
Quantizers never mutate their input and never write outside the output path they are given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from llmq.errors import BadInput
from llmq.io.base import TensorInfo
from llmq.registry import Registry

CONFIG_VERSION = 1


@dataclass(frozen=True)
class QuantConfig:
    """Base of every quantizer config: frozen, validated in __post_init__, round-trips through dicts."""

    version: int = CONFIG_VERSION

    # option names (as the CLI spells them, with underscores) this config accepts from ``from_options``
    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(names)
        if unknown:
            raise BadInput(f"unknown {cls.__name__} fields: {', '.join(sorted(unknown))}")
        if d.get("version", CONFIG_VERSION) > CONFIG_VERSION:
            raise BadInput(f"{cls.__name__} version {d['version']} is newer than this llmq understands")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)

    @classmethod
    def from_options(cls, method: str, options: Mapping[str, Any]):
        """Build from CLI options the user set explicitly (None values are dropped by the CLI).

        An option this method does not use is a flag conflict and gets a clear error.
        """
        names = {f.name for f in dataclasses.fields(cls)} - {"version"}
        unknown = sorted(k for k in options if k not in names)
        if unknown:
            flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
            raise BadInput(f"{flags} cannot be used with --method {method}")
        return cls(**dict(options))


@dataclass
class QuantizeResult:
    output: Path
    method: str
    format: str
    config: dict[str, Any]
    seconds: float = 0.0
    input_bytes: int = 0
    output_bytes: int = 0
    tensors: list[TensorInfo] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    n_params: int = 0  # parameters of the source model (the denominator of bits per weight)

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "method": self.method,
            "format": self.format,
            "config": self.config,
            "seconds": round(self.seconds, 3),
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "n_params": self.n_params,
            "bits_per_weight": 8.0 * self.output_bytes / self.n_params if self.n_params else None,
            "notes": self.notes,
        }


# progress(stage: str, done: float, total: float) - the CLI passes a rich progress callback
Progress = Callable[[str, float, float], None]


def no_progress(stage: str, done: float, total: float) -> None:
    return None


class Quantizer(Protocol):
    name: ClassVar[str]
    config_cls: ClassVar[type[QuantConfig]]
    formats: ClassVar[tuple[str, ...]]  # output formats this method can write; the first is the default

    def plan(self, src: Path, config: QuantConfig) -> Sequence[TensorInfo]: ...

    def run(self, src: Path, out: Path, config: QuantConfig, *, force: bool = False,
            progress: Progress = no_progress) -> QuantizeResult: ...  # fmt: skip


quantizers: Registry[type[Quantizer]] = Registry(
    "quantization method",
    entry_point_group="llmq.quantizers",
    builtin_modules={
        "rtn": "llmq.quant.layerwise.rtn",
        "nf4": "llmq.quant.layerwise.nf4",
        "bnb": "llmq.quant.layerwise.nf4",
        "gguf": "llmq.quant.gguf.quantizer",
        "gptq": "llmq.quant.blockwise.gptq",
        "awq": "llmq.quant.blockwise.awq",
    },
)
