"""Hidden temporaries beside outputs: how they are named, one registry of the live ones, their removal when the
process is interrupted, and the sweep of those that a dead process left behind.

Every temporary llmq writes beside a destination is ``.<NAME>.llmq-tmp-<host>-<pid>-<random>`` (a file or a
directory): the process that owns it is in its name, so a later run can tell a live writer's temporary (left
alone) from a killed one's (removed, with a log record saying so). The one intended exception is the resume
directory of GPTQ/AWQ, ``.<NAME>.llmq-resume``: kept on purpose so that ``--resume`` can continue.

SIGINT, SIGTERM and SIGHUP: inside :func:`interrupts_unwind` (the CLI runs every command in it) they raise
:class:`llmq.errors.Interrupted` in the main thread, so every ``with`` block unwinds as on any error: atomic
outputs remove their temporaries, encoder processes are stopped. :func:`remove_live` then removes whatever is
still registered (a temporary created an instant before the signal). A second signal skips the unwinding.
Forked workers inherit the registry but never remove their parent's entries (each entry records its owner).
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llmq.errors import Interrupted

log = logging.getLogger("llmq")

TMP_TAG = ".llmq-tmp-"
RESUME_TAG = ".llmq-resume"
_NAME = re.compile(r"^\..*\.llmq-tmp-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-z_]+$")

_lock = threading.RLock()
_live: dict[Path, int] = {}  # temporary -> the pid of the process that created it
_atexit_installed = False


def _host_tag() -> str:
    # Processes of another machine writing to a shared directory are not ours to judge: the sweep only
    # considers temporaries of this host.
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def tmp_prefix(dst: Path) -> str:
    """The name prefix of this process's temporaries for ``dst`` (mkstemp/mkdtemp add the random part)."""
    return f".{dst.name}{TMP_TAG}{_host_tag()}-{os.getpid()}-"


def resume_dir(dst: str | os.PathLike) -> Path:
    """The resume directory of an output: GPTQ/AWQ's finished blocks, kept after an interruption on purpose."""
    dst = Path(dst)
    return dst.resolve().parent / f".{dst.name}{RESUME_TAG}"


def register(path: Path) -> None:
    global _atexit_installed
    with _lock:
        _live[Path(path)] = os.getpid()
        if not _atexit_installed:  # an uncaught exception or sys.exit also removes them
            atexit.register(remove_live)
            _atexit_installed = True


def unregister(path: Path) -> None:
    with _lock:
        _live.pop(Path(path), None)


def live() -> list[Path]:
    """This process's registered temporaries."""
    me = os.getpid()
    with _lock:
        return [p for p, pid in _live.items() if pid == me]


def remove_path(p: Path) -> None:
    """Remove a file or a directory tree (not following a symlink), whichever ``p`` is; absent is fine."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
        if p.exists():  # a file appeared meanwhile (a writer thread): once more
            shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def remove_live() -> list[Path]:
    """Remove every temporary this process registered and has not finished; returns those removed."""
    removed = []
    with _lock:
        for p in live():
            remove_path(p)
            if not p.exists() and not p.is_symlink():
                _live.pop(p, None)
                removed.append(p)
    return removed


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Create-and-register (or rename-and-unregister) as one step: a signal arriving in between waits until
    the step is done, so no temporary exists unregistered."""
    mask = {signal.SIGINT, signal.SIGTERM} | ({signal.SIGHUP} if hasattr(signal, "SIGHUP") else set())
    can = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, mask) if can else None
    try:
        yield
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def create(dst: Path, is_dir: bool) -> Path:
    """A new registered temporary beside ``dst`` (stale ones of dead processes there are swept first)."""
    parent = dst.resolve().parent
    sweep(parent)
    with _signals_deferred():
        if is_dir:
            tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(dst), dir=parent))
        else:
            fd, name = tempfile.mkstemp(prefix=tmp_prefix(dst), dir=parent)
            os.close(fd)
            tmp = Path(name)
        register(tmp)
    return tmp


def discard(tmp: Path) -> None:
    """Remove a temporary and forget it."""
    remove_path(tmp)
    unregister(tmp)


def rename_into_place(tmp: Path, dst: Path) -> None:
    """``tmp`` becomes ``dst`` and leaves the registry in one step (see _signals_deferred)."""
    with _signals_deferred():
        os.replace(tmp, dst)
        unregister(tmp)


@contextmanager
def temporary_dir(dst: str | os.PathLike) -> Iterator[Path]:
    """A scratch directory beside ``dst`` (for intermediate files), removed on exit whatever happens."""
    tmp = create(Path(dst), is_dir=True)
    try:
        yield tmp
    finally:
        discard(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return True
    return True


def sweep(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporaries in ``directory`` that processes of this host left when they died (killed -9,
    power loss); each removal is logged (the CLI prints it as a note). Live processes' temporaries, resume
    directories and names not written by this scheme are left alone."""
    d = Path(directory)
    try:
        entries = [e for e in os.scandir(d) if TMP_TAG in e.name]
    except OSError:
        return []
    host, me = _host_tag(), os.getpid()
    removed = []
    for e in entries:
        m = _NAME.match(e.name)
        if m is None or m["host"] != host:
            continue
        pid = int(m["pid"])
        if pid == me or _alive(pid):
            continue
        p = d / e.name
        remove_path(p)
        if not p.exists():
            removed.append(p)
            log.warning("removed %s, a temporary left by process %d, which is no longer running", p, pid)
    return removed


class _Interrupts:
    signum: int | None = None


@contextmanager
def interrupts_unwind() -> Iterator[_Interrupts]:
    """SIGINT/SIGTERM/SIGHUP raise Interrupted(signum) in the main thread while inside; a second signal
    removes the live temporaries and exits at once (128 + signum). Yields a record of the first signal."""
    state = _Interrupts()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    owner = os.getpid()

    def handler(signum: int, frame) -> None:
        if os.getpid() != owner:  # a forked worker: end quietly, the parent cleans up
            os._exit(128 + signum)
        if state.signum is not None:
            remove_live()
            os._exit(128 + signum)
        state.signum = signum
        raise Interrupted(signum)

    sigs = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    # a signal the caller ignores stays ignored (nohup's SIGHUP, SIGINT of a background job)
    previous = {s: signal.signal(s, handler) for s in sigs if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield state
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
