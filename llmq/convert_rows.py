"""The converter's per-tensor work: row transforms (q/k permutation, casts, Gemma's norm shift), encoders, and the
slice pipeline that streams tensors from one format into the other.

:class:`PlannedTensor` is one HF → GGUF tensor of the converter's plan; its :meth:`~PlannedTensor.float_rows`
reads any range of GGUF rows straight from the safetensors file (the ``gguf`` quantizer's encoders read an HF
directory through it, with no intermediate file). :func:`write_all` streams whole tensors in row slices for
``llmq convert``, both directions.
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from llmq.archs import permute_qk
from llmq.errors import UnsupportedType
from llmq.io.base import TensorInfo
from llmq.io.ggml_types import is_block_type
from llmq.io.rows import PLAIN_FLOAT, from_float32, map_rows, read_rows, row_chunks, to_float32
from llmq.progress import Progress


def encode(data: np.ndarray, ggml_type: str) -> np.ndarray:
    """float32 data → the bytes of ``ggml_type``: F32/F16/BF16 exact casts, Q8_0 by the GGUF block encoder."""
    if ggml_type in PLAIN_FLOAT:
        return from_float32(data, ggml_type)
    if ggml_type == "Q8_0":
        from llmq.quant.gguf.blocks import quantize

        return quantize(data.reshape(-1, data.shape[-1]), "Q8_0", threads=1)
    raise UnsupportedType(f"the converter cannot write {ggml_type}; use `llmq quantize --method gguf`")


@dataclass(frozen=True)
class PlannedTensor:
    """One GGUF tensor of an HF → GGUF conversion: its HF source, its GGUF name/type/shape, and the transform
    (q/k rotary permutation over ``heads``, Gemma's norm ``shift``) that turns the source's values into it."""

    src: TensorInfo
    target: TensorInfo
    heads: int | None
    shift: np.float32 | None

    def float_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the GGUF tensor as float32 (rows of the last dimension), read from the HF file:
        only the source rows they come from are touched (gathered through the permutation)."""
        if self.heads and len(self.src.shape) >= 2:
            raw = map_rows(self.src)[qk_source_rows(self.src.shape[0], self.heads, start, stop)]
        elif self.heads:  # a 1-D bias: one row
            raw = permute_qk(read_rows(self.src), self.heads).reshape(1, -1)[start:stop]
        else:
            raw = read_rows(self.src, start, stop)
        return transform(raw, self.src.dtype, self.shift)


def transform(
    raw: np.ndarray, dtype: str, shift: np.float32 | None, permute=None, n_heads: int = 0
) -> np.ndarray:
    """Raw source rows of ``dtype`` → float32 values of the other format: (un)permuted over ``n_heads`` whole
    heads, then shifted (Gemma's norms)."""
    x = to_float32(raw, dtype)
    if n_heads:
        x = permute(x, n_heads)
    if shift is not None:
        x = x + shift
    return x


def qk_source_rows(rows: int, heads: int, start: int, stop: int) -> np.ndarray:
    """The HF row of each GGUF row in [start, stop) of a q/k projection (the inverse map of :func:`permute_qk`):
    within a head of ``hd`` rows, GGUF row 2i + j holds HF row j·hd/2 + i."""
    r = np.arange(start, stop)
    hd = rows // heads
    o = r % hd
    return r - o + (o % 2) * (hd // 2) + o // 2


@functools.lru_cache(maxsize=1)
def bf16_to_f16_table() -> np.ndarray:
    """All 65,536 bf16 bit patterns → float16 bits, by the exact path (bf16 → f32 exactly → f16 round to nearest
    even). Casting by lookup is 5x faster than through float32 and gives the same bits."""
    allbits = np.arange(1 << 16, dtype=np.uint32)
    with np.errstate(over="ignore"):
        return (allbits << 16).view(np.float32).astype(np.float16).view(np.uint16)


@dataclass
class Job:
    info: TensorInfo  # source tensor
    name: str  # output name
    heads: int | None  # rotary heads to (un)permute over, for q/k
    shift: np.float32 | None  # added to the values (Gemma's norm offset)
    encode: Callable[[np.ndarray], np.ndarray]
    progress_bytes: int
    target: str = ""  # output element type when it is a plain type (F32/F16/BF16)

    def raw_path(self) -> Callable[[np.ndarray], np.ndarray] | None:
        """A cast that never materialises float32: a copy when the types agree, a table for bf16 → f16."""
        if self.shift is not None or is_block_type(self.info.dtype):
            return None
        if self.info.dtype == self.target:
            return lambda raw: raw
        if (self.info.dtype, self.target) == ("BF16", "F16"):
            table = bf16_to_f16_table()
            return lambda raw: table[raw]
        return None


def write_all(w, reader, jobs: list[Job], permute, progress: Progress, total: int) -> None:
    """Every tensor as encoded slices of rows (whole rotary heads for q/k), converted by a small thread pool a
    few slices ahead of the writer: numpy's casts release the GIL, so conversion runs on every core while the
    main thread writes in order. Memory holds a few slices, never a whole tensor."""
    work: list[tuple[int, int, int]] = []  # (job index, first row, end row)
    counts = [0] * len(jobs)
    for k, job in enumerate(jobs):
        per_head = job.info.shape[0] // job.heads if job.heads else 1
        for start, stop in row_chunks(job.info, per_head):
            work.append((k, start, stop))
            counts[k] += 1

    fast = [job.raw_path() for job in jobs]

    def convert_slice(item: tuple[int, int, int]) -> np.ndarray:
        k, start, stop = item
        job = jobs[k]
        raw = reader.read_rows(job.info.name, start, stop)
        n_heads = (stop - start) * job.heads // job.info.shape[0] if job.heads else 0
        if fast[k] is not None:  # the permutation only moves rows: it applies to raw elements as well
            return fast[k](permute(raw, n_heads) if n_heads else raw)
        return job.encode(transform(raw, job.info.dtype, job.shift, permute, n_heads))

    _return_big_blocks_to_os()
    workers = max(1, min(4, os.cpu_count() or 1))
    done = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = _in_order(pool, convert_slice, work, lookahead=2 * workers)
        for k, job in enumerate(jobs):
            w.write(job.name, itertools.islice(results, counts[k]))
            done += job.progress_bytes
            progress("convert", done, total)


def _return_big_blocks_to_os() -> None:
    """glibc raises its mmap threshold after the first big free, after which every slice buffer comes from a
    per-thread arena that keeps freed memory: resident memory would grow with the worker count. A fixed 4 MiB
    threshold keeps slice buffers mmapped, so each is returned to the OS when dropped."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc (musl, ...): its allocator returns big blocks anyway
        return


def _in_order(pool: ThreadPoolExecutor, fn, items, lookahead: int) -> Iterator:
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= lookahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
