"""GGUF block encoders, bit-exact with ggml-quants.c: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

``quantize(x, type_name, imatrix=None)`` takes float32 rows ``(nrows, n_per_row)`` and returns the raw blocks
``(nrows, row_bytes)`` as uint8, exactly the bytes ``ggml_quantize_chunk`` writes: without an importance matrix
the ``quantize_row_*_ref`` paths, with one the ``quantize_row_*_impl`` paths (the imatrix is a per-column weight
of length n_per_row, as llama.cpp passes it). All blocks of a chunk of rows (256K values, so that a search's
temporaries stay in the last-level cache) are processed at once by numpy, element-major (the n values of every
block as n rows) from the transposed input to the quants; bits are packed on uint64 words. ``encode_jobs`` hands
out the chunks as work items for a thread pool (numpy releases the GIL in its loops). The algorithm (scale search)
lives in :mod:`llmq.quant.gguf.search`, the byte layout of each block here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from llmq.errors import ShapeError, UnsupportedType
from llmq.io.ggml_types import block_size, row_nbytes
from llmq.quant.gguf.search import (
    F32,
    GROUP_MAX_EPS,
    clip_,
    first_absmax,
    make_q3_quants,
    make_qkx_quants,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    rint_exact,
    search_qx,
    ssum,
)

QK_K = 256


def _f16(v: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16 (round to nearest even) as little-endian bytes, shape (..., 2)."""
    return np.asarray(v, dtype=F32).astype("<f2").view(np.uint8).reshape(*np.shape(v), 2)


def _put_f16(out: np.ndarray, col: int, v: np.ndarray) -> None:
    """Store _f16(v) at bytes col, col+1 of every block of ``out`` (M, even row bytes): one strided uint16 copy
    instead of a copy of 2-byte rows."""
    out.view("<u2")[:, col // 2] = np.asarray(v, dtype=F32).astype("<f2").view("<u2")


def _f16_back(v: np.ndarray) -> np.ndarray:
    """GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v))."""
    return np.asarray(v, dtype=F32).astype(np.float16).astype(F32)


def _u8(v: np.ndarray) -> np.ndarray:
    """C conversion of an int to uint8_t (wraps)."""
    return (v.astype(np.int64) & 0xFF).astype(np.uint8)


def _c_min_int8(v: np.ndarray, hi: int) -> np.ndarray:
    """``(uint8_t) MIN(hi, (int8_t) v)`` as ggml compiles it on x86: float → int32 truncates toward zero and
    gives INT_MIN for NaN, ±inf and out-of-range values (an infinite 1/d from a denormal block), then the low
    byte. Identical to trunc + min for every in-range value."""
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(v) & (np.abs(v) < F32(2**31))
        i = np.where(ok, v, F32(-(2**31))).astype(np.int64)
    i8 = (i & 0xFF).astype(np.uint8).view(np.int8)
    return np.minimum(i8, np.int8(hi)).view(np.uint8)


def _em(blocks: np.ndarray) -> np.ndarray:
    """(M, n) groups -> element-major (n, M) contiguous."""
    M, n = blocks.shape
    out = np.empty((n, M), dtype=blocks.dtype)
    step = max(64, 8192 // n)  # numpy's strided copy is 2-4x faster when each piece stays in L1 (~32 KB)
    for j in range(0, M, step):
        out[:, j : j + step] = blocks[j : j + step].T
    return out


def _from_em(q: np.ndarray) -> np.ndarray:
    """Element-major (n, M) quants -> (M, n) uint8; one strided column write per element beats a transpose."""
    q8 = q.astype(np.uint8)
    out = np.empty(q.shape[::-1], dtype=np.uint8)
    for i in range(q.shape[0]):
        out[:, i] = q8[i]
    return out


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo.astype(np.uint8) & 0xF) | ((hi.astype(np.uint8) & 0xF) << 4)


def _row_sigma2(x: np.ndarray, factor: float = 1.0) -> np.ndarray:
    """sum(x^2)/n of each row summed in order (the legacy *_impl's sigma2), shape (R, 1)."""
    n = x.shape[1]
    s = ssum(_em(x * x))
    return ((F32(factor) * s) / F32(n))[:, None] if factor != 1.0 else (s / F32(n))[:, None]


# ----------------------------------------------------------------------------------------------- legacy 32-blocks


def _put_em(out: np.ndarray, col: int, P: np.ndarray) -> None:
    """Write element-major bytes P (k, M) as columns col..col+k of the block array ``out`` (M, row bytes)."""
    dst = out[:, col : col + P.shape[0]]
    for i in range(P.shape[0]):
        dst[:, i] = P[i]


def _inv(d: np.ndarray) -> np.ndarray:
    """ggml's ``id = d ? 1.0f/d : 0.0f``."""
    with np.errstate(divide="ignore", over="ignore"):
        return np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0))


