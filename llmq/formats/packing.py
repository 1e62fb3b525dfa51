"""Bit packing of integer codes into int32 words, the layouts GPTQ, AWQ and compressed-tensors use.

All of them are a dense little-endian bitstream: element ``e`` of a run occupies bits ``e*bits ... e*bits+bits-1``
counted from bit 0 of word 0, so for 2/4/8 bits word ``j`` holds elements ``j*32/bits ...`` LSB first, and 3-, 5-
and 6-bit codes straddle words (GPTQ's 3-bit layout, compressed-tensors' dense packing). AWQ additionally
interleaves the 8 nibbles of a word (``AWQ_ORDER``).
"""

from __future__ import annotations

import torch

from llmq.errors import ShapeError

# AutoAWQ GEMM: nibble k of a word holds output column 8*w + AWQ_ORDER[k]
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# and the inverse: column 8*w + c lives in nibble AWQ_REVERSE_ORDER[c]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)

_MASK32 = 0xFFFFFFFF


def packed_len(n: int, bits: int) -> int:
    """int32 words needed for ``n`` codes of ``bits`` bits (dense)."""
    return (n * bits + 31) // 32


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 whose low 32 bits are the word -> int32 with the same bits (two's complement)."""
    words = words & _MASK32
    return (words - ((words >> 31) << 32)).to(torch.int32)


def _layout(bits: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the 32 codes of a run: their word, their bit offset in it, and whether they spill into the next word."""
    start = torch.arange(32, device=device, dtype=torch.int64) * bits
    return start // 32, start % 32, (start % 32) + bits > 32


def pack_int32(codes: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack unsigned ``codes`` (values in [0, 2**bits)) along ``dim`` into int32 words, dense LSB first.

    The packed dim gets ``packed_len(n, bits)`` words; a partial last run is padded with zero codes.
    """
    if not 1 <= bits <= 8:
        raise ShapeError(f"cannot pack {bits}-bit codes (1..8 supported)")
    x = codes.movedim(dim, -1).to(torch.int64)
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= 2**bits):
        raise ShapeError(f"codes out of range for {bits} bits")
    n = x.shape[-1]
    pad = (-n) % 32
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    lead = x.shape[:-1]
    runs = x.reshape(-1, 32)  # 32 codes fill exactly `bits` words
    word, off, spill = _layout(bits, x.device)
    acc = torch.zeros(runs.shape[0], bits, dtype=torch.int64, device=x.device)
    # fields are disjoint, so adding is OR; bits pushed past 32 are masked off in _to_int32
    acc.scatter_add_(1, word.expand_as(runs), runs << off)
    if bool(spill.any()):
        hi = runs[:, spill] >> (32 - off[spill])
        acc.scatter_add_(1, (word[spill] + 1).expand_as(hi), hi)
    out = _to_int32(acc.reshape(*lead, -1)[..., : packed_len(n, bits)])
    return out.movedim(-1, dim).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, n: int, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: ``n`` codes per run along ``dim``, as int32 in [0, 2**bits)."""
    w = packed.movedim(dim, -1).to(torch.int64) & _MASK32
    if w.shape[-1] != packed_len(n, bits):
        raise ShapeError(f"packed length {w.shape[-1]} does not hold {n} {bits}-bit codes")
    pad_words = (-w.shape[-1]) % bits
    if pad_words:
        w = torch.nn.functional.pad(w, (0, pad_words))
    lead = w.shape[:-1]
    runs = w.reshape(*lead, -1, bits)
    mask = (1 << bits) - 1
    cols = []
    for e in range(32):
        word, off = divmod(e * bits, 32)
        v = runs[..., word] >> off
        if off + bits > 32:
            v = v | (runs[..., word + 1] << (32 - off))
        cols.append(v & mask)
    out = torch.stack(cols, dim=-1).reshape(*lead, -1)[..., :n]
    return out.to(torch.int32).movedim(-1, dim).contiguous()


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """AWQ GEMM: 4-bit codes ``[rows, cols]`` -> int32 ``[rows, cols/8]`` with the interleaved nibble order."""
    rows, cols = codes.shape
    if cols % 8:
        raise ShapeError(f"AWQ packs 8 columns per word; {cols} columns do not divide")
    x = codes.to(torch.int64).reshape(rows, cols // 8, 8)
    acc = torch.zeros(rows, cols // 8, dtype=torch.int64, device=codes.device)
    for k, col in enumerate(AWQ_ORDER):
        acc |= x[..., col] << (4 * k)
    return _to_int32(acc)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_awq`: int32 ``[rows, cols/8]`` -> codes ``[rows, cols]`` (int32)."""
    w = packed.to(torch.int64) & _MASK32
    rows, words = w.shape
    nibbles = torch.stack([(w >> (4 * k)) & 0xF for k in range(8)], dim=-1)  # [rows, words, nibble]
    cols = nibbles[..., list(AWQ_REVERSE_ORDER)]
    return cols.reshape(rows, words * 8).to(torch.int32)


def pack_nibbles_high_first(codes: torch.Tensor) -> torch.Tensor:
    """bitsandbytes 4-bit: flat codes -> uint8 ``[(n+1)//2, 1]``, the first code of a pair in the high nibble."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.reshape(-1, 2)
    return ((pairs[:, 0] << 4) | pairs[:, 1]).reshape(-1, 1)


def unpack_nibbles_high_first(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles_high_first`: ``n`` codes (uint8)."""
    b = packed.reshape(-1)
    out = torch.stack([b >> 4, b & 0xF], dim=-1).reshape(-1)
    return out[:n]
