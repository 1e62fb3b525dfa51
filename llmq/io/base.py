"""Common types of the tensor IO layer. Importing this module must not import torch."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from llmq.errors import BadInput, CorruptFile, DiskFull, OutputExists
from llmq.io import temporaries

# Plain (non-block) element types: name -> bytes per element. Names follow safetensors' dtype codes, which are
# also ggml's names for the types both know (F32, F16, BF16, I8, ...).
ELEMENT_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip

TORCH_DTYPE_NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
    "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip


def torch_dtype(code: str):
    import torch

    try:
        return getattr(torch, TORCH_DTYPE_NAMES[code])
    except KeyError:
        raise BadInput(f"dtype {code} has no torch equivalent") from None


def dtype_code(torch_dtype_) -> str:
    name = str(torch_dtype_).removeprefix("torch.")
    for code, tname in TORCH_DTYPE_NAMES.items():
        if tname == name:
            return code
    raise BadInput(f"unsupported torch dtype {torch_dtype_}")


DEFAULT_SHARD_BYTES = 5 * 1000**3  # what transformers' save_pretrained used for years


def parse_size(value: str | int | None) -> int | None:
    """'5GB', '500MB', '2GiB' or a byte count → bytes."""
    if value is None or isinstance(value, int):
        return value
    s = value.strip().upper()
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
             "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4, "B": 1}  # fmt: skip
    for unit, mul in units.items():
        if s.endswith(unit):
            num = s[: -len(unit)].strip()
            try:
                return int(float(num) * mul)
            except ValueError:
                break
    if s.isdigit():
        return int(s)
    raise BadInput(f"--max-shard-size {value!r} is not a size like 5GB, 500MB or 2GiB")


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor.

    ``shape`` is always in torch (row-major, outermost first) order, also for GGUF where the file stores it
    reversed. ``dtype`` is a safetensors dtype code or a ggml type name ("Q4_K", "Q8_0", ...).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    # where the bytes live: file path and absolute offset of the tensor data in it (None for planned tensors)
    file: str | None = None
    offset: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def bits_per_weight(self) -> float:
        return bits_per_weight(self.nbytes, self.numel)


def bits_per_weight(data_bytes: int, n_params: int) -> float:
    """llmq's one definition of bits per weight: tensor data bits over parameters (metadata, vocabulary, headers
    and alignment padding are not counted). 0.0 when there are no parameters."""
    return 8.0 * data_bytes / n_params if n_params else 0.0


def as_bytes(data) -> memoryview:
    """A numpy array or torch tensor's bytes, without a dtype round trip (bf16 has no numpy type)."""
    import numpy as np

    if isinstance(data, np.ndarray):
        return memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    import torch

    t = data.detach().contiguous().cpu()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def byte_chunks(data) -> Iterator[memoryview]:
    """``data`` is one array/tensor or an iterable of them (a tensor streamed in row slices)."""
    import numpy as np

    if isinstance(data, np.ndarray) or hasattr(data, "detach"):
        yield as_bytes(data)
        return
    for part in data:
        yield as_bytes(part)


def write_tensor(fh, name: str, data, expected: int) -> None:
    """Append a planned tensor's bytes to ``fh``; the byte count must equal the plan."""
    import numpy as np

    if (isinstance(data, np.ndarray) or hasattr(data, "detach")) and as_bytes(data).nbytes != expected:
        raise BadInput(f"tensor {name}: {as_bytes(data).nbytes} bytes given, {expected} planned")
    written = 0
    for chunk in byte_chunks(data):
        written += chunk.nbytes
        if written > expected:
            raise BadInput(f"tensor {name}: more than the {expected} planned bytes given")
        fh.write(chunk)
    if written != expected:
        raise BadInput(f"tensor {name}: {written} bytes given, {expected} planned")


def group_by_size(infos: Sequence[TensorInfo], max_bytes: int | None) -> list[list[TensorInfo]]:
    """Consecutive tensors packed into shards/splits of at most ``max_bytes`` (a bigger tensor gets its own)."""
    groups: list[list[TensorInfo]] = [[]]
    size = 0
    for t in infos:
        if max_bytes and groups[-1] and size + t.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    return groups


def fsync_close(fh) -> None:
    """Flush, fsync and close an output file: a renamed AtomicOutput is complete on disk, not only in cache."""
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one): llama.cpp's nthread default."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


