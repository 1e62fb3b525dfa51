"""KL divergence against a base model: the compact base-logits file and llama-perplexity's statistics.

llama-perplexity's ``--kl-divergence-base`` dumps every log-probability of every scored token (uint16, tens of
GiB for a large vocabulary). llmq keeps, per scored token, the base model's top-k token ids and log-probs, the
log of the probability mass left outside the top k, the target token and its NLL. KL(base || Q) is then the
exact sum over the top k plus the tail treated as one bucket, which is a lower bound of the full-vocabulary
value (log-sum inequality) and equal to it when the tail is negligible; llama.cpp itself drops every term whose
base log-prob is below -16, so both are truncations of the same sum.

The statistics and their standard errors follow tools/perplexity/perplexity.cpp (``kl_divergence``).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmq.errors import BadInput, CorruptFile

MAGIC = b"LLMQKLD\0"
VERSION = 1
_ALIGN = 64
_MAX_HEADER = 1 << 20  # a header is a small JSON document; anything larger is not ours
_PREFIX = struct.Struct("<8sII")  # magic, version, header length


@dataclass
class BaseLogits:
    """The reference distribution of a base model over the scored tokens of one protocol run."""

    header: dict[str, Any]  # protocol, ctx, stride, chunks, n_vocab, top_k, vocab fingerprint, model, ...
    tokens: np.ndarray  # int32 [n_tokens]: the evaluated token stream (before any per-chunk BOS substitution)
    targets: np.ndarray  # int32 [n]: the token predicted at each scored position
    nll: np.ndarray  # float32 [n]: base NLL of the target
    topk_ids: np.ndarray  # int32 [n, k], most probable first
    topk_logp: np.ndarray  # float32 [n, k]
    log_rest: np.ndarray  # float32 [n]: log of the base probability outside the top k (-inf when none)

    @property
    def n(self) -> int:
        return int(self.targets.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.topk_ids.shape[1])

    def arrays(self) -> list[tuple[str, np.ndarray]]:
        return [
            ("tokens", self.tokens),
            ("targets", self.targets),
            ("nll", self.nll),
            ("topk_ids", self.topk_ids),
            ("topk_logp", self.topk_logp),
            ("log_rest", self.log_rest),
        ]


_DTYPES = {
    "tokens": np.int32,
    "targets": np.int32,
    "nll": np.float32,
    "topk_ids": np.int32,
    "topk_logp": np.float32,
    "log_rest": np.float32,
}


def _pad(n: int) -> int:
    return (-n) % _ALIGN


def write_base_logits(path: str | Path, base: BaseLogits, force: bool = False) -> Path:
    """Write ``base`` atomically: prefix, JSON header (with array shapes), then 64-byte aligned arrays."""
    from llmq.io.base import AtomicOutput, check_output

    out = check_output(path, force)
    shapes = {name: list(arr.shape) for name, arr in base.arrays()}
    header = dict(base.header, version=VERSION, arrays=shapes, top_k=base.top_k, n_scored=base.n)
    blob = json.dumps(header, sort_keys=True).encode()
    with AtomicOutput(out, is_dir=False, force=force) as tmp, open(tmp, "wb") as f:
        f.write(_PREFIX.pack(MAGIC, VERSION, len(blob)))
        f.write(blob)
        f.write(b"\0" * _pad(_PREFIX.size + len(blob)))
        for name, arr in base.arrays():
            data = np.ascontiguousarray(arr, dtype=_DTYPES[name])
            f.write(data.tobytes())
            f.write(b"\0" * _pad(data.nbytes))
    return out


def read_base_logits(path: str | Path) -> BaseLogits:
    """Read a file written by :func:`write_base_logits`; every size is checked against the file length."""
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"base logits file not found: {p}")
    size = p.stat().st_size
    with open(p, "rb") as f:
        prefix = f.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size:
            raise CorruptFile(f"{p}: too short to be an llmq base-logits file")
        magic, version, hlen = _PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise CorruptFile(f"{p}: not an llmq base-logits file (bad magic)")
        if version != VERSION:
            raise CorruptFile(f"{p}: base-logits file version {version}, this llmq reads version {VERSION}")
        if hlen > _MAX_HEADER or _PREFIX.size + hlen > size:
            raise CorruptFile(f"{p}: header length {hlen} out of range")
        try:
            header = json.loads(f.read(hlen))
            shapes = {k: tuple(int(d) for d in v) for k, v in header["arrays"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptFile(f"{p}: unreadable header ({e})") from e
    offset = _PREFIX.size + hlen + _pad(_PREFIX.size + hlen)
    arrays: dict[str, np.ndarray] = {}
    for name, dtype in _DTYPES.items():
        shape = shapes.get(name)
        if shape is None or any(d < 0 for d in shape):
            raise CorruptFile(f"{p}: header lacks a valid shape for {name!r}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if offset + nbytes > size:
            raise CorruptFile(f"{p}: truncated ({name} runs past the end of the file)")
        arrays[name] = (
            np.memmap(p, dtype=dtype, mode="r", offset=offset, shape=shape)
            if nbytes
            else np.zeros(shape, dtype)
        )
        offset += nbytes + _pad(nbytes)
    base = BaseLogits(header=header, **arrays)
    n = base.n
    if not (base.nll.shape == (n,) and base.log_rest.shape == (n,) and base.topk_ids.shape[0] == n
            and base.topk_logp.shape == base.topk_ids.shape):  # fmt: skip
        raise CorruptFile(f"{p}: inconsistent array shapes {shapes}")
    return base


# ---------------------------------------------------------------------------------------------- statistics


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    """Mean and standard error exactly as perplexity.cpp's ``mean_and_uncertainty`` (0 below 11 samples)."""
    n = x.size
    if n < 1:
        return 0.0, 0.0
    f = float(x.sum() / n)
    df = float((x * x).sum() / n - f * f)
    return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)


