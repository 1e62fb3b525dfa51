"""Forward-pass backends for the evaluator: torch (HF checkpoints) and llama.cpp (GGUF via llama-cpp-python).

A backend tokenizes text the way its runtime does and returns the logits of selected positions of a batch of
equal-length token windows. Protocols (which windows, which positions) live in ``llmq.eval.perplexity``.
"""

from __future__ import annotations

import ctypes
import hashlib
import inspect
import json
import logging
import struct
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from llmq.errors import BackendError, BadInput, MissingDependency, require

GGUF_MAGIC = b"GGUF"


def resolve_model(spec: str) -> Path:
    """A model argument as a local path: a path, a Hub id, or 'smollm2' (llmq.io.hub)."""
    from llmq.io.hub import resolve_model as hub_resolve

    return Path(hub_resolve(spec))


def is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def choose_backend(path: Path, backend: str | None) -> str:
    if backend not in (None, "auto", "torch", "llamacpp"):
        raise BadInput(f"unknown backend {backend!r} (choose torch or llamacpp)")
    gguf = is_gguf(path)
    if backend in (None, "auto"):
        if gguf:
            return "llamacpp"
        if path.is_dir() and (path / "config.json").is_file():
            return "torch"
        raise BadInput(f"{path} is neither a GGUF file nor a Hugging Face checkpoint directory")
    if backend == "llamacpp" and not gguf:
        raise BadInput(f"the llama.cpp backend needs a GGUF file; {path} is not one (see `llmq convert`)")
    if backend == "torch" and not (path.is_dir() and (path / "config.json").is_file()):
        raise BadInput(f"the torch backend needs a Hugging Face checkpoint directory; {path} is not one")
    return backend


