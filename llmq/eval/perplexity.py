"""Perplexity and KL divergence: llama-perplexity's chunked protocol and transformers' strided sliding window.

Protocols (token windows and the positions each one scores) are plain data computed from the token stream, so
the torch and llama.cpp backends run exactly the same windows:

* ``llamacpp`` (default): non-overlapping chunks of ``ctx`` tokens; when the vocabulary adds a BOS token the first
  token of every chunk is replaced by BOS; the logits of positions ctx/2 .. ctx-2 score the tokens after them
  (tools/perplexity/perplexity.cpp, ``perplexity``). At least 2*ctx tokens are required, as there.
* ``strided``: windows of ``ctx`` tokens starting every ``stride`` tokens; each window scores only the tokens
  no earlier window scored (the transformers perplexity guide).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from llmq.errors import BadInput, CalibrationError
from llmq.eval.kld import BaseLogits, Estimate, KLDStats, kld_stats, ppl_estimate, read_base_logits
from llmq.eval.scoring import Scorer
from llmq.progress import Progress  # (stage, tokens done, tokens total)
from llmq.progress import no_progress as _no_progress


@dataclass(frozen=True)
class PerplexityConfig:
    """How to evaluate. ``stride=None`` selects llama-perplexity's protocol, an int the strided window."""

    dataset: str = "wikitext2"
    ctx: int = 512
    chunks: int | None = None  # at most this many windows (all when None)
    stride: int | None = None
    batch: int | None = None  # windows per forward pass (backend default when None)
    backend: str | None = None  # "torch" | "llamacpp" | None (from the input)
    device: str = "cpu"
    dtype: str | None = None  # torch compute dtype (float32 on CPU by default)
    threads: int | None = None
    top_k: int = 64  # log-probs kept per token of a base
    version: int = 1

    def __post_init__(self) -> None:
        if self.ctx < 4:
            raise BadInput(f"--ctx must be at least 4, got {self.ctx}")
        if self.chunks is not None and self.chunks < 1:
            raise BadInput(f"--chunks must be positive, got {self.chunks}")
        if self.stride is not None and not 1 <= self.stride <= self.ctx:
            raise BadInput(f"--stride must be between 1 and --ctx ({self.ctx}), got {self.stride}")
        if self.batch is not None and self.batch < 1:
            raise BadInput(f"--batch must be positive, got {self.batch}")
        if self.threads is not None and self.threads < 1:
            raise BadInput(f"--threads must be positive, got {self.threads}")
        if self.top_k < 1:
            raise BadInput(f"--top-k must be positive, got {self.top_k}")

    @property
    def protocol(self) -> str:
        return "llamacpp" if self.stride is None else "strided"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PerplexityConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def protocol_key(self) -> dict[str, Any]:
        """What must match between a base record and a run compared with it."""
        return {"protocol": self.protocol, "ctx": self.ctx, "stride": self.stride, "chunks": self.chunks}


# ---------------------------------------------------------------------------------------------- protocols


@dataclass(frozen=True)
class Group:
    """Consecutive windows of one shape that score the same positions: one or more forward passes."""

    windows: np.ndarray  # int32 [n, length], with any BOS substitution applied
    start: int  # first position whose logits score a token
    stop: int  # one past the last such position
    targets: np.ndarray  # int32 [n, stop-start]: the tokens those positions predict


def llamacpp_windows(tokens: np.ndarray, ctx: int, chunks: int | None, bos_id: int | None) -> list[Group]:
    """llama-perplexity's chunks. ``bos_id`` is set when the vocabulary adds BOS (it replaces token 0)."""
    n_tok = int(tokens.size)
    if n_tok < 2 * ctx:
        raise CalibrationError(
            f"the text tokenizes to {n_tok} tokens; llama.cpp's protocol needs at least {2 * ctx} (2 x --ctx)"
        )
    n_chunk = n_tok // ctx if chunks is None else min(chunks, n_tok // ctx)
    windows = tokens[: n_chunk * ctx].reshape(n_chunk, ctx).copy()
    first = ctx // 2
    targets = windows[:, first + 1 :].copy()
    if bos_id is not None:
        windows[:, 0] = bos_id
    return [Group(windows, first, ctx - 1, targets)]