def _cov(a: np.ndarray, b: np.ndarray) -> float:
    n = a.size
    if n < 10:
        return 0.0
    return float(((a * b).sum() / n - (a.sum() / n) * (b.sum() / n)) / (n - 1))


def _percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """perplexity.cpp's linear interpolation between order statistics."""
    v = sorted_values
    if fraction <= 0:
        return float(v[0])
    if fraction >= 1:
        return float(v[-1])
    p = fraction * (v.size - 1)
    ip = int(p)
    p -= ip
    return float((1 - p) * v[ip] + p * v[min(ip + 1, v.size - 1)])


def _quantile_se(sorted_values: np.ndarray, fraction: float) -> float:
    """Distribution-free standard error of a sample quantile: half the spread of the order statistics
    one binomial sigma either side (llama-perplexity prints no uncertainty for its percentiles)."""
    n = sorted_values.size
    d = math.sqrt(fraction * (1 - fraction) / n)
    lo = _percentile(sorted_values, max(0.0, fraction - d))
    hi = _percentile(sorted_values, min(1.0, fraction + d))
    return 0.5 * (hi - lo)


@dataclass(frozen=True)
class Estimate:
    value: float
    se: float

    def __str__(self) -> str:
        return f"{self.value:.6g} ± {self.se:.2g}"


@dataclass(frozen=True)
class KLDStats:
    """What llama-perplexity --kl-divergence reports, each value with its standard error."""

    n: int
    ppl: Estimate
    ppl_base: Estimate
    ppl_ratio: Estimate  # mean PPL(Q)/PPL(base)
    ln_ppl_ratio: Estimate
    ppl_diff: Estimate  # PPL(Q) - PPL(base)
    cor_ln_ppl: float
    kld_mean: Estimate
    kld_median: Estimate
    kld_p99: Estimate
    kld_p999: Estimate
    kld_max: float
    dp_mean: Estimate
    dp_rms: Estimate
    same_top: Estimate  # fraction of tokens whose argmax agrees with the base's

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def kld_stats(nll: np.ndarray, nll_base: np.ndarray, kld: np.ndarray, p_diff: np.ndarray,
              same_top: np.ndarray) -> KLDStats:  # fmt: skip
    """Aggregate per-token values the way perplexity.cpp's ``kl_divergence`` does."""
    n = int(nll.size)
    if n < 2:
        raise BadInput("KL divergence needs at least 2 scored tokens")
    a = nll.astype(np.float64)
    b = nll_base.astype(np.float64)
    lq, lb = _mean_se(a), _mean_se(b)
    cov = _cov(a, b)
    ppl, ppl_b = math.exp(lq[0]), math.exp(lb[0])
    ln_ratio = lq[0] - lb[0]
    ln_ratio_se = math.sqrt(max(lq[1] ** 2 + lb[1] ** 2 - 2 * cov, 0.0))
    ratio = math.exp(ln_ratio)
    ppl_se, ppl_b_se = ppl * lq[1], ppl_b * lb[1]
    diff_se = math.sqrt(max(ppl_se**2 + ppl_b_se**2 - 2 * ppl * ppl_b * cov, 0.0))
    cor = cov / (lq[1] * lb[1]) if lq[1] > 0 and lb[1] > 0 else float("nan")

    k = kld.astype(np.float64)
    ks = np.sort(kld.astype(np.float32))  # perplexity.cpp sorts float values
    median = float(0.5 * (ks[n // 2] + ks[n // 2 - 1])) if n % 2 == 0 else float(ks[n // 2])
    pd = p_diff.astype(np.float64)
    mse = _mean_se(pd * pd)
    rms = math.sqrt(mse[0])
    top = float(np.count_nonzero(same_top)) / n
    return KLDStats(
        n=n,
        ppl=Estimate(ppl, ppl_se),
        ppl_base=Estimate(ppl_b, ppl_b_se),
        ppl_ratio=Estimate(ratio, ratio * ln_ratio_se),
        ln_ppl_ratio=Estimate(ln_ratio, ln_ratio_se),
        ppl_diff=Estimate(ppl - ppl_b, diff_se),
        cor_ln_ppl=cor,
        kld_mean=Estimate(*_mean_se(k)),
        kld_median=Estimate(median, _quantile_se(ks, 0.5)),
        kld_p99=Estimate(_percentile(ks, 0.99), _quantile_se(ks, 0.99)),
        kld_p999=Estimate(_percentile(ks, 0.999), _quantile_se(ks, 0.999)),
        kld_max=float(ks[-1]),
        dp_mean=Estimate(*_mean_se(pd)),
        dp_rms=Estimate(rms, 0.5 / rms * mse[1] if rms > 0 else 0.0),
        same_top=Estimate(top, math.sqrt(top * (1 - top) / (n - 1))),
    )


def ppl_estimate(nll: np.ndarray) -> Estimate:
    """PPL ± its standard error, as llama-perplexity's final estimate (no minimum sample count there)."""
    x = nll.astype(np.float64)
    n = x.size
    mean = float(x.sum() / n)
    var = float((x * x).sum() / n - mean * mean)
    ppl = math.exp(mean)
    return Estimate(ppl, ppl * math.sqrt(var / (n - 1)) if var > 0 and n > 1 else 0.0)