def _q8_0(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    X = _em(x.reshape(-1, 32))
    amax = np.abs(np.maximum(X.max(axis=0), -X.min(axis=0)))  # abs: ggml's running max starts at +0.0
    d = amax / F32(127)
    with np.errstate(invalid="ignore"):
        np.multiply(X, _inv(d), out=X)
    # roundf (half away from zero) as trunc(v + copysign(0.5 - 2^-25, v)): exact for |v| < 2^23; the float ->
    # int8 cast in _put_em truncates
    X += np.copysign(F32(0.49999997), X)
    out = np.empty((X.shape[1], 34), dtype=np.uint8)
    _put_f16(out, 0, d)
    with np.errstate(invalid="ignore"):
        _put_em(out.view(np.int8), 2, X)
    return out


def _first_zero_sign(X: np.ndarray, ext: np.ndarray) -> np.ndarray:
    """ggml's min/max loops keep the first of equal values: a zero extreme has the sign of the first zero."""
    z = ext == 0
    if z.any():
        cols = X[:, z]
        ext[z] = cols[np.argmax(cols == 0, axis=0), np.arange(cols.shape[1])]
    return ext


def _qh_bits(q: np.ndarray) -> np.ndarray:
    """The 5th bit of each of the 32 quants of a block as a little-endian uint32, shape (M, 4)."""
    bits = ((q.astype(np.uint32) >> 4) & 1) << np.arange(32, dtype=np.uint32)
    return np.bitwise_or.reduce(bits, axis=1).astype("<u4").view(np.uint8).reshape(-1, 4)


def _legacy_weights(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """qw[j] * sqrt(sigma2 + x[j]^2) with the row's sigma2: the legacy *_impl importance weights, as (M, 32)."""
    sigma2 = _row_sigma2(x)
    return (qw[None, :] * np.sqrt(sigma2 + x * x)).reshape(-1, 32)


def _nonfinite(d: np.ndarray, idv: np.ndarray, lanes: int = 1) -> np.ndarray | None:
    """The blocks whose d or id is not finite (None if none: the common case), each repeated ``lanes`` times."""
    bad = ~(np.isfinite(idv) & np.isfinite(d))
    return np.repeat(bad, lanes) if bad.any() else None


def _code_em(X: np.ndarray, idv: np.ndarray, add: float, hi: int, bad: np.ndarray | None,
             mn: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """``MIN(hi, (int8_t)((x [- min]) * id + add))`` of element-major blocks, as uint8 (32, M); overwrites X.
    Blocks ``bad`` (see _nonfinite: a denormal d, an inf or NaN input) take _c_min_int8's x86 conversion;
    elsewhere |x*id| is small and a plain cast truncates the same way."""
    with np.errstate(invalid="ignore", over="ignore"):
        v = np.subtract(X, mn, out=X) if mn is not None else X  # X is a scratch copy from _em
        np.multiply(v, idv, out=v)
        v += F32(add)
    qbad = _c_min_int8(v[:, bad], hi) if bad is not None else None
    # elsewhere v is in [0, hi + 1.5): MIN(hi, trunc(v)) = trunc(MIN(v, hi + 0.5)), and a float minimum is
    # several times faster than numpy's uint8 minimum with a scalar
    clip_(v, None, hi + 0.5)
    q = v.astype(np.uint8)
    if qbad is not None:
        q[:, bad] = qbad
    return q


def _quads(x: np.ndarray) -> np.ndarray:
    """32-blocks of contiguous rows ``x`` -> (8, 4M) float32, row r holding values 4r..4r+3 of every block:
    the transpose moves 16-byte units (half the cost of a float-wise one), and every block's values still
    sit in its 4 lanes of each row for axis-0 reductions."""
    q = _em(np.ascontiguousarray(x).reshape(-1, 32).view("V16"))
    return q.view(F32).reshape(8, -1)


def _fold4(v: np.ndarray, op: np.ufunc) -> np.ndarray:
    """Combine the 4 lanes of each block of a (4M,) vector: (M,)."""
    out = op(v[0::4], v[1::4])
    op(out, v[2::4], out=out)
    return op(out, v[3::4], out=out)


def _signed_absmax_quads(Y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per 32-block of ``x``, from its quad-lane layout Y (see _quads): the value with the largest |x|, the first
    one on a tie, as ggml's strict ``>`` loop (which starts from +0.0 and never replaces it by a -0.0)."""
    mx, mn = _fold4(Y.max(axis=0), np.maximum), _fold4(Y.min(axis=0), np.minimum)
    vmax = np.where(mx >= -mn, mx, mn)
    tie = (mx == -mn) & (mx != 0)
    if tie.any():  # +a and -a both present: whichever comes first
        rows = x.reshape(-1, 32)[tie]
        vmax[tie] = rows[np.arange(rows.shape[0]), np.argmax(np.abs(rows), axis=1)]
    vmax[vmax == 0] = 0  # ggml starts from +0.0 and never replaces it by a -0.0
    return vmax


def _q4_0(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    if qw is not None:
        b = x.reshape(-1, 32)
        d, L = make_qx_quants(_em(b), 8, _em(_legacy_weights(x, qw)))
        q = L.T
        return np.concatenate([_f16(d), _nibbles(q[:, :16], q[:, 16:])], axis=1)
    Y = _quads(x)
    d = _signed_absmax_quads(Y, x) / F32(-8)
    idv = _inv(d)
    q = _code_em(Y, np.repeat(idv, 4), 8.5, 15, _nonfinite(d, idv, 4))  # (8, 4M): quants 4r..4r+3 in row r
    # qs byte j = quant j | quant j+16 << 4, on uint32 words of 4 quants (< 16: no carry between bytes);
    # word row r then holds bytes 4r..4r+3 of each block
    w = q.view("<u4")
    w[4:] <<= np.uint32(4)
    w[:4] |= w[4:]
    M = Y.shape[1] // 4
    out = np.empty((M, 18), dtype=np.uint8)
    _put_f16(out, 0, d)
    qs = np.ndarray((M, 4), dtype="<u4", buffer=out, offset=2, strides=(18, 4))  # unaligned uint32 columns
    for r in range(4):
        qs[:, r] = w[r]
    return out


def _put_qh(out: np.ndarray, col: int, q: np.ndarray) -> None:
    """The 5th bit of each of the 32 quants (32, M) as ggml's little-endian uint32 qh: bytes col..col+4."""
    h = (q >> 4).reshape(4, 8, -1)
    h <<= np.arange(8, dtype=np.uint8)[None, :, None]
    _put_em(out, col, np.bitwise_or.reduce(h, axis=1))


def _q5_0(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    if qw is not None:
        b = x.reshape(-1, 32)
        d, L = make_qx_quants(_em(b), 16, _em(_legacy_weights(x, qw)))
        q = L.T.astype(np.uint8)
        return np.concatenate([_f16(d), _qh_bits(q), _nibbles(q[:, :16], q[:, 16:])], axis=1)
    Y = _quads(x)
    d = _signed_absmax_quads(Y, x) / F32(-16)
    idv = _inv(d)
    q = _code_em(Y, np.repeat(idv, 4), 16.5, 31, _nonfinite(d, idv, 4))  # (8, 4M): quants 4r..4r+3 in row r
    w = q.view("<u4")  # word r of a block: its quants 4r..4r+3, one a byte
    M = w.shape[1]
    out = np.empty((M, 22), dtype=np.uint8)
    _put_f16(out, 0, d)
    # qh bit j = bit 4 of quant j: the 4 bits of a word (at 8k + 4) gathered to bits k, then word r at bits 4r
    h = (w >> np.uint32(4)) & np.uint32(0x01010101)
    h |= h >> np.uint32(7)
    h |= h >> np.uint32(14)
    h &= np.uint32(0xF)
    qh = h[0].copy()
    for r in range(1, 8):
        qh |= h[r] << np.uint32(4 * r)
    np.ndarray((M,), dtype="<u4", buffer=out, offset=2, strides=(22,))[:] = qh
    w &= np.uint32(0x0F0F0F0F)
    w[4:] <<= np.uint32(4)
    w[:4] |= w[4:]  # qs byte j = low nibbles of quants j and j+16
    qs = np.ndarray((M, 4), dtype="<u4", buffer=out, offset=6, strides=(22, 4))
    for r in range(4):
        qs[:, r] = w[r]
    return out


def _min_max_em(X: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mn, mx = _first_zero_sign(X, X.min(axis=0)), _first_zero_sign(X, X.max(axis=0))
    d = (mx - mn) / F32(levels)
    return d, _inv(d), mn


def _q4_1(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    if qw is not None:
        b = x.reshape(-1, 32)
        d, the_min, L = make_qkx_quants(_em(b), _em(_legacy_weights(x, qw)), 15, -0.9, 0.05, 36, False)
        mn, q = -the_min, L.T
        return np.concatenate([_f16(d), _f16(mn), _nibbles(q[:, :16], q[:, 16:])], axis=1)
    X = _em(x.reshape(-1, 32))
    d, idv, mn = _min_max_em(X, 15)
    q = _code_em(X, idv, 0.5, 15, _nonfinite(d, idv), mn)
    out = np.empty((X.shape[1], 20), dtype=np.uint8)
    _put_f16(out, 0, d)
    _put_f16(out, 2, mn)
    q[16:] <<= 4
    q[:16] |= q[16:]
    _put_em(out, 4, q[:16])
    return out


def _q5_1(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    if qw is not None:
        b = x.reshape(-1, 32)
        d, the_min, L = make_qkx_quants(_em(b), _em(_legacy_weights(x, qw)), 31, -0.9, 0.05, 36, False)
        mn, q = -the_min, L.T.astype(np.uint8)
        return np.concatenate([_f16(d), _f16(mn), _qh_bits(q), _nibbles(q[:, :16], q[:, 16:])], axis=1)
    X = _em(x.reshape(-1, 32))
    d, idv, mn = _min_max_em(X, 31)
    with np.errstate(invalid="ignore", over="ignore"):
        v = np.subtract(X, mn)
        np.multiply(v, idv, out=v)
        v += F32(0.5)
    q = _u8(np.trunc(v))  # ggml's (uint8_t) without a MIN: the low byte
    out = np.empty((X.shape[1], 24), dtype=np.uint8)
    _put_f16(out, 0, d)
    _put_f16(out, 2, mn)
    _put_qh(out, 4, q)
    q &= 0xF
    q[16:] <<= 4
    q[:16] |= q[16:]
    _put_em(out, 8, q[:16])
    return out


# ----------------------------------------------------------------------------------------------- K-quant packing


# Bit packing works on 8 quants at a time: a block's uint8 quants viewed as little-endian uint64 words. Every
# field stays inside its own byte (no carries across bytes), so word-wide shifts and ORs give ggml's bytes, with
# 8x fewer numpy elements than byte-wise packing.
_LO4, _BIT0, _LO2 = (np.uint64(0x0101010101010101 * v) for v in (0x0F, 0x01, 0x03))


def _words(q: np.ndarray, *shape: int) -> np.ndarray:
    """Blocks of uint8 quants (nb, 256) as uint64 words (nb, *shape)."""
    return np.ascontiguousarray(q).view("<u8").reshape(q.shape[0], *shape)


def _bytes(w: np.ndarray) -> np.ndarray:
    return w.view(np.uint8).reshape(w.shape[0], -1)


def _shl(w: np.ndarray, n: int) -> np.ndarray:
    return w << np.uint64(n)


def _pack_2bit(q: np.ndarray) -> np.ndarray:
    """qs of Q2_K/Q3_K: per 128 quants, byte l holds quants l, l+32, l+64, l+96 (2 bits each). q: (nb, 256)
    uint8 in [0, 3]."""
    w = _words(q, 2, 4, 4)  # [half, k, word]
    return _bytes(w[:, :, 0] | _shl(w[:, :, 1], 2) | _shl(w[:, :, 2], 4) | _shl(w[:, :, 3], 6))


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """The 12 scale bytes of Q4_K/Q5_K: 8 6-bit scales and 8 6-bit mins. ls, lm: (nb, 8) uint8."""
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out


def _pack_scales_q3(ls: np.ndarray) -> np.ndarray:
    """The 12 scale bytes of Q3_K from 16 6-bit values (already offset by 32). ls: (nb, 16)."""
    ls = ls.astype(np.uint8)
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:8] = (ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4)
    hi = (ls >> 4).reshape(-1, 4, 4)  # j = 4*a + b -> bits 2a of byte 8+b
    out[:, 8:12] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    return out


def _requant(X: np.ndarray, d: np.ndarray, m: np.ndarray | None, L: np.ndarray | Callable[[np.ndarray], np.ndarray],
             lo: int, hi: int, off: int = 0) -> np.ndarray:  # fmt: skip
    """Final quants from the stored (fp16-rounded) scales, as uint8 blocks (nb, 256) in ggml's element order:
    off + clamp(nearest_int((x + m)/d), lo, hi) where d != 0, else the search's L.

    X, L: element-major (n, M) groups (L may be a function giving the columns it is asked for); d, m: (M,).
    """
    nz = d != 0
    dd = np.where(nz, d, F32(1))
    with np.errstate(over="ignore", invalid="ignore"):
        q = np.divide(np.add(X, m), dd) if m is not None else np.divide(X, dd)
    rint_exact(q, out=q)
    clip_(q, lo, hi)
    if off:
        q += F32(off)
    if not nz.all():
        cols = np.flatnonzero(~nz)
        q[:, cols] = L(cols) if callable(L) else L[:, cols]
    return _from_em(q).reshape(-1, QK_K)


def _kquant_subblocks(x: np.ndarray, n: int) -> np.ndarray:
    return _em(x.reshape(-1, n))


def _super_weights(x: np.ndarray, qw: np.ndarray, n: int, factor: float) -> np.ndarray:
    """K-quant impl weights qw * sqrt(sigma2 + x^2), sigma2 = factor*sum(x^2)/256 per super-block."""
    sb = x.reshape(-1, QK_K)
    s = ssum(_em(sb * sb))
    sigma2 = (F32(factor) * s) / F32(QK_K)
    qwb = np.broadcast_to(qw.reshape(1, -1), x.shape).reshape(-1, QK_K)
    return (qwb * np.sqrt(sigma2[:, None] + sb * sb)).reshape(-1, n), sigma2


def _q2_K(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    nb = x.size // QK_K
    X = _kquant_subblocks(x, 16)
    if qw is None:
        scales, mins, L = make_qkx_quants(X, np.abs(X), 3, -0.5, 0.1, 15, True)
        scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
        max_scale = np.maximum(scales.max(axis=1), F32(0))
        max_min = np.maximum(mins.max(axis=1), F32(0))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            ls = np.where(
                max_scale[:, None] > 0, nearest_int((F32(15) / max_scale)[:, None] * scales), F32(0)
            )
            lm = np.where(max_min[:, None] > 0, nearest_int((F32(15) / max_min)[:, None] * mins), F32(0))
        sc = _u8(ls) | _u8(lm.astype(np.int64) << 4)
        d = np.where(max_scale > 0, max_scale / F32(15), F32(0))
        dmin = np.where(max_min > 0, max_min / F32(15), F32(0))
    else:
        W, _ = _super_weights(x, qw, 16, 1.0)
        W = _em(W)
        sw = ssum(W).reshape(nb, 16)
        scales, mins, L = make_qkx_quants(X, W, 3, -0.9, 0.05, 36, False)
        d, Ls = make_qp_quants(_em(scales.reshape(nb, 16)), 15, _em(sw))
        dmin, Lm = make_qp_quants(_em(mins.reshape(nb, 16)), 15, _em(sw))
        sc = _u8(Ls.T) | _u8(Lm.T.astype(np.int64) << 4)
    dsub = _f16_back(d)[:, None] * (sc & 0xF).astype(F32)
    msub = _f16_back(dmin)[:, None] * (sc >> 4).astype(F32)
    q = _requant(X, dsub.reshape(-1), msub.reshape(-1), L, 0, 3)
    out = np.empty((nb, 84), dtype=np.uint8)
    out[:, :16] = sc
    out[:, 16:80] = _pack_2bit(q)
    _put_f16(out, 80, d)
    _put_f16(out, 82, dmin)
    return out


def _q3_K(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    nb = x.size // QK_K
    X = _kquant_subblocks(x, 16)
    if qw is None:
        scales, L = make_q3_quants(X, 4)
        scales = scales.reshape(nb, 16)
        _, max_scale = first_absmax(_em(scales))
        nz = max_scale != 0
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            iscale = F32(-32) / np.where(nz, max_scale, F32(1))
            lq = nearest_int(iscale[:, None] * scales)
        lq = (lq.astype(np.int64) + 128) % 256 - 128  # int8_t conversion
        ls = np.where(nz[:, None], np.clip(lq, -32, 31) + 32, 0)
        with np.errstate(divide="ignore"):
            d = np.where(nz, F32(1) / iscale, F32(0))
    else:
        W, _ = _super_weights(x, qw, 16, 2.0)
        W = _em(W)
        sw = ssum(W).reshape(nb, 16)
        scales, L = make_qx_quants(X, 4, W)
        d, Ls = make_qx_quants(_em(scales.reshape(nb, 16)), 32, _em(sw))
        ls = Ls.T.astype(np.int64)
    dsub = _f16_back(d)[:, None] * (ls - 32).astype(F32)
    q = _requant(X, dsub.reshape(-1), None, L, -4, 3, off=4)
    w = _words(q, 8, 4)  # quant j -> hmask byte j % 32, bit j // 32: the quant's bit 2 (q in [0, 7])
    hmask = (w[:, 0] >> np.uint64(2)) & _BIT0
    for j in range(1, 8):
        hmask |= _shl((w[:, j] >> np.uint64(2)) & _BIT0, j)
    out = np.empty((nb, 110), dtype=np.uint8)
    out[:, :32] = _bytes(hmask)
    out[:, 32:96] = _pack_2bit(_bytes(w & _LO2))
    out[:, 96:108] = _pack_scales_q3(ls)
    _put_f16(out, 108, d)
    return out


def _q45_K(x: np.ndarray, qw: np.ndarray | None, nmax: int) -> tuple[np.ndarray, ...]:
    """Shared part of Q4_K and Q5_K: scales/mins search and the final quants (nb, 256)."""
    nb = x.size // QK_K
    X = _kquant_subblocks(x, 32)
    if qw is None:
        W = np.multiply(X, X)
        av_x = np.sqrt(ssum(W) / F32(32))
        W = np.add(av_x, np.abs(X, out=W), out=W)
        rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
        scales, mins, L = make_qkx_quants(X, W, nmax, rmin, 0.1, nstep, False)
        del W
        scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
        max_scale = np.maximum(scales.max(axis=1), F32(0))
        max_min = np.maximum(mins.max(axis=1), F32(0))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            inv_s = np.where(max_scale > 0, F32(63) / np.where(max_scale > 0, max_scale, F32(1)), F32(0))
            inv_m = np.where(max_min > 0, F32(63) / np.where(max_min > 0, max_min, F32(1)), F32(0))
            ls = np.minimum(_u8(nearest_int(inv_s[:, None] * scales)), 63)
            lm = np.minimum(_u8(nearest_int(inv_m[:, None] * mins)), 63)
        d, dmin = max_scale / F32(63), max_min / F32(63)
    else:
        W, sigma2 = _super_weights(x, qw, 32, 2.0)
        W = _em(W)
        sw = ssum(W).reshape(nb, 8)
        scales, mins, L = make_qkx_quants(X, W, nmax, -0.9, 0.05, 36, False)
        d, Ls = make_qp_quants(_em(scales.reshape(nb, 8)), 63, _em(sw))
        dmin, Lm = make_qp_quants(_em(mins.reshape(nb, 8)), 63, _em(sw))
        ls, lm = _u8(Ls.T), _u8(Lm.T)
    dsub = _f16_back(d)[:, None] * ls.astype(F32)
    msub = _f16_back(dmin)[:, None] * lm.astype(F32)
    q = _requant(X, dsub.reshape(-1), msub.reshape(-1), L, 0, nmax)
    return d, dmin, _pack_scales_k4(ls, lm), q


def _q4_K(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    d, dmin, sc, q = _q45_K(x, qw, 15)
    w = _words(q, 4, 2, 4)  # chunk c of 64 quants: byte l = quant l | quant l+32 << 4
    out = np.empty((q.shape[0], 144), dtype=np.uint8)
    _put_f16(out, 0, d)
    _put_f16(out, 2, dmin)
    out[:, 4:16] = sc
    out[:, 16:] = _bytes(w[:, :, 0] | _shl(w[:, :, 1], 4))
    return out


def _q5_K(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    d, dmin, sc, q = _q45_K(x, qw, 31)
    w = _words(q, 4, 2, 4)  # chunk c of 64 quants: low half bit 2c, high half bit 2c+1 of qh
    hib = (w >> np.uint64(4)) & _BIT0
    qh = hib[:, 0, 0] | _shl(hib[:, 0, 1], 1)
    for c in range(1, 4):
        qh |= _shl(hib[:, c, 0], 2 * c) | _shl(hib[:, c, 1], 2 * c + 1)
    lo = w & _LO4
    out = np.empty((q.shape[0], 176), dtype=np.uint8)
    _put_f16(out, 0, d)
    _put_f16(out, 2, dmin)
    out[:, 4:16] = sc
    out[:, 16:48] = _bytes(qh)
    out[:, 48:] = _bytes(lo[:, :, 0] | _shl(lo[:, :, 1], 4))
    return out


def _q6_K(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    nb = x.size // QK_K
    X = _kquant_subblocks(x, 16)
    W = None if qw is None else _em(np.broadcast_to(qw.reshape(1, -1), x.shape).reshape(-1, 16))
    scales, L = search_qx(X, 32, W)
    scales = scales.reshape(nb, 16)
    max_abs, max_scale = first_absmax(_em(scales))
    zero = max_abs < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(-128) / np.where(zero, F32(1), max_scale)
        d = np.where(zero, F32(0), F32(1) / iscale)
        sc = np.minimum(F32(127), nearest_int(iscale[:, None] * scales)).astype(np.int64)
    sc = np.where(zero[:, None], 0, sc)
    dsub = _f16_back(d)[:, None] * sc.astype(F32)
    q = _requant(X, dsub.reshape(-1), None, L, -32, 31, off=32)
    out = np.empty((nb, 210), dtype=np.uint8)
    w = _words(q, 2, 2, 8)  # half h of 128 quants: ql byte p = low nibbles of quants p and p+64
    out[:, :128] = _bytes((w[:, :, 0] & _LO4) | _shl(w[:, :, 1] & _LO4, 4))
    hi = (_words(q, 2, 4, 4) >> np.uint64(4)) & _LO2  # qh byte l: the high 2 bits of l, l+32, l+64, l+96
    out[:, 128:192] = _bytes(hi[:, :, 0] | _shl(hi[:, :, 1], 2) | _shl(hi[:, :, 2], 4) | _shl(hi[:, :, 3], 6))
    out[:, 192:208] = sc.astype(np.int8).view(np.uint8)
    _put_f16(out, 208, d)
    out[zero] = 0  # ggml memsets an all-zero super-block
    return out


_ENCODERS: dict[str, Callable[[np.ndarray, np.ndarray | None], np.ndarray]] = {
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
    "Q2_K": _q2_K, "Q3_K": _q3_K, "Q4_K": _q4_K, "Q5_K": _q5_K, "Q6_K": _q6_K,
}  # fmt: skip
# the ggml types llmq encodes (their block sizes live in llmq.io.ggml_types)
SUPPORTED_TYPES = tuple(_ENCODERS)

# values per chunk: 256K keeps the temporaries of the searches in cache
_CHUNK_VALUES = 1 << 18
# Q3_K's coordinate descent takes ~15 rounds of ~60 array calls per chunk whatever its size, and those rounds
# are mostly call overhead once few groups are left: twice the values per chunk halves that cost, and measured
# faster overall (512K: ~7% less CPU per value on real weights; 1M: slower again, out of cache)
_CHUNK_SCALE = {"Q3_K": 2}


def row_bytes(type_name: str, n_per_row: int) -> int:
    return row_nbytes(type_name, n_per_row)


def default_threads() -> int:
    """Worker threads for encoding: the CPUs this process may use (llama.cpp's nthread default), at most 8."""
    from llmq.io.base import available_cpus

    return min(8, available_cpus())


def encode_jobs(
    x: np.ndarray, type_name: str, imatrix: np.ndarray | None = None
) -> tuple[np.ndarray, list[Callable[[], None]]]:
    """The output (nrows, row_bytes) of encoding rows ``x`` as ``type_name`` and the work items that fill it,
    each a slice of rows small enough that its temporaries stay in cache: run them in any order, on any
    threads (numpy releases the GIL in its loops), then the output is complete."""
    type_name = type_name.upper()
    if type_name not in _ENCODERS:
        raise UnsupportedType(f"no GGUF encoder for {type_name} (have {', '.join(SUPPORTED_TYPES)})")
    x = np.asarray(x, dtype=F32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ShapeError(f"expected 2-D rows, got shape {x.shape}")
    nrows, n = x.shape
    blck = block_size(type_name)
    if n % blck:
        raise ShapeError(f"row length {n} is not a multiple of the {type_name} block size {blck}")
    qw = None
    if imatrix is not None:
        qw = np.ascontiguousarray(imatrix, dtype=F32).reshape(-1)
        if qw.size != n:
            raise ShapeError(f"imatrix has {qw.size} values, the rows have {n}")
    enc = _ENCODERS[type_name]
    out = np.empty((nrows, row_bytes(type_name, n)), dtype=np.uint8)
    step = max(1, _CHUNK_VALUES * _CHUNK_SCALE.get(type_name, 1) // n)

    def work(r0: int) -> None:
        out[r0 : r0 + step] = enc(np.ascontiguousarray(x[r0 : r0 + step]), qw).reshape(-1, out.shape[1])

    return out, [functools.partial(work, r0) for r0 in range(0, nrows, step)]


def quantize(
    x: np.ndarray, type_name: str, imatrix: np.ndarray | None = None, threads: int | None = None
) -> np.ndarray:
    """Encode float32 rows ``x`` (nrows, n_per_row) as ggml ``type_name`` blocks: uint8 (nrows, row_bytes).

    ``imatrix`` (n_per_row,) switches to llama.cpp's importance-weighted search where ggml has one (Q8_0 ignores
    it, as ggml does).
    """
    out, jobs = encode_jobs(x, type_name, imatrix)
    nthreads = threads or default_threads()
    if nthreads <= 1 or len(jobs) == 1:
        for job in jobs:
            job()
    else:
        with ThreadPoolExecutor(min(nthreads, len(jobs))) as pool:
            for f in [pool.submit(job) for job in jobs]:
                f.result()
    return out


def dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Decode ggml blocks back to float32 (via gguf-py's reference decoders)."""
    import gguf

    data = gguf.quants.dequantize(np.ascontiguousarray(raw).reshape(-1), gguf.GGMLQuantizationType[type_name])
    return np.asarray(data, dtype=F32).reshape(shape)
