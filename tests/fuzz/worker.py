"""Runs `llmq` command lines in forked children of one warm process (imports paid once), one per case.

Protocol: one JSON request per stdin line ``{"argv": [...], "timeout": s, "stderr": path}``; one JSON reply per
stdout line ``{"code", "stderr", "rss_growth", "cpu", "wall"}``. ``rss_growth`` is the child's peak RSS
(``wait4``'s ru_maxrss) minus this process's RSS at fork (psutil): what the command itself added. A child that
outlives ``timeout`` is killed by SIGALRM (code -14).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def _child(argv: list[str], timeout: float, stderr_path: str) -> int:
    fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    from llmq.cli.app import main

    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:  # noqa: BLE001 - reported as its own code, never swallowed silently
        sys.stderr.write(f"worker: uncaught {type(e).__name__}: {e}\n")
        code = 99
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def serve() -> None:
    import psutil

    import llmq.api  # noqa: F401 - warm: what every case imports
    import llmq.cli.app  # noqa: F401
    import llmq.io.gguf  # noqa: F401
    import llmq.io.safetensors  # noqa: F401

    proc = psutil.Process()
    for line in sys.stdin:
        req = json.loads(line)
        base = proc.memory_info().rss
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:
            code = 98
            try:
                code = _child(req["argv"], req["timeout"], req["stderr"])
            finally:
                os._exit(code & 0xFF)
        _, status, ru = os.wait4(pid, 0)
        wall = time.monotonic() - t0
        with open(req["stderr"], encoding="utf-8", errors="replace") as f:
            err = f.read()
        os.unlink(req["stderr"])
        reply = {"code": os.waitstatus_to_exitcode(status), "stderr": err, "wall": wall,
                 "rss_growth": ru.ru_maxrss * 1024 - base, "cpu": ru.ru_utime + ru.ru_stime}  # fmt: skip
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve()
