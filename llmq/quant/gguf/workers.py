"""Where the GGUF block encoders run, and the pipeline that feeds them the rows of a whole file.

A job is a tensor's location plus a row range (never its data): whoever runs it reads those rows from the
memory-mapped source itself and hands back only the encoded bytes (at most 8.5 bits a weight). Three runners:

* forked worker processes (Linux, more than one thread): the encoders are numpy code making many small array
  calls, and two threads hand the GIL over on nearly every one of them, so that two threads together cost more
  CPU than one. Forked workers share nothing but the page cache and a shared-memory arena their bytes go to,
  and start in a millisecond (they inherit the imported modules: no interpreter start-up);
* a thread pool where fork is not available (or not safe: macOS);
* inline, in the caller, for one thread.

``encoded_tensors`` hands the jobs of many tensors out in file order, within a read-ahead budget, and gives each
tensor's bytes back in order, as a stream of parts the writer appends as they come.
"""

from __future__ import annotations

import mmap
import os
import pickle
import select
import signal
import socket
import struct
import sys
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from llmq.errors import LlmqError
from llmq.io.base import TensorInfo
from llmq.io.rows import PLAIN_FLOAT

# values per job: enough that a round trip to a worker (~0.1 ms) is noise, few enough that the workers finish
# within a few milliseconds of each other at the end of the file
JOB_VALUES = 1 << 20
# float32 bytes of the jobs handed out but not yet written: bounds the encoded bytes held, whatever the runner
READ_AHEAD_BYTES = 64 << 20
# the shared memory the worker processes write their bytes into (at least 4 of the largest job)
ARENA_BYTES = 16 << 20


@dataclass(frozen=True)
class EncodeJob:
    """Rows [start, stop) of ``src`` (rows are the last dimension) to be written as ``dst``; ``expert`` picks
    the imatrix slice of a 3-D (expert) tensor."""

    src: TensorInfo
    dst: str
    start: int
    stop: int
    expert: int = 0

    @property
    def in_bytes(self) -> int:
        return 4 * (self.stop - self.start) * (self.src.shape[-1] if self.src.shape else 1)

    @property
    def out_bytes(self) -> int:
        from llmq.quant.gguf.blocks import row_bytes

        n = self.src.shape[-1] if self.src.shape else 1
        per_row = n * (4 if self.dst == "F32" else 2) if self.dst in PLAIN_FLOAT else row_bytes(self.dst, n)
        return (self.stop - self.start) * per_row


