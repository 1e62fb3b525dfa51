"""Writing a complete quantized output directory, streamed, atomically.

``write_checkpoint`` is what every method calls once it can produce its quantized layers one at a time::

    layers = select_layers(reader.infos(), ignore=cfg.ignore, only=cfg.only)     # llmq.quant.select, header only
    fmt = get_format("gptq"); scheme = Scheme(method="gptq", bits=4, group_size=128, sym=True)
    write_checkpoint(out, fmt, reader, layers, ((l.name, quantize(l)) for l in layers), scheme, force=force)

``layers`` may be given in any order (e.g. GPTQ's q/k/v, o, up/gate, down within a block): the quantized tensors
are planned and must be yielded in exactly that order. It validates every layer against the format first (nothing is written when one cannot be held), plans the output
tensors (unquantized ones as they are, each quantized Linear as ``fmt.plan`` says), writes the unquantized tensors
streaming from the reader, then consumes ``quantized`` - which must yield ``(name, QuantizedLinear |
Blockwise4bit)`` in the order of ``layers`` - packing and writing each as it comes, so peak memory is one layer.
The directory gets config.json with ``quantization_config``, the format's extra files, the tokenizer files and
generation_config.json of the source, and a README.md model card. It appears only when complete (AtomicOutput).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmq.errors import BadInput, ShapeError
from llmq.formats.base import Format, LayerSpec, Scheme
from llmq.io import SafetensorsWriter
from llmq.io.base import AtomicOutput, TensorInfo, check_output
from llmq.progress import Progress, no_progress

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)  # fmt: skip


@dataclass
class WriteResult:
    output: Path
    tensors: list[TensorInfo]
    output_bytes: int
    ignored: list[str] = field(default_factory=list)


def plan_checkpoint(fmt: Format, infos: Sequence[TensorInfo], layers: Sequence[LayerSpec],
                    scheme: Scheme) -> tuple[list[TensorInfo], list[TensorInfo]]:  # fmt: skip
    """(unquantized tensors copied as they are, quantized tensors in write order), from the header alone."""
    for layer in layers:
        fmt.check(scheme, layer)
    replaced = {f"{layer.name}.weight" for layer in layers}
    names = {i.name for i in infos}
    missing = replaced - names
    if missing:
        raise BadInput(f"layers not in the checkpoint: {', '.join(sorted(missing))}")
    passthrough = [i for i in infos if i.name not in replaced]
    planned = [t for layer in layers for t in fmt.plan(scheme, layer)]
    return passthrough, planned


def write_checkpoint(out: str | Path, fmt: Format, reader, layers: Sequence[LayerSpec],
                     quantized: Iterable[tuple[str, Any]], scheme: Scheme, *, force: bool = False,
                     max_shard_bytes: int | None = None, progress: Progress = no_progress,
                     card: Mapping[str, Any] | None = None) -> WriteResult:  # fmt: skip
    """Stream a complete quantized checkpoint directory to ``out`` (see the module docstring)."""
    src_dir = Path(reader.path) if Path(reader.path).is_dir() else Path(reader.path).parent
    out = check_output(out, force, inputs=[reader.path])
    config = reader_config(reader)
    if config is None:
        raise BadInput(f"{reader.path} has no config.json: quantize an HF model directory")
    infos = list(reader.infos())
    passthrough, planned = plan_checkpoint(fmt, infos, layers, scheme)
    quantized_names = {layer.name for layer in layers}
    ignored = sorted(i.name[: -len(".weight")] for i in passthrough
                     if i.name.endswith(".weight") and len(i.shape) == 2 and i.name[:-7] not in quantized_names)  # fmt: skip

    with AtomicOutput(out, is_dir=True, force=force) as tmp:
        writer = SafetensorsWriter(tmp, max_shard_bytes=max_shard_bytes, metadata={"format": "pt"})
        writer.plan([*passthrough, *planned])
        total = len(passthrough) + len(layers)
        for n, info in enumerate(passthrough):
            writer.write(info.name, reader.read(info.name))
            progress("write", n + 1, total)
        _write_quantized(writer, fmt, layers, quantized, scheme, progress, len(passthrough), total)
        writer.close()
        qcfg = fmt.config(scheme, ignored)
        _write_json(tmp / "config.json", {**config, "quantization_config": qcfg})
        for fname, obj in fmt.extra_files(scheme, ignored).items():
            _write_json(tmp / fname, obj)
        for fname in TOKENIZER_FILES:
            if (src_dir / fname).is_file():
                shutil.copyfile(src_dir / fname, tmp / fname)
        (tmp / "README.md").write_text(model_card(src_dir, fmt, scheme, layers, ignored, card or {}))
    size = sum(p.stat().st_size for p in out.iterdir() if p.suffix == ".safetensors")
    return WriteResult(output=out, tensors=[*passthrough, *planned], output_bytes=size, ignored=ignored)


def _write_quantized(writer, fmt: Format, layers: Sequence[LayerSpec], quantized: Iterable[tuple[str, Any]],
                     scheme: Scheme, progress: Progress, done: int, total: int) -> None:  # fmt: skip
    it = iter(quantized)
    for layer in layers:
        try:
            name, q = next(it)
        except StopIteration:
            raise BadInput(f"the quantizer stopped before {layer.name}") from None
        if name != layer.name:
            raise BadInput(f"quantized layers out of order: got {name}, expected {layer.name}")
        expected = {t.name: t for t in fmt.plan(scheme, layer)}
        for tname, tensor in fmt.pack(name, q, scheme).items():
            if tname not in expected or tuple(tensor.shape) != expected[tname].shape:
                raise ShapeError(f"{tname}: packed shape {tuple(tensor.shape)} differs from the plan")
            writer.write(tname, tensor.cpu())
        done += 1
        progress("quantize", done, total)
    if next(it, None) is not None:
        raise BadInput("the quantizer produced more layers than planned")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def model_card(src: Path, fmt: Format, scheme: Scheme, layers: Sequence[LayerSpec], ignored: Sequence[str],
               card: Mapping[str, Any]) -> str:  # fmt: skip
    """README.md saying how the checkpoint was made."""
    from llmq import __version__

    rows = [
        ("method", scheme.method),
        ("format", fmt.name),
        ("bits", scheme.quant_type if scheme.method in ("nf4", "fp4", "bnb") else scheme.bits),
        ("group size", scheme.blocksize if fmt.name == "bnb" else scheme.group_size),
        ("symmetric", scheme.sym if fmt.name != "bnb" else "n/a"),
        ("calibration dataset", card.get("dataset") or "none (data-free)"),
        ("quantized Linear layers", len(layers)),
        ("left unquantized", ", ".join(ignored[:8]) + (" ..." if len(ignored) > 8 else "") or "none"),
        ("source", src.name),
        ("llmq version", __version__),
    ]
    rows += [(k, v) for k, v in {**scheme.extra, **card}.items() if k != "dataset"]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    tags = "\n".join(f"- {t}" for t in ("llmq", scheme.method, fmt.name))
    return (
        f"---\nbase_model: {src.name}\ntags:\n{tags}\n---\n\n"
        f"# {src.name} ({scheme.method}, {fmt.name})\n\n"
        f"Quantized with llmq {__version__}.\n\n"
        f"| setting | value |\n| --- | --- |\n{table}\n"
    )


def reader_config(reader) -> dict[str, Any] | None:
    """config.json of the reader's model directory (None for a bare file without one)."""
    cfg = getattr(reader, "config", None)
    if cfg is not None:
        return dict(cfg)
    p = Path(reader.path)
    f = (p if p.is_dir() else p.parent) / "config.json"
    return json.loads(f.read_text()) if f.is_file() else None
