"""The layerwise pipeline: data-free methods (RTN, NF4/FP4) that quantize each Linear weight on its own.

Select the Linear weights from the header, read and quantize one at a time, and stream the results through the
format writer (:func:`llmq.formats.writer.write_checkpoint`), so peak memory is one layer. A new data-free method
subclasses :class:`LayerwiseQuantizer` and gives ``_prepare`` and ``_quantize_layer``.
"""

from __future__ import annotations

from pathlib import Path

from llmq.formats.writer import plan_checkpoint, write_checkpoint
from llmq.quant.base import Progress, QuantizeResult, no_progress


class LayerwiseQuantizer:
    """The shape of the data-free quantizers (RTN, NF4): select Linear weights, map each through one function,
    lay the result out in a format. Subclasses give ``_prepare`` (format, scheme, layers), ``_quantize_layer``
    and the method name their result reports."""

    def _prepare(self, reader, config):  # pragma: no cover - each quantizer defines it
        raise NotImplementedError

    def _quantize_layer(self, W, config, fmt):  # pragma: no cover - each quantizer defines it
        raise NotImplementedError

    def _method_name(self, config) -> str:
        return self.name  # type: ignore[attr-defined]

    def plan(self, src: Path, config):
        from llmq.io import open_checkpoint

        with open_checkpoint(src) as reader:
            fmt, scheme, layers = self._prepare(reader, config)
            passthrough, planned = plan_checkpoint(fmt, list(reader.infos()), layers, scheme)
            return [*passthrough, *planned]

    def run(self, src: Path, out: Path, config, *, force: bool = False, progress: Progress = no_progress):
        import time

        import torch

        from llmq.io import open_checkpoint
        from llmq.io.base import parse_size

        t0 = time.perf_counter()
        with open_checkpoint(src) as reader:
            fmt, scheme, layers = self._prepare(reader, config)
            device = torch.device(config.device)

            def produce():
                for layer in layers:
                    W = reader.read(layer.name + ".weight").to(device)
                    yield layer.name, self._quantize_layer(W, config, fmt)

            res = write_checkpoint(out, fmt, reader, layers, produce(), scheme, force=force,
                                   max_shard_bytes=parse_size(config.max_shard_size), progress=progress)  # fmt: skip
            input_bytes = sum(i.nbytes for i in reader.infos())
        return QuantizeResult(output=res.output, method=self._method_name(config), format=fmt.name,
                              config=config.to_dict(), seconds=time.perf_counter() - t0, input_bytes=input_bytes,
                              output_bytes=res.output_bytes, tensors=res.tensors,
                              notes=[f"left unquantized: {', '.join(res.ignored)}"] if res.ignored else [])  # fmt: skip