def _fingerprint(pieces) -> str:
    h = hashlib.sha256()
    for piece in pieces:
        h.update(piece if isinstance(piece, bytes) else str(piece).encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def _safetensors_header_bytes(path: Path) -> int:
    """Bytes of tensor data in one safetensors file, from its header alone."""
    with open(path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        if hlen > 100 << 20:
            raise BadInput(f"{path}: implausible safetensors header length")
        header = json.loads(f.read(hlen))
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


class Backend(ABC):
    """One loaded model."""

    name: str
    path: Path
    n_vocab: int  # width of the logits
    add_bos: bool  # the vocabulary asks for a BOS token in front of a text
    bos_id: int | None
    default_batch: int  # windows per forward pass when the user sets none

    @abstractmethod
    def tokenize(self, text: str) -> np.ndarray:
        """Token ids (int32) of ``text``, with BOS when the vocabulary adds one, no special-token parsing."""

    @abstractmethod
    def vocab_pieces(self) -> list:
        """The vocabulary's token strings in id order (for the vocabulary fingerprint)."""

    @abstractmethod
    def logits(self, windows: np.ndarray, start: int, stop: int):
        """Logits at positions ``start..stop-1`` of every window, as a torch tensor [B*(stop-start), n_vocab]
        (row-major over windows). ``windows`` is int32 [B, L]; the windows are independent sequences."""

    def vocab_fingerprint(self) -> str:
        return _fingerprint(self.vocab_pieces())

    @abstractmethod
    def size_bytes(self) -> int:
        """Bytes of tensor data on disk."""

    @abstractmethod
    def n_params(self) -> int:
        """Number of weights of the unquantized model."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


# ---------------------------------------------------------------------------------------------- torch


def _count_logical_params(model) -> int:
    """Weights as the unquantized model has them: quantized linear modules count in*out (+bias)."""
    import torch

    seen: set[int] = set()
    total = 0
    for module in model.modules():
        custom_linear = (
            hasattr(module, "in_features") and hasattr(module, "out_features")
            and not isinstance(module, torch.nn.Linear)
        )  # fmt: skip
        if custom_linear:
            total += int(module.in_features) * int(module.out_features)
            bias = getattr(module, "bias", None)
            total += int(bias.numel()) if isinstance(bias, torch.Tensor) else 0
            for t in list(module.parameters()) + list(module.buffers()):
                seen.add(id(t))
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += int(p.numel())
    return total


_TOO_LONG = "Token indices sequence length is longer than the specified maximum"


@contextmanager
def _without_log_record(logger: str, prefix: str) -> Iterator[None]:
    """Drop the records of ``logger`` whose message starts with ``prefix`` (and only those) for a while."""

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(prefix)

    log = logging.getLogger(logger)
    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, path: Path, device: str = "cpu", dtype: str | None = None, threads: int | None = None):
        import torch

        self.path = path
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BadInput("device cuda requested but torch sees no CUDA device")
        if threads:
            torch.set_num_threads(int(threads))
        self.model = self._load(path, device, dtype)
        self._tok = self._load_tokenizer(path)
        self._keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        ids_a = self._tok("a", add_special_tokens=True)["input_ids"]
        bos = self._tok.bos_token_id
        self.bos_id = int(bos) if bos is not None else None
        self.add_bos = bool(ids_a) and bos is not None and ids_a[0] == bos
        self.n_vocab = self._logits_width()
        self.default_batch = 4 if self.device.type == "cpu" else 16

    @staticmethod
    def _load(path: Path, device: str, dtype: str | None):
        import torch

        names = {None: None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        if dtype not in names:
            raise BadInput(f"unknown dtype {dtype!r} (float32, float16 or bfloat16)")
        # On CPU, half-precision matmuls are slow and lose accuracy; evaluate in float32 unless asked.
        tdtype = names[dtype] or (torch.float32 if device == "cpu" else None)
        from llmq.models.load import load_causal_lm

        try:
            model = load_causal_lm(str(path), device=device, dtype=tdtype)
        except (BadInput, MissingDependency, BackendError):
            raise
        except Exception as e:  # transformers raises many types for an unloadable checkpoint
            raise BackendError(f"could not load {path} with transformers: {type(e).__name__}: {e}") from e
        model.eval()
        return model

    @staticmethod
    def _load_tokenizer(path: Path):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(path))
        except Exception as e:
            raise BadInput(f"{path} has no usable tokenizer ({type(e).__name__}: {e})") from e

    def _logits_width(self) -> int:
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if head is not None and hasattr(head, "out_features"):
            return int(head.out_features)
        return int(self.model.config.vocab_size)

    def tokenize(self, text: str) -> np.ndarray:
        # The whole text is tokenized at once on purpose (the protocols cut it into windows afterwards), so
        # transformers' warning that it is longer than the model's maximum is noise to the user.
        with _without_log_record("transformers.tokenization_utils_base", _TOO_LONG):
            ids = self._tok(text, add_special_tokens=True)["input_ids"]
        return np.asarray(ids, dtype=np.int32)

    def vocab_pieces(self) -> list:
        n = len(self._tok)
        return self._tok.convert_ids_to_tokens(list(range(n)))

    def logits(self, windows: np.ndarray, start: int, stop: int):
        import torch

        ids = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.int64)).to(self.device)
        with torch.inference_mode():
            if self._keep:
                # Only the scored positions go through lm_head (the largest matmul of a small model).
                keep = torch.arange(start, stop, device=self.device)
                out = self.model(input_ids=ids, use_cache=False, logits_to_keep=keep)
                logits = out.logits if hasattr(out, "logits") else out
            else:
                out = self.model(ids)
                logits = (out.logits if hasattr(out, "logits") else out)[:, start:stop]
        return logits.reshape(-1, logits.shape[-1])

    def size_bytes(self) -> int:
        files = sorted(self.path.glob("*.safetensors"))
        if files:
            return sum(_safetensors_header_bytes(f) for f in files)
        return sum(f.stat().st_size for f in self.path.glob("*.bin"))

    def n_params(self) -> int:
        return _count_logical_params(self.model)


# ---------------------------------------------------------------------------------------------- llama.cpp


_LOG_CALLBACK = None  # keeps the ctypes callback alive for as long as llama.cpp may call it


def _quiet_llama(llama_cpp) -> None:
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = llama_cpp.llama_log_callback(lambda level, text, user: None)
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


def default_threads() -> int:
    """The thread count llama.cpp's tools use by default: the CPUs this process may run on."""
    from llmq.io.base import available_cpus

    return available_cpus()


class LlamaCppBackend(Backend):
    """GGUF through llama-cpp-python's C API: the same decode calls llama-perplexity makes."""

    name = "llamacpp"

    def __init__(self, path: Path, ctx: int, n_seq: int, device: str = "cpu", threads: int | None = None):
        llama_cpp = require("llama_cpp", "llamacpp")
        self._L = llama_cpp
        self.path = path
        _quiet_llama(llama_cpp)
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0 if device == "cpu" else 999
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self._model:
            raise BackendError(f"llama.cpp could not load {path}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        bos = int(llama_cpp.llama_vocab_bos(self._vocab))
        self.bos_id = bos if bos >= 0 else None
        self.default_batch = n_seq
        self.ctx_len = ctx
        self.n_seq = n_seq
        threads = threads or default_threads()
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = ctx * n_seq
        cparams.n_batch = ctx * n_seq
        cparams.n_ubatch = min(512, ctx * n_seq)
        cparams.n_seq_max = n_seq
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self.close()
            raise BackendError(f"llama.cpp could not create a context of {ctx}x{n_seq} tokens for {path}")
        self._batch = llama_cpp.llama_batch_init(ctx * n_seq, 0, 1)
        self._batch_cap = ctx * n_seq

    def tokenize(self, text: str) -> np.ndarray:
        L = self._L
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(self._vocab, data, len(data), buf, cap, True, False)
        if n < 0:
            raise BackendError(f"llama.cpp tokenization failed ({n})")
        return np.ctypeslib.as_array(buf)[:n].astype(np.int32)

    def vocab_pieces(self) -> list:
        L = self._L
        return [L.llama_vocab_get_text(self._vocab, i) or b"" for i in range(self.n_vocab)]

    def logits(self, windows: np.ndarray, start: int, stop: int):
        import torch

        L = self._L
        n_win, length = windows.shape
        if n_win > self.n_seq or length > self.ctx_len:
            raise BadInput(
                f"{n_win} windows of {length} tokens exceed the context ({self.n_seq}x{self.ctx_len})"
            )
        n = n_win * length
        b = self._batch
        np.ctypeslib.as_array(b.token, shape=(self._batch_cap,))[:n] = windows.reshape(-1)
        pos = np.tile(np.arange(length, dtype=np.int32), n_win)
        np.ctypeslib.as_array(b.pos, shape=(self._batch_cap,))[:n] = pos
        np.ctypeslib.as_array(b.n_seq_id, shape=(self._batch_cap,))[:n] = 1
        want = ((pos >= start) & (pos < stop)).astype(np.int8)
        np.ctypeslib.as_array(b.logits, shape=(self._batch_cap,))[:n] = want
        for i in range(n):
            b.seq_id[i][0] = i // length
        b.n_tokens = n
        L.llama_memory_clear(L.llama_get_memory(self._ctx), True)
        rc = L.llama_decode(self._ctx, b)
        if rc != 0:
            raise BackendError(f"llama.cpp decode failed with code {rc}")
        n_out = int(want.sum())
        ptr = L.llama_get_logits(self._ctx)
        arr = np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab))
        # A view of llama.cpp's output buffer: valid until the next decode, which is after scoring.
        return torch.from_numpy(arr)

    def size_bytes(self) -> int:
        return int(self._L.llama_model_size(self._model))

    def n_params(self) -> int:
        return int(self._L.llama_model_n_params(self._model))

    def close(self) -> None:
        L = self._L
        if getattr(self, "_batch", None) is not None:
            L.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            L.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            L.llama_model_free(self._model)
            self._model = None


def open_backend(spec: str, *, backend: str | None, ctx: int, batch: int | None, device: str,
                 dtype: str | None, threads: int | None) -> Backend:  # fmt: skip
    path = resolve_model(spec)
    kind = choose_backend(path, backend)
    if kind == "llamacpp":
        n_seq = batch or max(1, 2048 // ctx)  # llama-perplexity's default: n_batch 2048 split into sequences
        return LlamaCppBackend(path, ctx, n_seq, device=device, threads=threads)
    return TorchBackend(path, device=device, dtype=dtype, threads=threads)
