"""Output of the blockwise pipeline, from the finished blocks in the resume directory.

Packed formats (gptq, awq, compressed-tensors) go through the llmq.formats writer, which reads unquantized tensors
from a view of the source where block tensors come from the finished blocks (AWQ changed the norms). ``fake-quant``
is an ordinary HF checkpoint whose quantized Linears hold their dequantized weights; it is written here, through
llmq.io's SafetensorsWriter like every other output. Either way the directory appears only when complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from llmq.formats.writer import TOKENIZER_FILES
from llmq.io.base import DEFAULT_SHARD_BYTES, parse_size
from llmq.quant.base import QuantizeResult
from llmq.quant.blockwise.resume import record_from_tensors

if TYPE_CHECKING:
    import torch

    from llmq.quant.blockwise.config import BlockwiseConfig
    from llmq.quant.blockwise.pipeline import Plan, SourceModel
    from llmq.quant.blockwise.resume import ResumeDir


def iter_output_tensors(reader, plan: Plan, resume: ResumeDir, config: BlockwiseConfig):
    """(name, tensor or QuantizedLinear) in checkpoint order, one block's records in memory at a time."""
    prefix = plan.arch.layers + "."
    for name in reader.names():
        if not name.startswith(prefix):
            yield name, reader.read(name)
    for i in range(plan.n_layers):
        tensors = resume.load_block(i)
        bp = plan.arch.block_prefix(i)
        for key, _, _ in resume.block_header(i):  # the order plan_fake_quant planned
            if "__" in key:
                if key.endswith(".__qweight"):
                    module = key.removesuffix(".__qweight")
                    yield bp + module + ".weight", record_from_tensors(tensors, module, config)
                continue
            yield bp + key, tensors[key]


def _fake_quant_dtype(reader) -> torch.dtype:
    """The dtype of the source's floating tensors (that of its first norm), which fake-quant writes everywhere."""
    import torch

    norms = [n for n in reader.names() if n.endswith("norm.weight")]
    return reader.read(norms[0]).dtype if norms else torch.float32


def plan_fake_quant(reader, plan: Plan, resume: ResumeDir, dtype: torch.dtype) -> list:
    """The tensors of a fake-quant output in write order, from the source header and the block files' headers."""
    from llmq.io.base import ELEMENT_SIZES, TensorInfo, dtype_code, torch_dtype

    code = dtype_code(dtype)

    def info(name: str, dt: str, shape) -> TensorInfo:
        dt = code if torch_dtype(dt).is_floating_point else dt
        return TensorInfo(name, dt, tuple(int(d) for d in shape), _numel(shape) * ELEMENT_SIZES[dt])

    prefix = plan.arch.layers + "."
    infos = [info(n, reader.dtype(n), reader.shape(n)) for n in reader.names() if not n.startswith(prefix)]
    for i in range(plan.n_layers):
        bp = plan.arch.block_prefix(i)
        for key, dt, shape in resume.block_header(i):
            if key.endswith(".__qweight"):
                infos.append(info(bp + key.removesuffix(".__qweight") + ".weight", code, shape))
            elif "__" not in key:
                infos.append(info(bp + key, dt, shape))
    return infos


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _write_fake_quant(tmp: Path, reader, plan: Plan, resume: ResumeDir, config: BlockwiseConfig) -> list:
    """An ordinary HF checkpoint whose quantized Linears hold their dequantized weights (source dtype)."""
    import torch

    from llmq.io import SafetensorsWriter

    dtype = _fake_quant_dtype(reader)
    infos = plan_fake_quant(reader, plan, resume, dtype)
    limit = parse_size(config.max_shard_size) if config.max_shard_size else DEFAULT_SHARD_BYTES
    writer = SafetensorsWriter(tmp, max_shard_bytes=limit, metadata={"format": "pt"})
    writer.plan(infos)
    try:
        for name, t in iter_output_tensors(reader, plan, resume, config):
            if not isinstance(t, torch.Tensor):
                t = t.dequantize()
            writer.write(name, t.to(dtype if t.is_floating_point() else t.dtype).contiguous())
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return infos


