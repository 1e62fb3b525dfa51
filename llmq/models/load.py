"""Loading any checkpoint llmq writes for forward passes (perplexity, GPTQ/AWQ calibration), CPU or CUDA.

``load_causal_lm(path)`` builds the transformers architecture from config.json and fills it from the checkpoint
through llmq's own readers: full-precision tensors as they are, and each quantized Linear (gptq, awq,
compressed-tensors, bnb - detected from ``quantization_config``) as a :class:`QuantLinear` that keeps the packed
codes and dequantizes in its forward, or, with ``unpack_once=True`` (the default), dequantizes once at load into
a plain weight - fastest on CPU. No bitsandbytes, compressed-tensors or GPU kernels are needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmq.errors import BackendError, BadInput, CorruptFile

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class QuantLinear(nn.Module):
    """A Linear whose weight is a quantized record (QuantizedLinear or Blockwise4bit), dequantized on use."""

    def __init__(self, q: Any, bias: torch.Tensor | None, dtype: torch.dtype, unpack_once: bool):
        super().__init__()
        self.q = q
        self.compute_dtype = dtype
        out_f, in_f = _shape(q)
        self.in_features, self.out_features = in_f, out_f
        self.bias = nn.Parameter(bias.to(dtype), requires_grad=False) if bias is not None else None
        self.weight: torch.Tensor | None = None
        if unpack_once:
            self.weight = nn.Parameter(q.dequantize(dtype), requires_grad=False)
            self.q = None  # the packed record is no longer needed

    def dequantized_weight(self) -> torch.Tensor:
        if self.weight is not None:
            return self.weight
        return self.q.dequantize(self.compute_dtype)

    def _apply(self, fn, recurse=True):
        # keep the packed record on the module's device when .to()/.cuda() moves it
        super()._apply(fn, recurse)
        if self.q is not None:
            probe = fn(torch.zeros(1))
            self.q = _move(self.q, probe.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight()
        return nn.functional.linear(x.to(w.dtype), w, self.bias)

    def extra_repr(self) -> str:
        kind = type(self.q).__name__ if self.q is not None else "unpacked"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}"


def _shape(q: Any) -> tuple[int, int]:
    if hasattr(q, "qweight"):
        return q.out_features, q.in_features
    return int(q.shape[0]), int(q.shape[1])


def _move(q: Any, device: torch.device) -> Any:
    from dataclasses import fields, replace

    changes = {
        f.name: getattr(q, f.name).to(device)
        for f in fields(q)
        if isinstance(getattr(q, f.name), torch.Tensor)
    }
    return replace(q, **changes) if changes else q


def _model_dir(path: Path) -> Path:
    if not path.exists():
        raise BadInput(f"{path} does not exist")
    d = path if path.is_dir() else path.parent
    if not (d / "config.json").is_file():
        raise BadInput(f"{d} has no config.json (not an HF model directory)")
    return d


def _default_dtype(config: dict, device: str, dtype: torch.dtype | str | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise BadInput(f"dtype must be one of {', '.join(_DTYPES)}, not {dtype}")
        return _DTYPES[dtype]
    if torch.device(device).type == "cpu":
        return torch.float32  # CPU matmuls in half precision are slow and less exact
    return _DTYPES.get(str(config.get("dtype") or config.get("torch_dtype") or "float16"), torch.float16)


def load_causal_lm(path: str | Path, device: str = "cpu", dtype: torch.dtype | str | None = None,
                   unpack_once: bool = True) -> nn.Module:  # fmt: skip
    """A torch module whose ``forward(input_ids)`` returns an object with ``.logits`` ``[batch, seq, vocab]``.

    ``path``: an HF directory llmq wrote or any safetensors HF checkpoint (quantized as gptq, awq,
    compressed-tensors pack-quantized or bnb 4-bit, or not at all), or a ``.gguf`` file (dequantized by
    transformers). ``dtype`` defaults to float32 on CPU and the checkpoint's dtype on GPU.
    """
    path = Path(path)
    if path.suffix == ".gguf":
        return _load_gguf(path, device, dtype)
    from llmq.io import open_checkpoint

    mdir = _model_dir(path)
    config = json.loads((mdir / "config.json").read_text())
    torch_dtype = _default_dtype(config, device, dtype)
    # the weights' headers first: a directory without usable weights fails here, before a model of the
    # config's size is allocated
    reader = open_checkpoint(mdir)
    model = _skeleton(mdir, config, torch_dtype)
    _fill(model, reader, config, torch_dtype, unpack_once)
    return model.to(device).eval()


def _skeleton(mdir: Path, config: dict, dtype: torch.dtype) -> nn.Module:
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:  # pragma: no cover
        raise BadInput(f"transformers is needed to build the model ({e})") from None
    clean = {k: v for k, v in config.items() if k != "quantization_config"}
    try:
        cfg = AutoConfig.for_model(**clean) if "model_type" in clean else None
    except (ValueError, KeyError) as e:
        raise BackendError(
            f"transformers does not know model_type {clean.get('model_type')!r} ({e})"
        ) from None
    if cfg is None:
        raise CorruptFile(f"{mdir}/config.json has no model_type")
    with torch.device("cpu"):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def _quantized_layers(reader_names: list[str], fmt) -> list[str]:
    suffix = "." + fmt.marker
    return sorted({n[: -len(suffix)] for n in reader_names if n.endswith(suffix)})


def _fill(model: nn.Module, reader, config: dict, dtype: torch.dtype, unpack_once: bool) -> None:
    from llmq.formats import detect_format, get_format

    qcfg = config.get("quantization_config")
    fmt_name = detect_format(qcfg)
    try:
        names = list(reader.names()) if hasattr(reader, "names") else [i.name for i in reader.infos()]
        consumed: set[str] = set()
        layers: list[str] = []
        if fmt_name is not None:
            fmt = get_format(fmt_name)
            layers = _quantized_layers(names, fmt)
            for layer in layers:
                _replace_linear(model, layer, fmt, reader, qcfg, dtype, unpack_once, consumed, names)
        rest = {n: reader.read(n) for n in names if n not in consumed}
        missing, unexpected = _load_rest(model, rest, set(layers))
    finally:
        reader.close()
    if unexpected:
        raise CorruptFile(f"tensors the model has no place for: {', '.join(unexpected[:5])}")
    if missing:
        raise CorruptFile(f"the checkpoint lacks: {', '.join(missing[:5])}")


def _replace_linear(model, layer, fmt, reader, qcfg, dtype, unpack_once, consumed, names) -> None:
    def get(name: str) -> torch.Tensor:
        consumed.add(name)
        return reader.read(name)

    try:
        parent_name, _, attr = layer.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
    except AttributeError:
        raise CorruptFile(f"quantized layer {layer} is not a module of this architecture") from None
    q = fmt.unpack(layer, get, qcfg)
    for n in names:  # the format's other per-layer tensors (g_idx of symmetric ct, ...) are its business
        if n.startswith(layer + ".") and n != f"{layer}.bias" and n not in consumed:
            if n.rsplit(".", 1)[-1] in fmt.suffixes or n.startswith(f"{layer}.weight."):
                consumed.add(n)
    bias = None
    if f"{layer}.bias" in names:
        bias = get(f"{layer}.bias")
    elif getattr(old, "bias", None) is not None:
        raise CorruptFile(f"{layer}.bias is missing")
    setattr(parent, attr, QuantLinear(q, bias, dtype, unpack_once))


def _load_rest(model: nn.Module, tensors: dict[str, torch.Tensor], quantized: set[str]) -> tuple[list, list]:
    """Copy the full-precision tensors in; return (missing, unexpected) names."""
    own = model.state_dict()
    unexpected = [n for n in tensors if n not in own]
    with torch.no_grad():
        for n, t in tensors.items():
            if n in own:
                if tuple(own[n].shape) != tuple(t.shape):
                    raise CorruptFile(
                        f"{n}: checkpoint shape {tuple(t.shape)} vs model {tuple(own[n].shape)}"
                    )
                own[n].copy_(t.to(own[n].dtype))
    tied: set[str] = set()
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
        tied = {"lm_head.weight"}
    missing = [
        n for n in own
        if n not in tensors and n not in tied and n.rsplit(".", 1)[0] not in quantized
    ]  # fmt: skip
    return missing, unexpected


def _load_gguf(path: Path, device: str, dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    td = _default_dtype({}, device, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=td)
    except Exception as e:  # transformers raises many types for architectures/types it cannot dequantize
        raise BackendError(f"transformers cannot load {path.name}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval()