def jobs_for(t: TensorInfo, dst: str, has_imatrix: bool, job_values: int | None = None) -> list[EncodeJob]:
    """The jobs that encode tensor ``t`` as ``dst``: row ranges of about ``job_values`` values, never across
    two experts when an imatrix (one slice per expert) is used."""
    from llmq.io.rows import n_rows

    n = t.shape[-1] if t.shape else 1
    rows = n_rows(t)
    per_group = (t.shape[-2] if len(t.shape) >= 2 else 1) if has_imatrix else max(1, rows)
    step = max(1, (job_values or JOB_VALUES) // max(1, n))
    jobs = []
    for e, g0 in enumerate(range(0, rows, per_group)):
        g1 = min(rows, g0 + per_group)
        jobs += [EncodeJob(t, dst, r0, min(g1, r0 + step), e) for r0 in range(g0, g1, step)]
    return jobs


RowReader = Callable[[TensorInfo, int, int], np.ndarray]


def mapped_rows(info: TensorInfo, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a tensor stored in a file, as float32, read from a memory map (as llama.cpp reads
    its input)."""
    from llmq.io.rows import map_rows, row_range, to_float32

    sub = row_range(info, start, stop)
    return to_float32(map_rows(sub), sub.dtype)


def encode(weights: Mapping[str, np.ndarray], job: EncodeJob, rows: RowReader = mapped_rows) -> np.ndarray:
    """Run one job: its rows read by ``rows`` (float32), encoded, as uint8."""
    from llmq.quant.gguf import blocks as gguf_blocks

    n = job.src.shape[-1] if job.src.shape else 1
    x = np.ascontiguousarray(rows(job.src, job.start, job.stop), dtype=np.float32).reshape(-1, n)
    if job.dst in PLAIN_FLOAT:
        return encode_plain(x, job.dst)
    qw = weights.get(job.src.name)
    if qw is not None:
        qw = qw[job.expert * n : (job.expert + 1) * n]
    return gguf_blocks.quantize(x, job.dst, qw, threads=1).reshape(-1)


def encode_plain(x: np.ndarray, dst_type: str) -> np.ndarray:
    from llmq.io.rows import from_float32

    return from_float32(x, dst_type).view(np.uint8).reshape(-1)


# ----------------------------------------------------------------------------------------------------------------
# Runners: submit(job) -> key, result(key) -> bytes (in any order of keys), close(abort)


class Runner(Protocol):
    def submit(self, job: EncodeJob) -> Any: ...
    def result(self, key: Any) -> np.ndarray: ...
    def release(self, key: Any) -> None: ...
    def close(self, abort: bool = False) -> None: ...


class InlineRunner:
    """Runs each job in the caller when its result is asked for (so nothing is read ahead)."""

    def __init__(self, fn: Callable[[EncodeJob], np.ndarray]):
        self.fn = fn

    def submit(self, job: EncodeJob) -> EncodeJob:
        return job

    def result(self, key: EncodeJob) -> np.ndarray:
        return self.fn(key)

    def release(self, key: EncodeJob) -> None:
        pass

    def close(self, abort: bool = False) -> None:
        pass


class ThreadRunner:
    def __init__(self, fn: Callable[[EncodeJob], np.ndarray], n: int):
        self.fn = fn
        self.pool = ThreadPoolExecutor(n)

    def submit(self, job: EncodeJob) -> Any:
        return self.pool.submit(self.fn, job)

    def result(self, key: Any) -> np.ndarray:
        return key.result()

    def release(self, key: Any) -> None:
        pass

    def close(self, abort: bool = False) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class WorkerError(LlmqError):
    """An encoder process died or sent something unreadable."""


class _RemoteTraceback(Exception):
    def __str__(self) -> str:
        return str(self.args[0])


_HEAD = struct.Struct("<Q")  # length of the pickled message that follows


def _send(sock: socket.socket, msg: Any) -> None:
    body = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEAD.pack(len(body)) + body)


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    while len(view):
        got = sock.recv_into(view)
        if not got:
            raise EOFError
        view = view[got:]
    return buf


def _recv(sock: socket.socket) -> Any:
    (n,) = _HEAD.unpack(_recv_exact(sock, _HEAD.size))
    return pickle.loads(_recv_exact(sock, n))


def _serve(sock: socket.socket, fn: Callable[[EncodeJob], np.ndarray], arena: mmap.mmap) -> int:
    """A worker's loop: (job, offset) in, the job's bytes written at ``offset`` of the shared arena, a short
    reply out; until the parent closes its end (or dies: same EOF)."""
    # Ctrl-C reaches the whole process group: it is the parent's to handle (it then closes our socket)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    while True:
        try:
            job, offset = _recv(sock)
        except (EOFError, OSError):
            return 0
        try:
            out = np.ascontiguousarray(fn(job)).reshape(-1).view(np.uint8)
            if out.nbytes != job.out_bytes:
                raise RuntimeError(f"{job.src.name}: {out.nbytes} bytes encoded, {job.out_bytes} expected")
            np.frombuffer(arena, np.uint8, out.nbytes, offset)[:] = out
            reply: tuple = ("ok", None, None)
        except Exception as e:
            try:
                pickle.loads(pickle.dumps(e))
            except Exception:
                e = RuntimeError(f"{type(e).__name__}: {e}")
            reply = ("error", e, traceback.format_exc())
        try:
            _send(sock, reply)
        except OSError:
            return 0


def fork_available() -> bool:
    """Workers are forked only on Linux: macOS's system libraries (Accelerate, libdispatch) are not fork-safe,
    and Windows has no fork."""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


class _Ring:
    """First-in first-out allocations in a buffer of ``size`` bytes: jobs are given space in the order they are
    handed out and give it back in the order they are written."""

    def __init__(self, size: int):
        self.size = size
        self.live: deque[tuple[int, int]] = deque()  # (offset, length), oldest first

    def alloc(self, n: int) -> int | None:
        """Where ``n`` bytes fit after the newest allocation (or wrapped to the start), None while they do not."""
        if not self.live:
            return 0 if n <= self.size else None
        tail = self.live[0][0]
        last, length = self.live[-1]
        head = last + length
        if last >= tail:  # one piece [tail, head): free are [head, size) and [0, tail)
            if head + n <= self.size:
                return head
            return 0 if n <= tail else None
        return head if head + n <= tail else None  # wrapped: free is [head, tail)

    def push(self, off: int, n: int) -> None:
        self.live.append((off, n))

    def pop(self) -> None:
        self.live.popleft()


class ForkRunner:
    """``n`` forked processes running ``fn``. Jobs go to whichever worker has the fewest outstanding (two at
    most, so none waits for the parent between jobs), each with the place in a shared memory arena where it
    writes its bytes: nothing but (job, offset) and a status crosses the sockets, and the writer writes straight
    from the arena. Fork before the caller starts any thread of its own (the writer's)."""

    DEPTH = 2

    def __init__(self, fn: Callable[[EncodeJob], np.ndarray], n: int, arena_bytes: int):
        self._socks: list[socket.socket] = []
        self._pids: list[int] = []
        self._sent: dict[socket.socket, deque[int]] = {}
        self._queue: deque[tuple[int, EncodeJob]] = deque()  # submitted, not yet handed to a worker
        self._where: dict[int, tuple[int, int]] = {}  # job -> its (offset, length) in the arena
        self._done: set[int] = set()
        self._next = 0
        self._arena = mmap.mmap(-1, arena_bytes)  # anonymous and shared: the workers inherit it
        self._ring = _Ring(arena_bytes)
        try:
            for _ in range(n):
                parent, child = socket.socketpair()
                pid = os.fork()
                if pid == 0:  # the worker: never returns into the caller's stack
                    code = 1
                    try:
                        for s in (*self._socks, parent):  # only the parent may hold the parent's ends
                            s.close()
                        code = _serve(child, fn, self._arena)
                    finally:
                        os._exit(code)
                child.close()
                self._socks.append(parent)
                self._pids.append(pid)
                self._sent[parent] = deque()
        except BaseException:
            self.close(abort=True)
            raise

    def submit(self, job: EncodeJob) -> int:
        key = self._next
        self._next += 1
        self._queue.append((key, job))
        self._dispatch()
        return key

    def _dispatch(self) -> None:
        while self._queue:
            sock = min(self._socks, key=lambda s: len(self._sent[s]))
            if len(self._sent[sock]) >= self.DEPTH:
                return
            key, job = self._queue[0]
            off = self._ring.alloc(job.out_bytes)
            if off is None:  # the arena is full of results not written yet
                return
            self._queue.popleft()
            self._ring.push(off, job.out_bytes)
            self._where[key] = (off, job.out_bytes)
            _send(sock, (job, off))
            self._sent[sock].append(key)

    def result(self, key: int) -> np.ndarray:
        """The bytes of job ``key``, a view of the arena valid until ``release(key)``."""
        while key not in self._done:
            busy = [s for s in self._socks if self._sent[s]]
            if not busy:
                raise RuntimeError(f"job {key} cannot be handed out (results not released?)")
            ready, _, _ = select.select(busy, [], [])
            for sock in ready:
                try:
                    status, err, tb = _recv(sock)
                except (EOFError, OSError, pickle.UnpicklingError):
                    raise WorkerError(f"an encoder process died ({self._exit_status(sock)})") from None
                done = self._sent[sock].popleft()
                if status == "error":
                    raise err from _RemoteTraceback(tb)
                self._done.add(done)
            self._dispatch()
        off, n = self._where[key]
        return np.frombuffer(self._arena, np.uint8, n, off)

    def release(self, key: int) -> None:
        """Give job ``key``'s space back (jobs are released in the order they were submitted)."""
        self._done.discard(key)
        del self._where[key]
        self._ring.pop()
        self._dispatch()

    def _exit_status(self, sock: socket.socket) -> str:
        pid = self._pids[self._socks.index(sock)]
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return "exit status unknown"
        if os.WIFSIGNALED(status):
            return f"killed by signal {os.WTERMSIG(status)}"
        return f"exit status {os.waitstatus_to_exitcode(status)}"

    def close(self, abort: bool = False) -> None:
        """Normally the workers are idle: closing their sockets ends them. On an error or Ctrl-C they may be
        in the middle of a job, which nobody will read: kill them. Either way wait for every one (no zombies)."""
        for s in self._socks:
            s.close()
        for pid in self._pids:
            if abort:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:  # already reaped (a died worker whose status was reported)
                pass
        self._socks, self._pids = [], []


def make_runner(weights: Mapping[str, np.ndarray], nthreads: int, largest_job_bytes: int = 0,
                rows: RowReader = mapped_rows) -> Runner:  # fmt: skip
    """The runner for ``nthreads``: forked processes where possible, else threads; inline for one.
    ``largest_job_bytes``: the most bytes one job writes (see :func:`largest_job_bytes`), for the arena;
    ``rows``: how a job's source rows are read as float32 (inherited by forked workers)."""
    import functools

    from llmq.quant.gguf import search as gguf_search

    fn = functools.partial(encode, weights, rows=rows)
    if nthreads <= 1:
        return InlineRunner(fn)
    if not fork_available():
        return ThreadRunner(fn, nthreads)
    gguf_search.warm_up()  # what the encoders compute once per process, computed once before the fork
    return ForkRunner(fn, nthreads, max(ARENA_BYTES, 4 * largest_job_bytes))


def largest_job_bytes(ordered: Sequence[TensorInfo], types: Mapping[str, str]) -> int:
    """The most output bytes of one job of :func:`encoded_tensors` (from the header alone)."""
    most = 0
    for t in ordered:
        if types[t.name] != t.dtype and t.numel:
            n = t.shape[-1] if t.shape else 1
            rows = min(t.numel // n, max(1, JOB_VALUES // n))
            most = max(most, EncodeJob(t, types[t.name], 0, rows).out_bytes)
    return most


# ----------------------------------------------------------------------------------------------------------------
# The pipeline


def encoded_tensors(ordered: Sequence[TensorInfo], types: Mapping[str, str], has_imatrix: Callable[[str], bool],
                    runner: Runner, read_raw: Callable[[str], np.ndarray],
                    read_ahead: int | None = None) -> Iterator[Iterator[np.ndarray] | np.ndarray]:  # fmt: skip
    """Each tensor of ``ordered`` as output bytes, in order: its source bytes where the type stays, else an
    iterator over the encoded parts (consume it before asking for the next tensor). Jobs of the tensors that
    follow are handed out while earlier ones are written, up to ``read_ahead`` float32 bytes. The caller owns
    ``runner`` (and closes it, with ``abort=True`` on an error)."""
    budget = READ_AHEAD_BYTES if read_ahead is None else read_ahead
    jobs = (
        (i, job)
        for i, t in enumerate(ordered)
        if types[t.name] != t.dtype
        for job in jobs_for(t, types[t.name], has_imatrix(t.name))
    )
    nxt = next(jobs, None)
    sent: deque[tuple[int, Any, int]] = deque()  # (tensor index, runner key, input bytes), in file order
    in_flight = 0

    def fill() -> None:
        nonlocal nxt, in_flight
        while nxt is not None and (not sent or in_flight + nxt[1].in_bytes <= budget):
            i, job = nxt
            sent.append((i, runner.submit(job), job.in_bytes))
            in_flight += job.in_bytes
            nxt = next(jobs, None)

    def parts(i: int) -> Iterator[np.ndarray]:
        nonlocal in_flight
        while True:
            fill()
            if not sent or sent[0][0] != i:
                return
            _, key, size = sent.popleft()
            out = runner.result(key)
            yield out  # written by the caller before it asks for the next part
            runner.release(key)
            in_flight -= size

    for i, t in enumerate(ordered):
        if types[t.name] == t.dtype:
            yield read_raw(t.name)
            continue
        it = parts(i)
        yield it
        for _ in it:  # a caller that skipped some parts: keep the queue in step
            pass