def write_output(src: Path, out: Path, reader, plan: Plan, resume: ResumeDir, config: BlockwiseConfig,
                 method_name: str, *, force: bool) -> QuantizeResult:  # fmt: skip
    from llmq.io.base import AtomicOutput

    if config.format != "fake-quant":
        infos = _write_packed(out, reader, plan, resume, config, method_name, force)
    else:
        with AtomicOutput(out, is_dir=True, force=force) as tmp:
            infos = _write_fake_quant(tmp, reader, plan, resume, config)
            (tmp / "config.json").write_text(json.dumps(reader.config, indent=2))
            for name in TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copyfile(src / name, tmp / name)
            (tmp / "llmq_quantization.json").write_text(
                json.dumps(
                    {"method": method_name, "format": config.format, "config": config.to_dict()}, indent=2
                )
            )
    in_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return QuantizeResult(out, method_name, config.format, config.to_dict(), input_bytes=in_bytes,
                          output_bytes=out_bytes, tensors=list(infos))  # fmt: skip


class _QuantizedView:
    """The source reader as the format writer sees it: block tensors come from the finished blocks (AWQ changed
    the norms), everything else from the source; dtypes stay those of the source header."""

    def __init__(self, source: SourceModel, plan: Plan, resume: ResumeDir):
        self.source, self.plan, self.resume = source, plan, resume
        self.path = source.path
        self.config = source.config
        self._block: tuple[int, dict] | None = None

    def infos(self):
        return self.source.infos()

    def read(self, name: str):
        from llmq.io.base import torch_dtype

        prefix = self.plan.arch.layers + "."
        if not name.startswith(prefix):
            return self.source.read(name)
        i = int(name[len(prefix) :].split(".", 1)[0])
        if self._block is None or self._block[0] != i:
            self._block = (i, self.resume.load_block(i))
        rel = name[len(self.plan.arch.block_prefix(i)) :]
        return self._block[1][rel].to(torch_dtype(self.source.dtype(name)))


def _scheme(config: BlockwiseConfig, method_name: str):
    from llmq.formats.base import Scheme

    extra = {"dataset": config.calibration, "nsamples": config.nsamples, "seqlen": config.seqlen}
    for key in ("damp_percent", "static_groups", "true_sequential", "act_order"):
        if hasattr(config, key):
            extra[key] = getattr(config, key)
    return Scheme(method=method_name, bits=config.bits, group_size=config.group_size, sym=config.sym,
                  dtype="F16", desc_act=bool(getattr(config, "act_order", False)), extra=extra)  # fmt: skip


def _layer_specs(plan: Plan) -> list:
    from llmq.formats.base import LayerSpec

    return [LayerSpec(plan.arch.block_prefix(i) + rel, *plan.shapes[plan.arch.block_prefix(i) + rel][:2])
            for i, blk in enumerate(plan.targets) for rel in blk]  # fmt: skip


def plan_packed(reader: SourceModel, plan: Plan, config: BlockwiseConfig, method_name: str) -> list:
    from llmq.formats import get_format
    from llmq.formats.writer import plan_checkpoint

    passthrough, planned = plan_checkpoint(get_format(config.format), list(reader.infos()),
                                           _layer_specs(plan), _scheme(config, method_name))  # fmt: skip
    return [*passthrough, *planned]


def _write_packed(out: Path, reader: SourceModel, plan: Plan, resume: ResumeDir, config: BlockwiseConfig,
                  method_name: str, force: bool) -> list:  # fmt: skip
    from llmq.formats import get_format
    from llmq.formats.writer import write_checkpoint

    def produce():
        for i, blk in enumerate(plan.targets):
            if not blk:
                continue
            tensors = resume.load_block(i)
            for rel in blk:
                yield plan.arch.block_prefix(i) + rel, record_from_tensors(tensors, rel, config)

    fmt = get_format(config.format)
    limit = parse_size(config.max_shard_size) if config.max_shard_size else None
    res = write_checkpoint(out, fmt, _QuantizedView(reader, plan, resume), _layer_specs(plan), produce(),
                           _scheme(config, method_name), force=force, max_shard_bytes=limit,
                           card={"calibration": config.calibration})  # fmt: skip
    return list(res.tensors)
