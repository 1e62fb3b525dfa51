"""The scale searches of ggml's K-quants (make_qx_quants, make_q3_quants, make_qkx2/3_quants, make_qp_quants).

Every function works on many groups at once in *element-major* layout: ``X`` has shape ``(n, M)`` -- element
``i`` of all ``M`` groups is the contiguous row ``X[i]``. That layout matters for bit-exactness: ggml sums the
``n`` elements of a group one after the other in float32, and numpy's reduction along axis 0 of a C-contiguous
array does exactly that (along the last axis it would use pairwise summation and round differently).
Every arithmetic step is written in the same order and precision as ggml-quants.c (float32, no FMA), and
``nearest_int`` is round-half-to-even like ggml's magic-number trick.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)


def ssum(a: np.ndarray) -> np.ndarray:
    """Sequential float32 sum over axis 0 (ggml's ``for (i...) s += a[i]``)."""
    if a.ndim == 2 and a.shape[1] >= 16:
        # axis-0 reduction of a C-contiguous array accumulates row after row: sequential per column
        return np.add.reduce(np.ascontiguousarray(a), axis=0)
    # few columns: numpy would make the reduction axis the inner loop and sum pairwise
    out = a[0].copy()
    for row in a[1:]:
        out += row
    return out


@functools.cache
def _einsum_sequential() -> bool:
    """Whether ``np.einsum('ij,ij->j', ...)`` multiplies and adds without fusing (no FMA) and sums in row order:
    checked once on values where a fused multiply-add or another order would give a different float."""
    a = F32(1 + 2**-12)
    A = np.ones((3, 16), dtype=F32)
    B = np.empty((3, 16), dtype=F32)
    B[0], A[1], B[1] = -(a * a), a, a  # unfused: -(a*a) + a*a = 0; fused: the rounding error of a*a
    B[2] = F32(2**-24)  # sequential: 0 + 2^-24; any product fused or reordered leaves a trace
    C = np.full((3, 16), F32(1), dtype=F32)
    expect = ((B[0] + A[1] * B[1]) + B[2]).astype(F32)
    with np.errstate(all="ignore"):
        return bool(
            np.array_equal(np.einsum("ij,ij->j", A, B), expect)
            and np.array_equal(np.einsum("ij,ij,ij->j", A, B, C), expect)
        )


def warm_up() -> None:
    """Compute what is cached per process (the einsum check) now: forked encoder processes then inherit it."""
    _einsum_sequential()


def wsum(*ops: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``sum_i ops[0][i] * ops[1][i] * ...`` per column, multiplied left to right and summed sequentially in
    float32 over axis 0, as ggml's ``s += a[i]*b[i]*c[i]``. One einsum pass where numpy's einsum provably does
    exactly that (C-contiguous (n, M) operands with M >= 16: row-by-row accumulation, checked to be unfused),
    else multiplies and ``ssum``. einsum never goes through BLAS here (no ``optimize``)."""
    a = ops[0]
    if (
        a.ndim == 2
        and a.shape[1] >= 16
        and all(o.shape == a.shape and o.dtype == F32 and o.flags.c_contiguous for o in ops)
        and _einsum_sequential()
    ):
        return np.einsum(_SPECS[len(ops)], *ops, out=out)
    p = ops[0] * ops[1]
    for o in ops[2:]:
        p *= o
    if out is None:
        return ssum(p)
    out[...] = ssum(p)
    return out


_SPECS = {2: "ij,ij->j", 3: "ij,ij,ij->j"}


@functools.lru_cache(maxsize=32)
def _const_row(n: int, v: float) -> np.ndarray:
    row = np.full(n, v, dtype=F32)
    row.flags.writeable = False
    return row


def clip_(a: np.ndarray, lo: float | None, hi: float | None) -> np.ndarray:
    """``np.clip(a, lo, hi, out=a)`` for float32 ``a``, as np.maximum / np.minimum against a constant row:
    numpy's min/max against a broadcast scalar (and its clip) are not vectorized and cost 3x a plain pass, the
    row-against-row loop is. Same values (NaN stays NaN); only the sign of a zero result may differ, which no
    caller's sum or integer conversion can see."""
    n = a.shape[-1] if a.ndim else 1
    if a.ndim < 1 or n < 64:
        return np.clip(a, lo, hi, out=a)
    if lo is not None:
        np.maximum(a, _const_row(n, float(lo)), out=a)
    if hi is not None:
        np.minimum(a, _const_row(n, float(hi)), out=a)
    return a


NEAREST_INT_RANGE = 4194303.0  # ggml's nearest_int is exact (round half to even) inside ±this


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int exactly, as float32 values: round half to even inside its range, and outside it
    (an infinite scale from a group whose range is a denormal) the bits its magic-number trick yields."""
    with np.errstate(over="ignore", invalid="ignore"):
        val = np.asarray(v, dtype=np.float32) + np.float32(12582912.0)
    bits = val.view(np.int32)
    return ((bits & 0x007FFFFF) - 0x00400000).astype(np.float32)


def _fix_out_of_range(out: np.ndarray, iscale: np.ndarray, span: np.ndarray, exact) -> None:
    """The hot loops round with np.rint; a group whose |iscale|·span leaves nearest_int's range (or is not
    finite) gets ggml's exact result instead. Checked on the (groups,) vectors, so the common case costs O(M)."""
    with np.errstate(over="ignore", invalid="ignore"):
        bad = ~(np.abs(iscale) * span <= NEAREST_INT_RANGE)
    if bad.any():
        out[:, bad] = nearest_int(exact(bad))


def first_absmax(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(amax, the signed value at the first index of the largest |x|) per group, as ggml's strict ``>`` loop."""
    mx, mn = X.max(axis=0), X.min(axis=0)  # two axis-0 reductions are much cheaper than argmax(|X|)
    vmax = np.where(mx >= -mn, mx, mn)
    tie = (mx == -mn) & (mx != 0)
    if tie.any():  # +a and -a both present: whichever comes first
        cols = X[:, tie]
        vmax[tie] = cols[np.argmax(np.abs(cols), axis=0), np.arange(cols.shape[1])]
    return np.abs(vmax), vmax


def make_qx_quants(X: np.ndarray, nmax: int, qw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants with rmse_type 1: returns (scale (M,), L (n, M) float in [0, 2*nmax))."""
    scale, quants = search_qx(X, nmax, qw)
    return scale, quants(None)


def search_qx(
    X: np.ndarray, nmax: int, qw: np.ndarray | None
) -> tuple[np.ndarray, Callable[[np.ndarray | None], np.ndarray]]:
    """make_qx_quants' search: (scale (M,), a function giving L (n, k) for the groups ``cols`` (None: all)).
    The K-quant encoders requantize from their rounded scales and need the search's L only where a scale is 0."""
    amax, vmax = first_absmax(X)
    zero = amax < GROUP_MAX_EPS
    safe_max = np.where(zero, F32(1), vmax)
    # the largest |x| of the sign opposite to max's: with amax it bounds every group's rint(iscale*x) below
    opp = np.maximum(np.where(vmax > 0, -X.min(axis=0), X.max(axis=0)), F32(0))
    w = X * X if qw is None else qw
    wx = w * X
    fn = F32(nmax)
    lo, hi = -fn, fn - 1
    lq = np.empty_like(X)

    # every candidate's iscale = -(nmax + 0.1*is)/max (the base, is = 0, first; then ggml's order), and the groups
    # each must clamp: rounding is monotonic, so a group's quants lie between rint(iscale*max) and
    # rint(|iscale|*opp); only those whose bounds leave [-nmax, nmax-1] need it (few: an opposite-sign value
    # close to max), except for the widest candidates, where the max itself rounds past -nmax in every group
    steps = np.array([fn] + [fn + F32(0.1) * F32(i) for i in range(-9, 10) if i], dtype=F32)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        iscales = np.divide(-steps[:, None], safe_max)
        clamp = np.rint(iscales * vmax) < lo
        clamp |= np.rint(np.abs(iscales) * opp) > hi
    full = steps > nmax + 0.5
    some = clamp.any(axis=1)
    sums = np.empty((2, len(steps), X.shape[1]), dtype=F32)  # sumlx, suml2 of every candidate

    def trial(k: int) -> tuple[np.ndarray, np.ndarray]:
        # the hot loop: in-place ufuncs, no temporaries (same float32 operations as ggml, in the same order)
        np.multiply(iscales[k], X, out=lq)
        np.rint(lq, out=lq)  # |iscale*x| <= nmax + 1: inside nearest_int's exact range
        if full[k]:
            clip_(lq, lo, hi)
        elif some[k]:
            cols = np.flatnonzero(clamp[k])
            lq[:, cols] = np.clip(lq[:, cols], lo, hi)
        return wsum(wx, lq, out=sums[0, k]), wsum(w, lq, lq, out=sums[1, k])

    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        sumlx, suml2 = trial(0)
        best = np.where(suml2 != 0, sumlx / suml2, F32(0)) * sumlx
        won = np.zeros(X.shape[1], dtype=np.uint8)  # per group: the candidate that won last (0: the base)
        for k in range(1, len(steps)):
            sumlx, suml2 = trial(k)
            better = sumlx * sumlx > best * suml2
            better &= suml2 > 0
            if better.any():
                # ggml recomputes L from the winning iscale; so do we, once, after the search
                _select(better, (sumlx / suml2) * sumlx, best)
                np.maximum(won, better.view(np.uint8) * np.uint8(k), out=won)  # k only grows
        # the winner's scale, the same division ggml made when it won
        at = won.astype(np.intp) * X.shape[1] + np.arange(X.shape[1])
        sumlx, suml2 = sums[0].ravel().take(at), sums[1].ravel().take(at)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best_iscale = iscales.ravel().take(at)
    scale[zero] = 0

    def final(cols: np.ndarray | None) -> np.ndarray:
        Xc, isc, z = (X, best_iscale, zero) if cols is None else (X[:, cols], best_iscale[cols], zero[cols])
        with np.errstate(over="ignore", invalid="ignore"):
            L = clip_(np.rint(isc * Xc), lo, hi)
        L += fn
        L[:, z] = 0
        return L

    return scale, final


def _select(mask: np.ndarray, a: np.ndarray, out: np.ndarray) -> None:
    """``out[mask] = a[mask]`` for float32 vectors, as branch-free integer ops on their bits (several times
    faster than copyto(where=) or a boolean assignment with a random mask)."""
    m = np.negative(mask.view(np.int8), dtype=np.int32, casting="unsafe")
    o = out.view(np.int32)
    t = np.bitwise_xor(a.view(np.int32), o)
    t &= m
    o ^= t


def rint_exact(v: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """nearest_int of ``v`` as float32: np.rint where that is exact (checked with two reductions, no
    temporaries), ggml's bits when some value is outside its range or not finite."""
    if v.size and not (v.max() <= NEAREST_INT_RANGE and v.min() >= -NEAREST_INT_RANGE):
        r = nearest_int(v)
        if out is None:
            return r
        out[...] = r
        return out
    return np.rint(v, out=out)


def make_q3_quants(X: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants with do_rmse: a greedy coordinate search on the weighted squared error (w = x^2)."""
    amax, vmax = first_absmax(X)
    zero = amax < GROUP_MAX_EPS
    safe_max = np.where(zero, F32(1), vmax)
    fn = F32(nmax)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = -fn / safe_max
        L = np.multiply(iscale, X)
        clip_(np.rint(L, out=L), -fn, fn - 1)  # |iscale*x| <= nmax: rint is nearest_int here
        w = X * X
        sumlx, suml2 = wsum(w, X, L), wsum(w, L, L)
        # l has the sign of -x/max, so every w*x*l has the sign of -max: where max > 0, sumlx and every
        # sumlx - w*x*l are <= 0 and ggml never changes a quant. Only groups with max < 0 are searched.
        _q3_descent(X, L, iscale, sumlx, suml2, fn, np.flatnonzero((vmax < 0) & ~zero))
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    L += fn
    scale[zero] = 0
    L[:, zero] = 0
    return scale, L


# per 16-bit mask of the quants a round accepts: the first one (16: none)
_FIRST_BIT = np.array([16] + [(v & -v).bit_length() - 1 for v in range(1, 1 << 16)], dtype=np.uint8)
# per position p: the quants from p on (16: none -- a group that no longer searches)
_FROM_BIT = np.array([(0xFFFF << p) & 0xFFFF for p in range(17)], dtype=np.uint16)
_SHIFTS = np.arange(8, dtype=np.uint64)[:, None]
# compact the arrays to the groups still searching when fewer than this share of their columns is left
_COMPACT_BELOW = 0.5


def _first_hits(ok: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Per column of the bool (16, m) ``ok`` (m a multiple of 8): the first row >= pos that is True (16: none).
    Packs each column's 16 flags into an integer with eight shift-or passes over uint64 words (8 columns each:
    a flag is one byte 0/1, so shifting it by < 8 stays in its byte) -- argmax along axis 0 is 30x slower."""
    u = ok.view(np.uint64)
    lo = np.bitwise_or.reduce(u[:8] << _SHIFTS, axis=0).view(np.uint8)
    hi = np.bitwise_or.reduce(u[8:] << _SHIFTS, axis=0).view(np.uint8)
    v = hi.astype(np.uint16)
    v <<= 8
    v |= lo
    v &= _FROM_BIT.take(pos)
    return _FIRST_BIT.take(v)


def _q3_descent(X: np.ndarray, L: np.ndarray, iscale: np.ndarray, sumlx: np.ndarray, suml2: np.ndarray,
                fn: np.float32, live: np.ndarray) -> None:  # fmt: skip
    """make_q3_quants' coordinate passes, in place on the groups ``live`` (columns) of X, L, sumlx, suml2
    (L made from X with ``iscale``).

    ggml visits quant i = 0..n-1 of a group, recomputes it from the sums without it and keeps it if the error
    drops; a pass without a change ends the group's search (at most 5 passes). Changes are rare, so each round
    tries, for every group still searching, all quants from its position on at once, against the group's
    current sums: the tries before the first accepted one are exactly what ggml computes (nothing changed in
    between), that one is applied and the group goes on from the next quant (or the next pass) in the next
    round. Same floats as ggml's loop, with a few rounds of whole-array numpy calls instead of 80 small ones.

    The work arrays hold every quant's x, w, w*x, l, w*x*l and w*l*l (the last three updated where a quant
    changes); they are compacted to the groups still searching only when many have finished -- a finished
    group's column stays, its tries masked off (position n), which is cheaper than gathering every round.
    A compaction gathers x and l only (a gather costs several arithmetic passes) and recomputes the rest.
    """
    n = X.shape[0]
    if not live.size:
        return
    if n != 16:
        raise ValueError("the Q3 search packs a group's 16 flags into one integer")
    lo, hi = -fn, fn - 1
    # columns: the live groups, padded with copies of one to whole uint64 words of flags per row
    m = -(-live.size // 8) * 8
    sup = np.concatenate([live, np.repeat(live[:1], m - live.size)])  # the group of each column
    xl = np.empty((2, n, m), dtype=F32)  # x and l of every quant
    np.take(X, sup, axis=1, out=xl[0], mode="clip")  # (valid indices; "raise" would buffer the output)
    np.multiply(iscale[sup], xl[0], out=xl[1])  # l as make_q3_quants made it (cheaper than gathering it)
    clip_(np.rint(xl[1], out=xl[1]), lo, hi)
    pos = np.zeros(m, dtype=np.uint8)  # per column: next quant to try in its current pass; n: finished
    pos[live.size :] = n
    npass = np.zeros(m, dtype=np.uint8)
    changed = np.zeros(m, dtype=bool)  # per column: something changed in its current pass
    nlive = live.size
    while True:
        # w, w*x, w*x*l, w*l*l: recomputed from x and l after each compaction (cheaper than gathering them)
        x, lq = xl
        w, wx, A, B = np.empty((4, n, m), dtype=F32)
        np.multiply(x, x, out=w)
        np.multiply(w, x, out=wx)
        np.multiply(wx, lq, out=A)
        np.multiply(w, lq, out=B)
        B *= lq
        q, slx, sl2, t, u, lhs, rhs = np.empty((7, n, m), dtype=F32)
        ok, tmp = np.empty((2, n, m), dtype=bool)
        while nlive >= _COMPACT_BELOW * m or -(-nlive // 8) * 8 == m:  # (compacting would not shrink them)
            slx_t, sl2_t = sumlx[sup], suml2[sup]
            np.subtract(slx_t, A, out=slx)
            np.subtract(sl2_t, B, out=sl2)
            np.multiply(x, sl2, out=q)
            np.divide(q, slx, out=q)  # used only where slx > 0
            # slx >= 0 here (each w*x*l of a searched group is >= 0); where it is 0, q is NaN (or inf), unused
            if (
                np.fmax.reduce(q, axis=None) <= NEAREST_INT_RANGE
                and np.fmin.reduce(q, axis=None) >= -NEAREST_INT_RANGE
            ):
                np.rint(q, out=q)
            else:  # a value outside nearest_int's exact range (or infinite, where slx = 0): ggml's bits
                q[...] = nearest_int(q)
            new_l = clip_(q, lo, hi)
            np.not_equal(new_l, lq, out=ok)
            np.greater(slx, 0, out=tmp)
            ok &= tmp
            np.multiply(wx, new_l, out=t)
            slx += t
            np.multiply(w, new_l, out=u)
            u *= new_l
            sl2 += u
            np.greater(sl2, 0, out=tmp)
            ok &= tmp
            np.multiply(slx, slx, out=lhs)
            lhs *= sl2_t
            np.greater(lhs, np.multiply(sl2, slx_t * slx_t, out=rhs), out=tmp)
            ok &= tmp
            first = _first_hits(ok, pos)
            hit = first < n
            k = np.flatnonzero(hit)
            if k.size:
                at = first[k].astype(np.intp) * m + k
                g = sup[k]
                nl = new_l.ravel().take(at)
                L.reshape(-1)[first[k].astype(np.intp) * L.shape[1] + g] = nl
                lq.ravel()[at] = nl
                A.ravel()[at] = t.ravel().take(at)
                B.ravel()[at] = u.ravel().take(at)
                sumlx[g] = slx.ravel().take(at)
                suml2[g] = sl2.ravel().take(at)
            # the end of a pass: a group goes on to its next pass if it changed something in this one
            changed |= hit
            pos = np.where(hit, first + np.uint8(1), pos)
            end = ~hit | (pos >= n)
            again = end & changed & (npass < 4)
            npass += again
            pos[end] = n
            pos[again] = 0
            changed &= ~end
            nlive = np.count_nonzero(pos < n)
            if not nlive:
                return
        keep = np.flatnonzero(pos < n)
        m = -(-keep.size // 8) * 8
        keep = np.concatenate([keep, np.repeat(keep[:1], m - keep.size)])
        xl = np.take(xl, keep, axis=2)
        sup, pos, npass, changed = sup[keep], pos[keep], npass[keep], changed[keep]
        pos[nlive:] = n  # the pads: finished, with nothing changed (else they would start a new pass)
        changed[nlive:] = False


def _ZERO_ROW(n: int) -> np.ndarray:
    return _const_row(n, 0.0)


def make_qkx_quants(
    X: np.ndarray, W: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants / make_qkx3_quants (identical when weights are given): (scale, the_min, L)."""
    xmin = np.minimum(X.min(axis=0), F32(0))
    xmax = X.max(axis=0)
    sum_w = ssum(W)
    la, t1, t2 = np.empty_like(X), np.empty_like(X), np.empty_like(X)
    sum_x = ssum(np.multiply(W, X, out=t1))
    flat = xmax == xmin
    fn = F32(nmax)

    def quants(iscale: np.ndarray, span: np.ndarray, Xm: np.ndarray) -> np.ndarray:
        np.multiply(iscale, Xm, out=la)
        np.rint(la, out=la)
        if not np.abs(iscale * span).max() <= NEAREST_INT_RANGE:  # rare: a NaN, inf or huge iscale
            _fix_out_of_range(la, iscale, span, lambda bad: iscale[bad] * Xm[:, bad])
        # two vectorized passes: cheaper than finding the few groups that need the clamp with a dozen small
        # per-group array calls (each a GIL hand-off when several threads encode)
        return clip_(la, 0, fn)

    def error(scale: np.ndarray, mn: np.ndarray) -> np.ndarray:
        np.multiply(scale, la, out=t2)  # (scale*L + min) - x, then |.| or ^2, times w
        np.add(t2, mn, out=t2)
        np.subtract(t2, X, out=t2)
        if use_mad:
            return wsum(np.abs(t2, out=t2), W)
        return wsum(t2, t2, W)  # w * diff^2 (the product's order does not change its rounding)

    xm_buf = np.empty_like(X)

    def offset(mn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x - min, the range divisor and max |x - min| (|x - min| peaks at xmax or xmin) for a new min."""
        span = np.maximum(np.abs(xmax - mn), np.abs(xmin - mn))
        return np.subtract(X, mn, out=xm_buf), np.where(flat, F32(1), xmax - mn), span

    # (rmin + rdelta*is) + nmax of every step, as ggml computes it in float
    steps = [(F32(rmin) + F32(rdelta) * F32(i)) + fn for i in range(nstep + 1)]
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        # per group: the best error, its scale, the iscale and min that made its quants, and the current min --
        # one (5, M) array, so that an improvement is one branch-free select over all five
        state = np.empty((5, X.shape[1]), dtype=F32)
        best, scale, best_iscale, best_from, mn = state
        cand = np.empty_like(state)  # this step's values of the same
        mn[...] = xmin
        Xm, denom, span = offset(mn)
        np.divide(fn, denom, out=best_iscale)
        np.divide(F32(1), best_iscale, out=scale)
        quants(best_iscale, span, Xm)
        best[...] = error(scale, mn)
        best_from[...] = mn
        # ggml copies the winning quants; we keep the (iscale, min) that made them and redo them once at the end
        for step in steps:
            # ggml keeps using the best min found so far for the range and the offset
            iscale = np.divide(step, denom, out=cand[2])
            quants(iscale, span, Xm)
            sum_l, sum_l2, sum_xl = wsum(W, la), wsum(W, la, la), wsum(W, la, X)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = np.divide(sum_w * sum_xl - sum_x * sum_l, D, out=cand[1])
            this_min = np.divide(sum_l2 * sum_x - sum_l * sum_xl, D, out=cand[4])
            clamp = this_min > 0
            if clamp.any():
                _select(clamp, _ZERO_ROW(clamp.size), this_min)
                _select(clamp, sum_xl / sum_l2, this_scale)
            cur = error(this_scale, this_min)
            better = cur < best
            better &= D > 0
            if better.any():
                cand[0] = cur
                cand[3] = mn
                _select(np.broadcast_to(better, state.shape), cand, state)
                Xm, denom, span = offset(mn)
        Xm, _, span = offset(best_from)
        L = quants(best_iscale, span, Xm)
    scale = scale.copy()
    scale[flat] = 0
    mn = np.where(flat, xmin, mn)
    L[:, flat] = 0
    return scale, -mn, L


def make_qp_quants(X: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qp_quants: quantize non-negative super-block scales/mins to [0, nmax] with weights ``qw``."""
    vmax = np.maximum(X.max(axis=0), F32(0))
    zero = vmax < GROUP_MAX_EPS
    safe_max = np.where(zero, F32(1), vmax)
    fn = F32(nmax)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = fn / safe_max
        L = nearest_int(iscale * X)
        scale = F32(1) / iscale
        diff = X - scale * L
        best = ssum((qw * diff) * diff)
        for i in range(-4, 5):
            if i == 0:
                continue
            iscale_is = (F32(0.1) * F32(i) + fn) / safe_max
            scale_is = F32(1) / iscale_is
            lq = np.minimum(fn, nearest_int(iscale_is * X))
            diff = X - scale_is * lq
            mse = ssum((qw * diff) * diff)
            better = mse < best
            best = np.where(better, mse, best)
            iscale = np.where(better, iscale_is, iscale)
        L = np.minimum(fn, nearest_int(iscale * X))
        wx = qw * X
        sumlx = ssum(wx * L)
        suml2 = ssum((qw * L) * L)
        for _ in range(5):
            changed = False
            for i in range(X.shape[0]):
                wi, xi, wxi, Li = qw[i], X[i], wx[i], L[i]
                slx = sumlx - wxi * Li
                sl2 = suml2 - (wi * Li) * Li
                ok = (slx > 0) & (sl2 > 0)
                new_l = np.minimum(fn, nearest_int(xi * sl2 / np.where(ok, slx, F32(1))))
                ok &= new_l != Li
                slx = slx + wxi * new_l
                sl2 = sl2 + (wi * new_l) * new_l
                ok &= (slx * slx) * suml2 > (sumlx * sumlx) * sl2
                if ok.any():
                    changed = True
                    L[i] = np.where(ok, new_l, Li)
                    sumlx = np.where(ok, slx, sumlx)
                    suml2 = np.where(ok, sl2, suml2)
            if not changed:
                break
        d = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return np.where(zero, F32(0), d), np.where(zero, F32(0), L)
