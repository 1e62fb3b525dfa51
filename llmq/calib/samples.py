"""Tokenized calibration samples: ``nsamples`` windows of ``seqlen`` tokens, the same for the same seed.

Documents are visited in a seeded shuffled order and tokenized one at a time until the token stream holds enough
text for distinct windows (so a 400 MB corpus is not tokenized whole); the window starts are drawn from a seeded
``torch.Generator``. No special tokens are added: GPTQ/AWQ calibrate on plain text windows.
"""

from __future__ import annotations

import random

from llmq.calib.sources import load_documents
from llmq.errors import BadInput, CalibrationError

# tokenize until the stream holds this many times the tokens the windows need, so windows rarely overlap
_OVERSAMPLE = 4


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens, for HF tokenizers, ``tokenizers.Tokenizer`` or callables."""
    if hasattr(tokenizer, "encode"):
        try:
            ids = tokenizer.encode(text, add_special_tokens=False)
        except TypeError:  # tokenizers.Tokenizer / llama-style encoders without that keyword
            ids = tokenizer.encode(text)
        return list(getattr(ids, "ids", ids))
    if callable(tokenizer):
        return list(tokenizer(text))
    raise BadInput(f"cannot tokenize with {type(tokenizer).__name__}: it has no encode()")


def token_stream(tokenizer, documents: list[str], needed: int, seed: int) -> list[int]:
    """Tokens of documents in a seeded order until ``needed`` tokens are there (or the corpus ends)."""
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    stream: list[int] = []
    for i in order:
        ids = encode(tokenizer, documents[i])
        if not ids:
            continue
        stream.extend(ids)
        if len(stream) >= needed:
            break
    return stream


def sample_windows(stream: list[int], nsamples: int, seqlen: int, seed: int):
    """``nsamples`` windows of ``seqlen`` tokens at seeded random starts in ``stream``."""
    import torch

    if len(stream) < seqlen:
        raise CalibrationError(
            f"calibration text has {len(stream)} tokens, fewer than one window of --seqlen {seqlen}"
        )
    data = torch.tensor(stream, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([data[s : s + seqlen] for s in starts.tolist()])


def calibration_samples(tokenizer, spec: str, nsamples: int = 128, seqlen: int = 512, seed: int = 0,
                        split: str | None = None):  # fmt: skip
    """``torch.LongTensor [nsamples, seqlen]`` drawn from the source ``spec`` (see llmq.calib.sources)."""
    if nsamples < 1 or seqlen < 1:
        raise BadInput(f"--nsamples and --seqlen must be positive (got {nsamples}, {seqlen})")
    docs = load_documents(spec, split)
    stream = token_stream(tokenizer, docs, _OVERSAMPLE * nsamples * seqlen, seed)
    if not stream:
        raise CalibrationError(f"calibration source {spec} tokenizes to no tokens")
    return sample_windows(stream, nsamples, seqlen, seed)
