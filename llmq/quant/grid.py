"""The uniform integer grid every torch-family method rounds onto: RTN, GPTQ, AWQ, and whatever comes next.

A row (or a group of ``group_size`` columns of a row) of a weight gets a scale and an integer zero point::

    q = clamp(round(w / scale) + zero, 0, 2**bits - 1)        ŵ = scale * (q - zero)

Asymmetric grids stretch ``[min(w, 0), max(w, 0)]`` over ``[0, 2**bits - 1]``; symmetric ones use
``[-absmax, absmax]`` with the zero point at the middle code ``2**(bits-1)`` (how GPTQ checkpoints store it, and
compressed-tensors' min-max observer). This is the one home of that arithmetic: :func:`grid_params` for the
per-row parameters (with GPTQ's optional ``mse`` range search), :func:`quantize_codes` to round,
:func:`fake_quantize` for a float result, :func:`quantize_rtn` for a :class:`~llmq.formats.base.QuantizedLinear`.
"""

from __future__ import annotations

import torch

from llmq.errors import BadInput, ShapeError
from llmq.formats.base import QuantizedLinear

GRID_BITS = (1, 2, 3, 4, 5, 6, 7, 8)  # what the arithmetic (and a uint8 code) can hold; methods narrow it
MSE_GRID = 100  # candidate ranges of the mse search: 1 - i/100 ...
MSE_STEPS = 80  # ... down to 21% of the full range (the reference's grid=100, maxshrink=0.8)


def grid_params(
    w: torch.Tensor, bits: int, sym: bool, min_zero: int = 0, mse: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and integer zero point of the uniform grid that covers each row of ``w`` (and 0).

    Symmetric grids put the zero at the middle code (2^(bits-1)), as the GPTQ formats store it. ``min_zero=1``
    keeps zero points >= 1 (GPTQ v1 stores zero - 1): such rows get their scale stretched over maxq - 1 steps.

    ``mse`` = p > 0 shrinks each row's range instead of covering it whole: of the ranges 100%, 99%, … 21% the one
    with the smallest Σ|w - ŵ|^p wins (the GPTQ reference code's and GPTQModel's ``mse`` option; p = 2.4 there).
    """
    maxq = 2**bits - 1
    w = w.float()
    xmin = torch.clamp(w.min(dim=1).values, max=0.0)
    xmax = torch.clamp(w.max(dim=1).values, min=0.0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    scale, zero = _grid_from_range(xmin, xmax, maxq, sym, min_zero)
    if mse > 0:
        best = torch.full_like(scale, float("inf"))
        for i in range(MSE_STEPS):
            shrink = 1.0 - i / MSE_GRID
            sc, zr = _grid_from_range(xmin * shrink, xmax * shrink, maxq, sym, min_zero)
            q = quantize_codes(w, sc, zr, bits)
            err = ((q - zr.unsqueeze(1)) * sc.unsqueeze(1) - w).abs_().pow_(mse).sum(1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, sc, scale)
            zero = torch.where(better, zr, zero)
    return scale, zero


def _grid_from_range(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, sym: bool, min_zero: int):
    span = xmax - xmin
    # an all-zero row still needs a usable scale
    span = torch.where(span == 0, torch.ones_like(span), span)
    scale = span / maxq
    if sym:
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = torch.round(-xmin / scale)
        if min_zero > 0:
            low = zero < min_zero
            scale = torch.where(low, torch.clamp(xmax, min=1e-12) / (maxq - min_zero), scale)
            zero = torch.where(low, torch.full_like(zero, float(min_zero)), zero)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of ``w`` ([rows] or [rows, k]) on the grid (scale, zero) given per row."""
    if w.dim() == 2:
        scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def fake_quantize(
    w: torch.Tensor, bits: int, group_size: int, sym: bool, min_zero: int = 0, mse: float = 0.0
) -> torch.Tensor:
    """Round-to-nearest onto the grid, per row and group of ``group_size`` columns (-1: whole row); float out."""
    rows, cols = w.shape
    g = _group_width(cols, group_size)
    wg = w.float().reshape(rows * (cols // g), g)
    scale, zero = grid_params(wg, bits, sym, min_zero, mse)
    q = quantize_codes(wg, scale, zero, bits)
    return ((q - zero.unsqueeze(1)) * scale.unsqueeze(1)).reshape(rows, cols).to(w.dtype)


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int = -1, sym: bool = True, min_zero: int = 0,
                 mse: float = 0.0) -> QuantizedLinear:  # fmt: skip
    """Round-to-nearest of a ``[out, in]`` weight onto the grid, per row (``group_size=-1``) or per group.

    ``min_zero=1`` keeps every zero point >= 1 (GPTQ v1 stores zero - 1): a group whose range starts at 0 gets
    zero 1 and a scale stretched over ``maxq - 1`` steps instead.
    """
    if bits not in GRID_BITS:
        raise BadInput(f"the integer grid holds 1-8 bits, not {bits}")
    rows, cols = w.shape
    g = _group_width(cols, group_size)
    n_groups = cols // g
    wg = w.float().reshape(rows * n_groups, g)
    scale, zero = grid_params(wg, bits, sym, min_zero, mse)
    q = quantize_codes(wg, scale, zero, bits).reshape(rows, cols)
    return QuantizedLinear(q.to(torch.uint8), scale.reshape(rows, n_groups),
                           zero.reshape(rows, n_groups).to(torch.int32), bits, group_size, sym)  # fmt: skip


def _group_width(cols: int, group_size: int) -> int:
    g = cols if group_size == -1 else group_size
    if g <= 0 or cols % g:
        raise ShapeError(f"in_features {cols} is not divisible by group size {group_size}")
    return g
