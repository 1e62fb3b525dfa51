"""llama.cpp importance matrices: read/write the legacy ``.dat`` and the GGUF imatrix formats, and compute one.

An imatrix holds, for each weight matrix (GGUF name such as ``blk.3.ffn_down.weight``), the per-input-column sum
of squared activations that went into it (``in_sum2``) and how many tokens were summed (``counts``, one per
expert). llama-quantize passes ``in_sum2 / counts`` to the quantizer as the importance of each column; that is
what :meth:`Imatrix.weights` returns, normalized exactly as tools/quantize/quantize.cpp does.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmq.errors import BadInput, CalibrationError, CorruptFile

_MAX_ENTRIES = 1 << 20
_MAX_NAME = 1 << 16
_MAX_VALUES = 1 << 31


@dataclass
class Imatrix:
    """sums[name]: float32 (n_mat, n_cols); counts[name]: tokens summed per matrix (n_mat,)."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    is_legacy: bool = False

    def weights(self) -> dict[str, np.ndarray]:
        """The per-column importance llama-quantize hands to the quantizer (flat float32, n_mat * n_cols)."""
        out = {}
        for name, s in self.sums.items():
            c = np.asarray(self.counts[name], dtype=np.float64).reshape(-1)
            s2 = np.asarray(s, dtype=np.float32).reshape(len(c), -1)
            if self.is_legacy:
                # legacy files store mean * ncall; quantize.cpp divides by ncall (or keeps them when 0)
                ncall = np.float32(c[0]) if len(c) else np.float32(0)
                e = s2 / ncall if ncall > 0 else s2.copy()
            else:
                cnt = c.astype(np.float32)[:, None]
                e = np.where(cnt > 0, s2 / np.where(cnt > 0, cnt, np.float32(1)), np.float32(1))
            out[name] = np.ascontiguousarray(e, dtype=np.float32).reshape(-1)
        return out

    def __len__(self) -> int:
        return len(self.sums)


def load_imatrix(path: str | os.PathLike) -> Imatrix:
    """Read a GGUF imatrix (``*.in_sum2`` / ``*.counts`` tensors) or a legacy ``.dat`` file."""
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"imatrix file {p} does not exist")
    with open(p, "rb") as f:
        magic = f.read(4)
    return _load_gguf(p) if magic == b"GGUF" else _load_legacy(p)


def _load_gguf(p: Path) -> Imatrix:
    import gguf

    try:
        r = gguf.GGUFReader(str(p))
    except Exception as e:  # gguf-py raises plain ValueError/struct errors on bad files
        raise CorruptFile(f"{p} is not a readable GGUF imatrix: {e}") from None
    im = Imatrix()
    fields = r.fields
    if "imatrix.datasets" in fields:
        fl = fields["imatrix.datasets"]
        im.datasets = [bytes(fl.parts[i]).decode("utf-8", "replace") for i in fl.data]
    for key, attr in (("imatrix.chunk_count", "chunk_count"), ("imatrix.chunk_size", "chunk_size")):
        if key in fields:
            setattr(im, attr, int(fields[key].parts[fields[key].data[0]][0]))
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for t in r.tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise CorruptFile(f"{p}: imatrix tensor {t.name} must be F32")
        for suffix in (".in_sum2", ".counts"):
            if t.name.endswith(suffix):
                shape = tuple(int(d) for d in reversed(t.shape.tolist()))
                pairs.setdefault(t.name[: -len(suffix)], {})[suffix] = np.asarray(t.data, np.float32).reshape(
                    shape
                )
    if not pairs:
        raise CorruptFile(f"{p}: no imatrix entries")
    for name, d in pairs.items():
        if len(d) != 2:
            raise CorruptFile(f"{p}: mismatched sums and counts for {name}")
        counts = np.rint(d[".counts"].reshape(-1)).astype(np.int64)
        sums = d[".in_sum2"].reshape(len(counts), -1)
        im.sums[name], im.counts[name] = sums, counts
    return im


