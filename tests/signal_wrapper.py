"""Run the llmq CLI, pausing at a chosen point so that a test can signal it mid-run (tests/test_signals.py).

    python signal_wrapper.py create:N -- ARGS...   pause right after the N-th temporary is created
    python signal_wrapper.py create:TEXT:N -- ...   the same, counting only temporaries whose name holds TEXT
    python signal_wrapper.py fsync:N -- ARGS...    pause at the N-th fsync of an output (complete, not renamed)
    python signal_wrapper.py after:MODULE:ATTR.PATH:N -- ARGS...   pause after the N-th call of that function

At the pause it prints ``PAUSED <pid> <path or fd>`` on stderr and sleeps; the test then sends its signal.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from llmq.io import temporaries

MAIN = os.getpid()
mode, _, spec = sys.argv[1].partition(":")
where, _, nth = spec.rpartition(":")
target = int(nth)
seen = 0


def _pause(what: object, text: str = "") -> None:
    global seen
    if os.getpid() != MAIN or threading.current_thread() is not threading.main_thread():
        return
    if text and text not in str(what):
        return
    seen += 1
    if seen == target:
        print(f"PAUSED {os.getpid()} {what}", file=sys.stderr, flush=True)
        time.sleep(120)  # the signal interrupts this (and the test fails on a timeout otherwise)


if mode == "create":
    _create = temporaries.create

    def create(dst, is_dir):
        tmp = _create(dst, is_dir)
        _pause(tmp.name, where)
        return tmp

    temporaries.create = create
elif mode == "fsync":
    _fsync = os.fsync

    def fsync(fd):
        _fsync(fd)
        _pause(f"fd {fd}")

    os.fsync = fsync
elif mode == "after":
    import functools
    import importlib

    module, _, path = where.partition(":")
    *owner_path, attr = path.split(".")
    owner = importlib.import_module(module)
    for name in owner_path:
        owner = getattr(owner, name)
    original = getattr(owner, attr)

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        _pause(path)
        return result

    setattr(owner, attr, wrapped)
else:
    raise SystemExit(f"unknown mode {mode}")

from llmq.cli.app import main  # noqa: E402  (after the patch, as the CLI would be imported by a user)

main(sys.argv[3:])
