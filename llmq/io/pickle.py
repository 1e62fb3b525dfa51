"""Reading PyTorch pickle checkpoints (``pytorch_model*.bin``, ``*.pt``), only when the user opts in.

Pickle can run arbitrary code when loaded; llmq refuses it unless ``--allow-pickle`` is given, and even then
loads with ``torch.load(weights_only=True)`` (no arbitrary classes) and ``mmap=True`` (tensors stay on disk).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from llmq.errors import BadInput, CorruptFile
from llmq.io.base import TensorInfo, TensorTable, dtype_code
from llmq.io.ggml_types import NUMPY_DTYPES


class PickleReader(TensorTable):
    kind = "safetensors"  # the same HF layout and tensor names; only the container differs

    def __init__(self, path: str | Path):
        import torch

        self.path = Path(path)
        self.config: dict[str, Any] | None = None
        self.metadata: dict[str, str] = {}
        if self.path.is_dir():
            files = sorted(self.path.glob("pytorch_model*.bin")) or sorted(self.path.glob("*.pt"))
            cfg = self.path / "config.json"
            if cfg.exists():
                self.config = json.loads(cfg.read_text())
        else:
            files = [self.path]
        if not files:
            raise BadInput(f"{self.path}: no pickle checkpoint files")
        self._tensors: dict[str, Any] = {}
        for f in files:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises many types for a bad pickle; all mean the same to the user
                raise CorruptFile(
                    f"{f.name}: cannot load as a weights-only PyTorch checkpoint ({e})"
                ) from None
            if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
                sd = sd["state_dict"]
            if not isinstance(sd, dict):
                raise CorruptFile(f"{f.name}: not a state dict")
            for k, v in sd.items():
                if isinstance(v, torch.Tensor):
                    self._tensors[k] = v
        self._infos = {
            k: TensorInfo(k, dtype_code(v.dtype), tuple(v.shape), v.numel() * v.element_size(), str(files[0]))
            for k, v in self._tensors.items()
        }

    def read(self, name: str, dequantize: bool = True):
        self.info(name)
        return self._tensors[name].clone()

    def read_raw(self, name: str) -> np.ndarray:
        import torch

        info = self.info(name)
        t = self._tensors[name].contiguous()
        if info.dtype == "BF16":
            return t.view(torch.int16).numpy().view(np.uint16).copy()
        return t.numpy().astype(np.dtype(NUMPY_DTYPES[info.dtype]), copy=True)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        info = self.info(name)
        raw = self.read_raw(name)
        return (
            raw.reshape(-1, info.shape[-1] if info.shape else 1)[start:stop].copy()
            if len(info.shape) != 1
            else raw
        )

    def read_float(self, name: str) -> np.ndarray:
        import torch

        return self._tensors[name].to(torch.float32).numpy().copy()

    def close(self) -> None:
        self._tensors.clear()
