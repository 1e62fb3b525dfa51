"""The quantizer plugin contract.

A quantizer is stateless. ``plan`` says what it will write from the header alone (so --dry-run, GGUF headers and
the memory estimator work without reading weights); ``run`` streams the checkpoint and writes the output.
Quantizers never mutate their input and never write outside the output path they are given.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from llmq.errors import BadInput
from llmq.io.base import TensorInfo, bits_per_weight
from llmq.progress import Progress, no_progress  # noqa: F401  (re-exported: methods import them from here)
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
    def option_types(cls) -> dict[str, Any]:
        """The options this config takes (its init fields but ``version``) with their resolved type hints."""
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init and f.name != "version"}

    @classmethod
    def from_options(cls, method: str, options: Mapping[str, Any], extra: Mapping[str, Any] | None = None):
        """Build from CLI options the user set explicitly (None values are dropped by the CLI).

        ``options`` are the common flags, already typed; an option this method does not use is a flag conflict
        and gets a clear error. ``extra`` holds the method's own options from ``-O key=value`` and ``--config``
        (see :func:`gather_options`): strings or JSON/TOML values, checked against the field types here.
        Explicit flags override ``extra``.
        """
        fields = cls.option_types()
        unknown = sorted(k for k in options if k not in fields)
        if unknown:
            flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
            raise BadInput(f"{flags} cannot be used with --method {method}")
        values = {}
        for key, raw in (extra or {}).items():
            name = key.replace("-", "_")
            if name == "version":
                check_version(cls, raw)
                continue
            if name not in fields:
                raise BadInput(
                    f"--method {method} has no option {key!r} (valid: {', '.join(sorted(fields))})"
                )
            values[name] = convert_option(name, raw, fields[name])
        return cls(**(values | dict(options)))


def check_version(cls: type, raw: Any) -> None:
    if isinstance(raw, bool) or not isinstance(raw, int | str) or not str(raw).isdigit():
        raise BadInput(f"version must be an integer, not {raw!r}")
    if int(raw) > CONFIG_VERSION:
        raise BadInput(f"{cls.__name__} version {raw} is newer than this llmq understands")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def convert_option(name: str, raw: Any, hint: Any) -> Any:
    """``raw`` (a string from ``-O`` or a value from a config file) as a value of type ``hint``.

    bool takes true/false/yes/no/on/off/1/0; ``X | None`` takes none/null; ``tuple[T, ...]`` a list (a JSON list
    on the command line, or one value per repeated ``-O``); Literal its values. Other types pass through to the
    config's own validation.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("none", "null")):
            if len(inner) < len(args):
                return None
        if len(inner) == 1:
            return convert_option(name, raw, inner[0])
        return raw
    if origin is tuple:
        item = args[0] if args else Any
        if isinstance(raw, str) and raw.lstrip().startswith("["):
            raw = _json_value(name, raw)
        items = raw if isinstance(raw, list | tuple) else [raw]
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            return tuple(convert_option(name, v, item) for v in items)
        if len(items) != len(args):
            raise BadInput(f"option {name} takes {len(args)} values, not {len(items)}")
        return tuple(convert_option(name, v, a) for v, a in zip(items, args, strict=True))
    if origin is typing.Literal:
        for allowed in args:
            if raw == allowed or (
                isinstance(raw, str) and not isinstance(allowed, str) and raw == str(allowed)
            ):
                return allowed
        raise BadInput(f"option {name} must be one of {', '.join(map(str, args))}, not {raw!r}")
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        raise BadInput(f"option {name} takes true or false, not {raw!r}")
    if hint is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        try:
            if isinstance(raw, str):
                return int(raw.strip())
        except ValueError:
            pass
        raise BadInput(f"option {name} takes an integer, not {raw!r}")
    if hint is float:
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            return float(raw)
        try:
            if isinstance(raw, str):
                return float(raw.strip())
        except ValueError:
            pass
        raise BadInput(f"option {name} takes a number, not {raw!r}")
    if hint is str:
        if isinstance(raw, str):
            return raw
        raise BadInput(f"option {name} takes a string, not {raw!r}")
    return raw


def _json_value(name: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise BadInput(f"option {name}: {text!r} is not a JSON list ({e})") from None


def gather_options(
    assignments: Sequence[str] = (), config_file: str | os.PathLike | None = None
) -> dict[str, Any]:
    """The method options of ``--config FILE`` (TOML or JSON: one table of option = value; a saved ``config``
    of a result works) and of ``-O key=value`` items, which override the file. Repeating ``-O`` for a key
    gives it several values (for tuple options)."""
    out: dict[str, Any] = dict(load_options_file(config_file)) if config_file is not None else {}
    given: dict[str, list[str]] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise BadInput(f"-O {item!r}: expected key=value")
        given.setdefault(key.replace("-", "_"), []).append(value)
    for key, values in given.items():
        out.pop(key.replace("_", "-"), None)
        out[key] = values[0] if len(values) == 1 else values
    return out


def load_options_file(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise BadInput(f"--config {p}: no such file") from None
    except OSError as e:
        raise BadInput(f"--config {p}: {e.strerror or e}") from None
    try:
        if p.suffix.lower() == ".toml":
            import tomllib

            table = tomllib.loads(data.decode("utf-8"))
        elif p.suffix.lower() == ".json":
            table = json.loads(data)
        else:
            raise BadInput(f"--config {p}: expected a .toml or .json file")
    except (
        UnicodeDecodeError,
        ValueError,
    ) as e:  # tomllib.TOMLDecodeError and JSONDecodeError are ValueErrors
        raise BadInput(f"--config {p}: not valid {p.suffix.lower()[1:].upper()} ({e})") from None
    if not isinstance(table, dict):
        raise BadInput(f"--config {p}: expected a table of option = value")
    return table


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

    @property
    def data_bytes(self) -> int:
        """Bytes of tensor data written (the file size when the method did not list its tensors)."""
        return sum(t.nbytes for t in self.tensors) if self.tensors else self.output_bytes

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
            "bits_per_weight": bits_per_weight(self.data_bytes, self.n_params) if self.n_params else None,
            "notes": self.notes,
        }


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
