"""Resume state of the blockwise pipeline: ``.<out>.llmq-resume/`` holds one safetensors file per finished block
(its unquantized parameters as they are, each quantized Linear as a grid record) and the hidden states after the
last one. ``--resume`` continues from it when the source and the config are unchanged (:func:`fingerprint`).

A quantized Linear ``M`` is stored as ``M.__qweight``, ``M.__scales``, ``M.__zeros`` and ``M.__g_idx``
(:func:`block_tensors`), read back by :func:`record_from_tensors`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from llmq.formats.base import QuantizedLinear

if TYPE_CHECKING:
    import torch

    from llmq.quant.blockwise.config import BlockwiseConfig


def fingerprint(src: Path, config: BlockwiseConfig, method: str) -> str:
    h = hashlib.sha256()
    h.update(method.encode())
    h.update(json.dumps({k: v for k, v in config.to_dict().items() if k not in ("resume", "format",
                                                                                   "max_shard_size")},
                        sort_keys=True).encode())  # fmt: skip
    for p in sorted(src.glob("*.safetensors")) + [src / "config.json"]:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


class ResumeDir:
    """``.<out>.llmq-resume/``: one safetensors file per finished block + the hidden states after the last. The
    one hidden directory llmq keeps after an interruption, on purpose: ``--resume`` continues from it."""

    def __init__(self, out: Path, fingerprint: str, resume: bool):
        from llmq.io.temporaries import resume_dir

        self.path = resume_dir(out)
        self.fingerprint = fingerprint
        self._writer: threading.Thread | None = None  # the background save of the last block (save_block)
        self._error: BaseException | None = None
        state = self.path / "state.json"
        if resume and state.is_file() and json.loads(state.read_text()).get("fingerprint") == fingerprint:
            self.done = int(json.loads(state.read_text()).get("done", 0))
        else:
            if self.path.exists():
                shutil.rmtree(self.path)
            self.path.mkdir(parents=True)
            self.done = 0
            self._write_state()

    def _write_state(self) -> None:
        tmp = self.path / "state.json.tmp"
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "done": self.done}))
        tmp.replace(self.path / "state.json")

    def block_file(self, i: int) -> Path:
        return self.path / f"block_{i:05d}.safetensors"

    def save_block(self, i: int, tensors: dict[str, torch.Tensor], hidden: list[torch.Tensor],
                   floats: list[torch.Tensor] | None = None) -> None:  # fmt: skip
        """Write block i's tensors and the hidden states after it on a background thread (the next block runs
        meanwhile; at 128×512 tokens the states are ~150 MB a block); ``wait()`` joins it. ``done`` moves on
        only once everything of the block is on disk."""
        self.wait()

        def write() -> None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in tensors.items()}, str(self.block_file(i)) + ".tmp")
            Path(str(self.block_file(i)) + ".tmp").replace(self.block_file(i))
            states = {f"hidden.{b}": h.cpu().contiguous() for b, h in enumerate(hidden)}
            states |= {f"float_hidden.{b}": h.cpu().contiguous() for b, h in enumerate(floats or [])}
            save_file(states, str(self.path / "hidden.safetensors.tmp"))
            (self.path / "hidden.safetensors.tmp").replace(self.path / "hidden.safetensors")
            self.done = i + 1
            self._write_state()

        def run() -> None:
            try:
                write()
            except BaseException as e:  # re-raised by wait() on the pipeline's thread
                self._error = e

        self._writer = threading.Thread(target=run, name="llmq-resume-writer")
        self._writer.start()

    def wait(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.join()
        err, self._error = self._error, None
        if err is not None:
            raise err

    def load_hidden(self, key: str = "hidden") -> list[torch.Tensor]:
        from safetensors.torch import load_file

        saved = load_file(str(self.path / "hidden.safetensors"))
        return [saved[f"{key}.{b}"] for b in range(sum(1 for k in saved if k.startswith(key + ".")))]

    def block_header(self, i: int) -> list[tuple[str, str, tuple[int, ...]]]:
        """(key, safetensors dtype, shape) of block i's tensors in ``load_block``'s order, without reading data."""
        from safetensors import safe_open

        with safe_open(str(self.block_file(i)), framework="pt") as f:
            slices = [(k, f.get_slice(k)) for k in f.keys()]
            return [(k, sl.get_dtype(), tuple(sl.get_shape())) for k, sl in slices]

    def load_block(self, i: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.block_file(i)))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def block_tensors(layer, records: dict[str, QuantizedLinear]) -> dict[str, torch.Tensor]:
    """Everything a finished block contributes: unquantized params as is, quantized Linears as grid records."""
    out = {}
    for name, p in layer.named_parameters():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in records:
            r = records[module]
            out[f"{module}.__qweight"] = r.qweight.cpu()
            out[f"{module}.__scales"] = r.scales.cpu()
            out[f"{module}.__zeros"] = r.zeros.cpu()
            out[f"{module}.__g_idx"] = r.group_index().int().cpu()
        else:
            out[name] = p.detach().cpu().clone()
    return out


def record_from_tensors(
    tensors: dict[str, torch.Tensor], module: str, config: BlockwiseConfig
) -> QuantizedLinear:
    """The grid record of ``module`` from a block file's tensors (see :func:`block_tensors`)."""
    return QuantizedLinear(tensors[f"{module}.__qweight"], tensors[f"{module}.__scales"],
                           tensors[f"{module}.__zeros"], config.bits, config.group_size, config.sym,
                           tensors[f"{module}.__g_idx"])  # fmt: skip
