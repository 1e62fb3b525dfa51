"""Turning logits into per-token numbers: NLL, and either a compact base record or KL terms against a base.

Everything here works on one batch of scored positions at a time, so the full-vocabulary logits of a whole
run never exist at once. Reductions run on the device that produced the logits; only per-token scalars and
the top-k of a base ever reach host memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from llmq.errors import BadInput
from llmq.eval.kld import BaseLogits


@dataclass
class _Parts:
    nll: list[np.ndarray] = field(default_factory=list)
    targets: list[np.ndarray] = field(default_factory=list)
    topk_ids: list[np.ndarray] = field(default_factory=list)
    topk_logp: list[np.ndarray] = field(default_factory=list)
    log_rest: list[np.ndarray] = field(default_factory=list)
    kld: list[np.ndarray] = field(default_factory=list)
    p_diff: list[np.ndarray] = field(default_factory=list)
    same_top: list[np.ndarray] = field(default_factory=list)


def _cat(parts: list[np.ndarray], dtype, width: int | None = None) -> np.ndarray:
    if parts:
        return np.concatenate(parts).astype(dtype, copy=False)
    return np.zeros((0,) if width is None else (0, width), dtype)


class Scorer:
    """Accumulates per-token results over the scored positions of a run, in protocol order.

    ``record_top_k``: keep the top-k log-probs of every position (to become a :class:`BaseLogits`).
    ``base``: compare with a base record position by position (KL divergence, Δp, top-1 agreement).
    """

    def __init__(self, n_vocab: int, record_top_k: int | None = None, base: BaseLogits | None = None):
        if record_top_k is not None and not 1 <= record_top_k <= n_vocab:
            raise BadInput(f"top-k must be between 1 and the vocabulary size {n_vocab}, got {record_top_k}")
        if record_top_k is not None and base is not None:
            raise BadInput("a run either records a base or compares with one, not both")
        self.n_vocab = n_vocab
        self.record_top_k = record_top_k
        self.base = base
        self.count = 0
        self._p = _Parts()

    def add(self, logits, targets: np.ndarray) -> None:
        """Score one batch. ``logits`` is a torch tensor [n, vocab] (any float dtype, any device); it may be
        overwritten in place (callers hand over buffers they no longer need)."""
        import torch

        with torch.inference_mode():
            self._add(logits, targets)

    def _add(self, logits, targets: np.ndarray) -> None:
        import torch

        n = int(targets.shape[0])
        if logits.shape != (n, self.n_vocab):
            raise BadInput(f"logits of shape {tuple(logits.shape)} for {n} targets and vocab {self.n_vocab}")
        if logits.dtype != torch.float32:
            logits = logits.float()
        dev = logits.device
        tgt = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.int64)).to(dev)
        lse = torch.logsumexp(logits, dim=-1)
        nll = lse.double() - logits.gather(1, tgt[:, None]).squeeze(1).double()
        self._p.nll.append(nll.cpu().numpy())
        self._p.targets.append(np.asarray(targets, dtype=np.int32))
        if self.record_top_k is not None:
            self._record(logits, lse)
        if self.base is not None:
            self._compare(logits, lse, nll, targets)
        self.count += n

    def _rest_logp(self, logits, ids, lse):
        """log of the probability mass outside ``ids``, per row (destroys those entries of ``logits``)."""
        import torch

        logits.scatter_(1, ids, float("-inf"))
        return torch.logsumexp(logits, dim=-1) - lse

    def _record(self, logits, lse) -> None:
        topv, topi = logits.topk(self.record_top_k, dim=-1, sorted=True)
        logp = topv - lse[:, None]
        rest = self._rest_logp(logits, topi, lse)
        self._p.topk_ids.append(topi.cpu().numpy().astype(np.int32))
        self._p.topk_logp.append(logp.cpu().numpy().astype(np.float32))
        self._p.log_rest.append(rest.cpu().numpy().astype(np.float32))

    def _compare(self, logits, lse, nll, targets: np.ndarray) -> None:
        import torch

        base = self.base
        assert base is not None
        lo, hi = self.count, self.count + int(targets.shape[0])
        if hi > base.n:
            raise BadInput(f"the run scores more tokens than the base record holds ({base.n})")
        if not np.array_equal(np.asarray(base.targets[lo:hi]), targets):
            raise BadInput("the evaluated tokens differ from the base's: different tokenizer or text")
        dev = logits.device
        ids = torch.from_numpy(np.array(base.topk_ids[lo:hi], dtype=np.int64)).to(dev)
        logp_b = torch.from_numpy(np.array(base.topk_logp[lo:hi], dtype=np.float32)).to(dev).double()
        rest_b = torch.from_numpy(np.array(base.log_rest[lo:hi], dtype=np.float32)).to(dev).double()
        top_q = logits.argmax(dim=-1)
        logq = logits.gather(1, ids).double() - lse.double()[:, None]
        kld = (logp_b.exp() * (logp_b - logq)).sum(dim=-1)
        rest_q = self._rest_logp(logits, ids, lse).double()
        # The tail bucket: p_rest_b * log(p_rest_b / q_rest); nothing when the base had no mass left.
        tail = torch.where(torch.isfinite(rest_b), rest_b.exp() * (rest_b - rest_q), torch.zeros_like(rest_b))
        kld = kld + tail
        nll_b = torch.from_numpy(np.array(base.nll[lo:hi], dtype=np.float64)).to(dev)
        p_diff = torch.exp(-nll) - torch.exp(-nll_b)
        self._p.kld.append(kld.cpu().numpy())
        self._p.p_diff.append(p_diff.cpu().numpy())
        self._p.same_top.append((top_q == ids[:, 0]).cpu().numpy())

    # ------------------------------------------------------------------------------------------ results

    @property
    def nll(self) -> np.ndarray:
        return _cat(self._p.nll, np.float64)

    @property
    def targets(self) -> np.ndarray:
        return _cat(self._p.targets, np.int32)

    def kld_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _cat(self._p.kld, np.float64), _cat(self._p.p_diff, np.float64), _cat(self._p.same_top, bool)

    def base_record(self, tokens: np.ndarray, header: dict) -> BaseLogits:
        if self.record_top_k is None:
            raise BadInput("this run did not record top-k log-probs")
        k = self.record_top_k
        return BaseLogits(
            header=header,
            tokens=np.asarray(tokens, dtype=np.int32),
            targets=self.targets,
            nll=self.nll.astype(np.float32),
            topk_ids=_cat(self._p.topk_ids, np.int32, k),
            topk_logp=_cat(self._p.topk_logp, np.float32, k),
            log_rest=_cat(self._p.log_rest, np.float32),
        )
