"""Multiple-choice knapsack: one choice per item (a type per tensor), total weight (bytes) within a capacity,
least total loss.

:func:`allocate` solves it by dynamic programming over bytes. Each item's weights are taken relative to its
lightest choice and divided by their greatest common divisor, so the DP is exact whenever the remaining
capacity fits ``max_cells``; a larger problem is solved on a coarser grid (``granularity`` bytes, weights rounded
up, so the answer always fits). Either way a Lagrangian lower bound certifies how far the answer can be from the
optimum (``gap``); the tests check exactness against brute force.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llmq.errors import BadInput

MAX_CELLS = 1 << 25  # DP table entries (items × capacity units): 32 MiB of back pointers


@dataclass(frozen=True)
class Allocation:
    choice: tuple[int, ...]  # index of the chosen option per item
    weight: int  # total weight of the choice
    loss: float  # total loss of the choice
    lower_bound: float  # no feasible choice has a smaller loss
    granularity: int  # bytes per DP unit (1 unit = gcd of the weight steps when exact)
    exact: bool  # the DP ran at the weights' own resolution: ``choice`` is optimal

    @property
    def gap(self) -> float:
        """Relative distance to the optimum, at most (0 when exact)."""
        return 0.0 if self.exact or self.loss <= 0 else max(0.0, (self.loss - self.lower_bound) / self.loss)


def allocate(items: Sequence[Sequence[tuple[int, float]]], capacity: int, *,
             max_cells: int = MAX_CELLS) -> Allocation:  # fmt: skip
    """Pick one (weight, loss) option per item: total weight <= ``capacity``, least total loss.

    Ties go to the lighter total. Raises BadInput when even the lightest choices exceed the capacity.
    """
    if not items:
        return Allocation((), 0, 0.0, 0.0, 1, True)
    for i, opts in enumerate(items):
        if not opts:
            raise BadInput(f"item {i} has no options")
        for w, loss in opts:
            if w < 0 or not math.isfinite(loss):
                raise BadInput(f"item {i}: weights must be >= 0 and losses finite")
    base = [min(w for w, _ in opts) for opts in items]
    slack = int(capacity) - sum(base)
    if slack < 0:
        raise BadInput(f"the budget ({capacity:,} bytes) is below the smallest choice ({sum(base):,} bytes)")
    rel = [[w - b for w, _ in opts] for opts, b in zip(items, base, strict=True)]
    g = 0
    for ws in rel:
        for w in ws:
            g = math.gcd(g, w)
    g = max(g, 1)
    units = slack // g
    exact = len(items) * (units + 1) <= max_cells
    q = 1 if exact else -(-len(items) * (units + 1) // max_cells)
    gran = g * q
    cap = slack // gran
    choice = _dp([[-(-w // gran) for w in ws] for ws in rel], [[loss for _, loss in o] for o in items], cap)
    weight = sum(items[i][c][0] for i, c in enumerate(choice))
    loss = float(sum(items[i][c][1] for i, c in enumerate(choice)))
    lb = loss if exact else min(loss, _lagrangian_bound(items, capacity))
    return Allocation(tuple(choice), weight, loss, lb, gran, exact)


def _dp(units: list[list[int]], losses: list[list[float]], cap: int) -> list[int]:
    """Exact DP: best[c] = least loss of the items so far using at most c units."""
    n = len(units)
    best = np.zeros(cap + 1)
    back = np.zeros((n, cap + 1), dtype=np.uint8 if max(map(len, units)) < 256 else np.uint16)
    for i in range(n):
        new = np.full(cap + 1, np.inf)
        # options in order of (units, loss): on equal loss the lighter option wins (strict <)
        for k in sorted(range(len(units[i])), key=lambda k: (units[i][k], losses[i][k])):
            u = units[i][k]
            if u > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[u:] = best[: cap + 1 - u] + losses[i][k]
            better = cand < new
            new[better] = cand[better]
            back[i][better] = k
        best = new
    c = int(np.argmin(best))  # the first (lightest) of the least-loss capacities
    if not np.isfinite(best[c]):
        raise BadInput("no choice fits the budget")
    choice = [0] * n
    for i in range(n - 1, -1, -1):
        k = int(back[i][c])
        choice[i] = k
        c -= units[i][k]
    return choice


def _lagrangian_bound(items: Sequence[Sequence[tuple[int, float]]], capacity: int) -> float:
    """max over lam >= 0 of sum_i min_k (loss_ik + lam * w_ik) - lam * capacity (a lower bound on the optimum)."""
    w = [np.array([o[0] for o in opts], dtype=np.float64) for opts in items]
    loss = [np.array([o[1] for o in opts], dtype=np.float64) for opts in items]

    def dual(lam: float) -> tuple[float, float]:
        val, used = -lam * capacity, 0.0
        for wi, li in zip(w, loss, strict=True):
            k = int(np.argmin(li + lam * wi))
            val += li[k] + lam * wi[k]
            used += wi[k]
        return val, used

    lo, hi = 0.0, 1.0
    if dual(0.0)[1] <= capacity:
        return dual(0.0)[0]
    while dual(hi)[1] > capacity and hi < 1e300:
        hi *= 4
    best = max(dual(lo)[0], dual(hi)[0])
    for _ in range(200):
        mid = (lo + hi) / 2
        val, used = dual(mid)
        best = max(best, val)
        if used > capacity:
            lo = mid
        else:
            hi = mid
    return best