class WriteBehind:
    """Starts the kernel's writeback of an output file while it is being written: an fdatasync on a background
    thread every ``every`` bytes, so the fsync at close (which makes the file durable, exactly as before) has
    only the tail left instead of the whole file, and the disk works while the producer computes."""

    def __init__(self, fh, every: int = 32 << 20):
        self.fh = fh
        self.every = every
        self._since = 0
        self._thread: threading.Thread | None = None
        self._error: OSError | None = None

    def wrote(self, nbytes: int) -> None:
        self._since += nbytes
        if self._since < self.every or (self._thread is not None and self._thread.is_alive()):
            return
        self.fh.flush()
        self._since = 0
        self._thread = threading.Thread(target=self._sync, args=(self.fh.fileno(),), daemon=True)
        self._thread.start()

    def _sync(self, fd: int) -> None:
        try:
            getattr(os, "fdatasync", os.fsync)(fd)
        except OSError as e:  # reported by close(), which fsyncs again anyway
            self._error = e

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        """Flush, fsync and close (fsync_close), after the background sync has finished."""
        self.join()
        if self._error is not None:
            self.fh.close()
            raise self._error
        fsync_close(self.fh)


def check_no_overlap(infos: Iterable[TensorInfo], file_name: str) -> None:
    """Untrusted headers: two tensors may not share bytes (a crafted file could alias weights)."""
    spans = sorted((t.offset or 0, (t.offset or 0) + t.nbytes, t.name) for t in infos if t.nbytes)
    for (_s0, e0, n0), (s1, _e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise CorruptFile(f"{file_name}: tensors {n0} and {n1} overlap")


class TensorTable:
    """What every reader shares: a name → TensorInfo table from the header(s), and a context manager."""

    path: Path
    _infos: dict[str, TensorInfo]

    def infos(self) -> Iterator[TensorInfo]:
        return iter(list(self._infos.values()))

    def names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise BadInput(f"{self.path.name}: no tensor named {name}") from None

    def close(self) -> None:
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CheckpointReader(Protocol):
    path: Path
    metadata: Mapping[str, Any]

    def infos(self) -> Iterator[TensorInfo]: ...

    def info(self, name: str) -> TensorInfo: ...

    def read(self, name: str, dequantize: bool = True): ...  # -> torch.Tensor

    def read_raw(self, name: str): ...  # -> numpy uint8/element array over mmap

    def close(self) -> None: ...


class CheckpointWriter(Protocol):
    def plan(self, infos: Sequence[TensorInfo], metadata: Mapping[str, Any]) -> None: ...

    def write(self, name: str, data) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


def check_output(path: str | os.PathLike, force: bool, inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Validate an output path before any work: never an input, never overwritten without ``force``."""
    out = Path(path)
    resolved = out.resolve()
    for src in inputs:
        s = Path(src).resolve()
        if resolved == s or s in resolved.parents or resolved in s.parents:
            raise BadInput(f"output {out} would overwrite or sit inside the input {src}")
    if out.exists() and not force:
        raise OutputExists(f"{out} already exists (use --force to overwrite)")
    parent = resolved.parent
    if not parent.exists():
        raise BadInput(f"output directory {parent} does not exist")
    temporaries.sweep(parent)  # what a killed earlier run left there goes now, before this one's work
    return out


class AtomicOutput:
    """A file or directory written under a temporary name beside its destination and renamed when complete.

    Use as a context manager: ``with AtomicOutput(dst, is_dir=True) as tmp: ...write into tmp...``. On an
    exception (an interruption included, see llmq.io.temporaries) the temporary is removed and the destination
    is left untouched; a full disk becomes :class:`DiskFull` naming the destination. The temporary's name
    records this process, so a later run can remove it should this process be killed (temporaries.sweep).
    """

    def __init__(self, dst: str | os.PathLike, is_dir: bool, force: bool = False):
        self.dst = Path(dst)
        self.is_dir = is_dir
        self.force = force
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.tmp = temporaries.create(self.dst, self.is_dir)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            temporaries.discard(self.tmp)
            if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
                raise disk_full(self.dst, exc) from exc
            return
        old: Path | None = None
        if self.dst.exists() or self.dst.is_symlink():
            if not self.force:
                temporaries.discard(self.tmp)
                raise OutputExists(f"{self.dst} already exists (use --force to overwrite)")
            if self.is_dir or self.dst.is_dir() or self.dst.is_symlink():
                # a directory cannot be replaced in one rename: move the old one aside under a registered
                # temporary name first, so an interruption leaves either the old or the new output
                old = temporaries.create(self.dst, is_dir=True)
                os.replace(self.dst, old / "old")
        os.chmod(self.tmp, 0o755 if self.is_dir else 0o644)
        temporaries.rename_into_place(self.tmp, self.dst)
        if old is not None:
            temporaries.discard(old)


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def disk_full(dst: Path, exc: OSError) -> DiskFull:
    where = f" ({exc.filename})" if exc.filename else ""
    return DiskFull(f"no space left on the device of {Path(dst).resolve().parent} while writing {dst}{where}; "
                    "nothing was written (free some space, or choose another output)")  # fmt: skip