def _load_legacy(p: Path) -> Imatrix:
    data = p.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise CorruptFile(f"{p}: truncated imatrix file")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    (n_entries,) = take("<i")
    if not 0 < n_entries <= _MAX_ENTRIES:
        raise CorruptFile(f"{p}: not an imatrix file (bad entry count {n_entries})")
    im = Imatrix(is_legacy=True)
    for _ in range(n_entries):
        (ln,) = take("<i")
        if not 0 < ln <= _MAX_NAME:
            raise CorruptFile(f"{p}: bad name length {ln}")
        name = data[pos : pos + ln].decode("utf-8", "replace")
        pos += ln
        ncall, nval = take("<ii")
        if not 0 < nval <= _MAX_VALUES or pos + 4 * nval > len(data):
            raise CorruptFile(f"{p}: bad value count {nval} for {name}")
        im.sums[name] = np.frombuffer(data, "<f4", nval, pos).astype(np.float32).reshape(1, -1)
        im.counts[name] = np.array([ncall], dtype=np.int64)
        pos += 4 * nval
    if pos + 4 <= len(data):
        (im.chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (ln,) = take("<i")
            if 0 < ln <= len(data) - pos:
                im.datasets.append(data[pos : pos + ln].decode("utf-8", "replace"))
    return im


def save_imatrix(im: Imatrix, path: str | os.PathLike, *, legacy: bool | None = None) -> Path:
    """Write ``im`` as llama-imatrix does: GGUF by default, the legacy format for a ``.dat`` name or legacy=True."""
    from llmq.io.base import AtomicOutput

    p = Path(path)
    if legacy is None:
        legacy = p.suffix == ".dat"
    with AtomicOutput(p, is_dir=False, force=True) as tmp:
        if legacy:
            _save_legacy(im, tmp)
        else:
            _save_gguf(im, tmp)
    return p


def _save_gguf(im: Imatrix, tmp: Path) -> None:
    import gguf

    w = gguf.GGUFWriter(str(tmp), arch="", endianess=gguf.GGUFEndian.LITTLE)
    # an imatrix GGUF carries no architecture key
    w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", list(im.datasets) or [""])
    w.add_uint32("imatrix.chunk_count", int(im.chunk_count))
    w.add_uint32("imatrix.chunk_size", int(im.chunk_size))
    for name in sorted(im.sums):
        counts = np.asarray(im.counts[name], dtype=np.float32).reshape(-1)
        sums = np.asarray(im.sums[name], dtype=np.float32).reshape(len(counts), -1)
        w.add_tensor(name + ".in_sum2", np.ascontiguousarray(sums))
        w.add_tensor(name + ".counts", counts.reshape(len(counts), 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _save_legacy(im: Imatrix, tmp: Path) -> None:
    chunk = max(1, int(im.chunk_size) or 512)
    out = [struct.pack("<i", len(im.sums))]
    for name in sorted(im.sums):
        counts = np.asarray(im.counts[name], dtype=np.int64).reshape(-1)
        sums = np.asarray(im.sums[name], dtype=np.float32).reshape(len(counts), -1)
        ncall = int((counts.max() + chunk - 1) // chunk) if im.chunk_size else int(counts.max())
        cnt = counts.astype(np.float32)[:, None]
        vals = np.where(cnt == 0, np.float32(1), sums / np.where(cnt == 0, np.float32(1), cnt)) * np.float32(
            ncall
        )
        nb = name.encode()
        out += [
            struct.pack("<i", len(nb)),
            nb,
            struct.pack("<ii", ncall, vals.size),
            vals.astype("<f4").tobytes(),
        ]
    ds = (im.datasets[-1] if im.datasets else "").encode()
    out += [struct.pack("<i", int(im.chunk_count)), struct.pack("<i", len(ds)), ds]
    tmp.write_bytes(b"".join(out))


# ------------------------------------------------------------------------------------------------ computing one


def gguf_name(hf_module: str, family: Any = None) -> str | None:
    """GGUF weight name of an HF Linear module, by its family in the architecture registry (llama by default);
    None for modules llama.cpp has no matrix for."""
    from llmq.archs import FAMILIES
    from llmq.errors import UnsupportedArchitecture

    fam = family or FAMILIES["llama"]
    try:
        name = fam.hf_to_gguf_name(hf_module + ".weight")
    except UnsupportedArchitecture:
        return None
    return None if name in (None, "token_embd.weight") else name


def compute_imatrix(
    model,
    token_chunks: Iterable[Mapping[str, object]] | Iterable[object],
    *,
    process_output: bool = False,
    dataset: str = "",
    chunk_size: int = 0,
) -> Imatrix:
    """Accumulate per-column sums of squared inputs of every Linear of a llama-family torch model (llama-imatrix).

    ``token_chunks`` yields input_ids tensors of shape (1, seqlen). Like llama-imatrix, the output projection is
    skipped unless ``process_output``.
    """
    import torch

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def make_hook(name: str):
        def hook(_mod, inputs, _out):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float32)
            acc = sums.get(name)
            sq = (x * x).sum(dim=0, dtype=torch.float64)
            sums[name] = sq if acc is None else acc + sq
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    from llmq.archs import lookup

    config = getattr(model, "config", None)
    family = lookup(config.to_dict()) if hasattr(config, "to_dict") else None
    for mod_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            gname = gguf_name(mod_name, family)
            if gname is None or (gname == "output.weight" and not process_output):
                continue
            hooks.append(mod.register_forward_hook(make_hook(gname)))
    if not hooks:
        raise CalibrationError("the model has no Linear layers with GGUF names to collect an imatrix for")
    n_chunks = 0
    try:
        with torch.inference_mode():
            for ids in token_chunks:
                model(input_ids=ids)
                n_chunks += 1
    finally:
        for h in hooks:
            h.remove()
    if n_chunks == 0:
        raise CalibrationError("no calibration chunks to compute an imatrix from")
    im = Imatrix(datasets=[dataset] if dataset else [], chunk_count=n_chunks, chunk_size=chunk_size)
    for name, s in sums.items():
        im.sums[name] = s.to(torch.float32).numpy().reshape(1, -1)
        im.counts[name] = np.array([counts[name]], dtype=np.int64)
    return im


# the names --calibration took before it went through llmq.calib: source name, split
_OLD_NAMES = {"pydoc": ("pydocs", None), "wikitext": ("wikitext2", "test")}


def check_calibration(spec: str) -> None:
    """Fail now (BadInput) on a --calibration that names no llmq.calib source and no file: before any work."""
    from llmq.calib import resolve_source

    resolve_source(_OLD_NAMES.get(spec, (spec, None))[0])


def calibration_text(spec: str) -> tuple[str, str]:
    """(text, dataset name) for --calibration: any llmq.calib source (pydocs, wikitext2, c4, pile-val, ptb, a
    file...), its calibration split as one text, as llama-imatrix reads its text file."""
    from llmq.calib import resolve_source

    name, split = _OLD_NAMES.get(spec, (spec, None))
    src = resolve_source(name)
    text = src.text(split or src.calibration_split)
    if not text.strip():
        raise CalibrationError(f"calibration source {spec} has no text")
    return text, src.name


def imatrix_from_calibration(model_src: Path, calibration: str, *, nsamples: int = 64, seqlen: int = 512,
                             seed: int = 0) -> Imatrix:  # fmt: skip
    """Run the model (HF directory, or a GGUF through transformers) over calibration text and collect an imatrix.

    The text is tokenized once and cut into ``nsamples`` consecutive chunks of ``seqlen`` tokens, each starting
    with BOS like llama-imatrix's chunks.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text, name = calibration_text(calibration)
    src = Path(model_src)
    kw: dict[str, Any] = {} if src.is_dir() else {"gguf_file": src.name}
    base = src if src.is_dir() else src.parent
    try:
        tok = AutoTokenizer.from_pretrained(base, **kw)
        model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32, **kw)
    except Exception as e:  # transformers raises many kinds (OSError, ValueError, KeyError...)
        raise CalibrationError(f"cannot load {src} with transformers to compute an imatrix: {e}") from None
    model.eval()
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    step = seqlen - 1
    n = min(nsamples, len(ids) // step)
    if n < 1:
        raise CalibrationError(f"calibration text has {len(ids)} tokens, fewer than one chunk of {seqlen}")
    bos = tok.bos_token_id if tok.bos_token_id is not None else int(ids[0])
    g = torch.Generator().manual_seed(seed)
    starts = sorted(torch.randperm(len(ids) // step, generator=g)[:n].tolist()) if seed else range(n)
    chunks = (torch.cat([torch.tensor([bos]), ids[s * step : (s + 1) * step]])[None, :] for s in starts)
    return compute_imatrix(model, chunks, dataset=name, chunk_size=seqlen)