def strided_windows(tokens: np.ndarray, ctx: int, stride: int, chunks: int | None) -> list[Group]:
    """The transformers guide: window [begin, begin+ctx) every ``stride`` tokens, scoring the new tokens."""
    n_tok = int(tokens.size)
    if n_tok < 2:
        raise CalibrationError(f"the text tokenizes to {n_tok} tokens; the strided protocol needs at least 2")
    groups: list[Group] = []
    prev_end = 0
    count = 0
    for begin in range(0, n_tok, stride):
        end = min(begin + ctx, n_tok)
        trg_len = end - prev_end
        win = tokens[begin:end]
        # Labels at window offsets [len - trg_len, len) are scored, except offset 0 which nothing predicts.
        first_label = max(len(win) - trg_len, 1)
        start, stop = first_label - 1, len(win) - 1
        g = Group(win[None, :].copy(), start, stop, win[None, first_label:].copy())
        last = groups[-1] if groups else None
        if (
            last is not None
            and last.windows.shape[1] == len(win)
            and (last.start, last.stop) == (start, stop)
        ):
            groups[-1] = Group(
                np.concatenate([last.windows, g.windows]),
                start,
                stop,
                np.concatenate([last.targets, g.targets]),
            )
        else:
            groups.append(g)
        prev_end = end
        count += 1
        if end == n_tok or (chunks is not None and count >= chunks):
            break
    return groups


def make_windows(tokens: np.ndarray, config: PerplexityConfig, bos_id: int | None) -> list[Group]:
    if config.stride is None:
        return llamacpp_windows(tokens, config.ctx, config.chunks, bos_id)
    return strided_windows(tokens, config.ctx, config.stride, config.chunks)


def _batches(groups: list[Group], batch: int) -> Iterator[tuple[np.ndarray, int, int, np.ndarray]]:
    for g in groups:
        for i in range(0, g.windows.shape[0], batch):
            yield g.windows[i : i + batch], g.start, g.stop, g.targets[i : i + batch]


# ---------------------------------------------------------------------------------------------- text


def load_eval_text(spec: str) -> str:
    """Evaluation text: wikitext2 / pydocs / c4 / ... / a file, through llmq.calib (test split)."""
    from llmq.calib import load_text

    return load_text(spec, split="test")


def prepare_text(text: str) -> str:
    """llama-perplexity reads ``-f FILE`` and drops one trailing newline; do the same for equal tokens."""
    if not text.strip():
        raise CalibrationError("the evaluation text is empty")
    return text[:-1] if text.endswith("\n") else text


# ---------------------------------------------------------------------------------------------- running


@dataclass
class PerplexityResult:
    model: str
    backend: str
    config: dict[str, Any]
    n_scored: int  # tokens whose NLL enters the PPL
    n_evaluated: int  # tokens through the model
    ppl: Estimate
    nll_mean: float
    seconds: float
    tokens_per_s: float
    size_bytes: int
    n_params: int
    vocab_fingerprint: str
    kld: KLDStats | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.size_bytes / self.n_params if self.n_params else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bits_per_weight"] = self.bits_per_weight
        return d


def _check_base(base: BaseLogits, backend, fingerprint: str, config: PerplexityConfig) -> None:
    h = base.header
    if int(h.get("n_vocab", -1)) != backend.n_vocab or h.get("vocab_fingerprint") != fingerprint:
        raise BadInput(
            f"{backend.path}: its vocabulary ({backend.n_vocab} tokens, {fingerprint}) differs from the base's "
            f"({h.get('n_vocab')} tokens, {h.get('vocab_fingerprint')}); KL divergence needs the same tokenizer"
        )
    want = config.protocol_key()
    have = {k: h.get(k) for k in want}
    if have != want:
        raise BadInput(f"the base was recorded with {have}, this run uses {want}")


