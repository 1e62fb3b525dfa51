"""The fuzz suite's client of tests/fuzz/worker.py and the checks every case must pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import REPO

DOCUMENTED_EXIT_CODES = {0, 1, 2, 3, 4, 5, 6}  # docs/cli.md; 70 (internal error) and signals are failures
MAX_RSS_GROWTH = 100 * 1024 * 1024
MAX_SECONDS = 5.0


@dataclass
class Result:
    code: int
    stderr: str
    rss_growth: int
    cpu: float
    wall: float

    def problems(self, allowed: set[int] = DOCUMENTED_EXIT_CODES) -> list[str]:
        """Why this case misbehaved (empty: it behaved)."""
        out = []
        if self.code not in allowed:
            out.append(f"exit code {self.code}")
        lines = self.stderr.strip().splitlines()
        if self.code != 0 and (len(lines) != 1 or not lines[0].startswith("error: ")):
            out.append(f"stderr is not one 'error:' line: {self.stderr[-300:]!r}")
        if self.rss_growth > MAX_RSS_GROWTH:
            out.append(f"peak RSS grew {self.rss_growth / 2**20:.0f} MiB")
        if self.cpu > MAX_SECONDS:  # CPU, not wall time: a loaded CI machine must not fail a case
            out.append(f"took {self.cpu:.1f} s of CPU")
        return out


class Worker:
    def __init__(self):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fuzz.worker"], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        self.tmp = tempfile.mkdtemp(prefix="llmq-fuzz-")

    def run(self, argv: list[str], timeout: float = 6 * MAX_SECONDS) -> Result:
        assert self.proc.stdin and self.proc.stdout
        req = {"argv": argv, "timeout": timeout, "stderr": str(Path(self.tmp) / "stderr")}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return Result(**json.loads(self.proc.stdout.readline()))

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)
        os.rmdir(self.tmp)