def evaluate(
    spec: str,
    config: PerplexityConfig,
    *,
    text: str | None = None,
    tokens: np.ndarray | None = None,
    base: BaseLogits | None = None,
    record_base: bool = False,
    progress: Progress = _no_progress,
) -> tuple[PerplexityResult, BaseLogits | None]:
    """Evaluate one model. Tokens come from ``tokens`` (a base's stream), else from ``text``/the dataset.

    With ``base``, KL statistics against it are computed; with ``record_base``, the run's top-k log-probs are
    returned as a :class:`BaseLogits` for later comparisons.
    """
    from llmq.eval.backends import open_backend

    be = open_backend(spec, backend=config.backend, ctx=config.ctx, batch=config.batch, device=config.device,
                      dtype=config.dtype, threads=config.threads)  # fmt: skip
    try:
        fingerprint = be.vocab_fingerprint()
        if base is not None:
            _check_base(base, be, fingerprint, config)
        if tokens is None:
            tokens = be.tokenize(prepare_text(text if text is not None else load_eval_text(config.dataset)))
        elif base is not None and text is not None:
            mine = be.tokenize(prepare_text(text))
            if not np.array_equal(mine, np.asarray(tokens)):
                raise BadInput(f"{spec} tokenizes the text differently from the base: mismatched tokenizers")
        tokens = np.asarray(tokens, dtype=np.int32)
        if tokens.size and int(tokens.max()) >= be.n_vocab:
            raise BadInput(f"token id {int(tokens.max())} is outside the vocabulary of {spec} ({be.n_vocab})")
        groups = make_windows(tokens, config, be.bos_id if be.add_bos else None)
        scorer = Scorer(be.n_vocab, record_top_k=config.top_k if record_base else None, base=base)
        n_eval = sum(g.windows.size for g in groups)
        batch = config.batch or be.default_batch
        done = 0
        progress(spec, 0, n_eval)
        t0 = time.perf_counter()
        for windows, start, stop, targets in _batches(groups, batch):
            logits = be.logits(windows, start, stop)
            scorer.add(logits, targets.reshape(-1))
            done += windows.size
            progress(spec, done, n_eval)
        seconds = time.perf_counter() - t0
        nll = scorer.nll
        kstats = None
        if base is not None:
            if scorer.count != base.n:
                raise BadInput(f"the run scored {scorer.count} tokens, the base {base.n}")
            kld, p_diff, same_top = scorer.kld_arrays()
            kstats = kld_stats(nll, np.asarray(base.nll), kld, p_diff, same_top)
        result = PerplexityResult(
            model=spec,
            backend=be.name,
            config=config.to_dict(),
            n_scored=int(nll.size),
            n_evaluated=int(n_eval),
            ppl=ppl_estimate(nll),
            nll_mean=float(nll.mean()),
            seconds=seconds,
            tokens_per_s=n_eval / seconds if seconds > 0 else float("inf"),
            size_bytes=be.size_bytes(),
            n_params=be.n_params(),
            vocab_fingerprint=fingerprint,
            kld=kstats,
        )
        record = None
        if record_base:
            header = dict(config.protocol_key(), model=spec, n_vocab=be.n_vocab, vocab_fingerprint=fingerprint,
                          dataset=config.dataset, backend=be.name)  # fmt: skip
            record = scorer.base_record(tokens, header)
        return result, record
    finally:
        be.close()


def compare(
    models: list[str],
    config: PerplexityConfig,
    *,
    base: str | None = None,
    save_base: str | Path | None = None,
    force: bool = False,
    text: str | None = None,
    progress: Progress = _no_progress,
) -> tuple[PerplexityResult | None, list[PerplexityResult]]:
    """Evaluate ``models``; with ``base`` (a model or a saved base-logits file) also their KL divergence.

    Returns (the base's result when the base is a model, the models' results). ``save_base`` writes the
    compact base record (of ``base``, or of the first model when there is no base).
    """
    from llmq.eval.kld import MAGIC, write_base_logits

    if not models:
        raise BadInput("give at least one model to evaluate")
    if save_base is not None:
        from llmq.io.base import check_output

        check_output(save_base, force)
    record: BaseLogits | None = None
    base_result: PerplexityResult | None = None
    if base is not None and Path(base).is_file() and Path(base).open("rb").read(len(MAGIC)) == MAGIC:
        record = read_base_logits(base)
        if save_base is not None:
            raise BadInput("--base is already a saved base-logits file; nothing to save")
        config = _config_from_base(config, record)
    elif base is not None:
        text = text if text is not None else load_eval_text(config.dataset)
        base_result, record = evaluate(base, config, text=text, record_base=True, progress=progress)
    results: list[PerplexityResult] = []
    for i, spec in enumerate(models):
        if record is None and save_base is not None and i == 0:
            res, record = evaluate(spec, config, text=text, record_base=True, progress=progress)
            results.append(res)
            continue
        tokens = np.asarray(record.tokens) if record is not None else None
        res, _ = evaluate(spec, config, text=text, tokens=tokens, base=record if base is not None else None,
                          progress=progress)  # fmt: skip
        results.append(res)
    if save_base is not None and record is not None:
        write_base_logits(save_base, record, force=force)
    return base_result, results


def _config_from_base(config: PerplexityConfig, record: BaseLogits) -> PerplexityConfig:
    """A saved base fixes the protocol: take it from the file, refuse an explicit conflicting one."""
    h = record.header
    want = {"ctx": int(h["ctx"]), "stride": h.get("stride"), "chunks": h.get("chunks")}
    defaults = PerplexityConfig()
    for key, value in want.items():
        mine = getattr(config, key)
        if mine != value and mine != getattr(defaults, key):
            raise BadInput(f"--{key} {mine} conflicts with the base-logits file ({key}={value})")
    return replace(config, **want)
