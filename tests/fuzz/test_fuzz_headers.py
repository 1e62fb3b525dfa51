"""Generated hostile GGUF and safetensors files given to `llmq inspect` (issue 15).

Every case must: exit with a documented code (docs/cli.md) and, on error, print exactly one `error:` line;
grow peak RSS by under 100 MiB; use under 5 s of CPU (a hang is killed after 30 s); leave the input unmodified
and nothing new beside it.
Cases run in forked children of one warm worker (tests/fuzz/worker.py), so a case costs its own work only.
CI replays the same 200 cases (derandomized); HYPOTHESIS_PROFILE=explore runs 5,000 new ones per format.
LLMQ_FUZZ_CASES=N sets the number of cases; LLMQ_FUZZ_REPORT=FILE appends the measured figures (max RSS growth,
CPU per case) as JSON lines.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import formats as F
from tests.fuzz.mutate import GGUF_MUTATORS, ST_MUTATORS
from tests.fuzz.runner import Worker

EXPLORE = os.environ.get("HYPOTHESIS_PROFILE") == "explore"
CASES = int(os.environ.get("LLMQ_FUZZ_CASES", 0)) or (5000 if EXPLORE else 100)
_FIGURES: dict[str, list[tuple[int, float, float, int]]] = {"gguf": [], "safetensors": []}


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()
    _report()


def _report() -> None:
    lines = []
    for fmt, rows in _FIGURES.items():
        if not rows:
            continue
        codes: dict[int, int] = {}
        for code, *_ in rows:
            codes[code] = codes.get(code, 0) + 1
        fig = {"format": fmt, "cases": len(rows), "exit_codes": codes,
               "max_rss_growth_mib": round(max(r[3] for r in rows) / 2**20, 1),
               "cpu_s_mean": round(statistics.mean(r[1] for r in rows), 3),
               "cpu_s_max": round(max(r[1] for r in rows), 3), "wall_s_max": round(max(r[2] for r in rows), 3)}  # fmt: skip
        lines.append(json.dumps(fig))
    print("\n" + "\n".join(lines))
    if os.environ.get("LLMQ_FUZZ_REPORT"):
        with open(os.environ["LLMQ_FUZZ_REPORT"], "a") as f:
            f.write("".join(line + "\n" for line in lines))


def _run_case(worker, tmp_dir, fmt: str, blob: bytes, argv_extra: list[str]) -> None:
    path = tmp_dir / f"case.{fmt}"
    path.write_bytes(blob)
    before = hashlib.sha256(blob).hexdigest()
    listing = sorted(os.listdir(tmp_dir))
    try:
        r = worker.run(["inspect", str(path), *argv_extra])
        _FIGURES[fmt].append((r.code, r.cpu, r.wall, r.rss_growth))
        problems = r.problems(allowed={0, 2})
        if hashlib.sha256(path.read_bytes()).hexdigest() != before:
            problems.append("the input was modified")
        if sorted(os.listdir(tmp_dir)) != listing:
            problems.append(f"files appeared: {sorted(set(os.listdir(tmp_dir)) - set(listing))}")
        assert not problems, f"{fmt} case misbehaved: {problems}; stderr: {r.stderr[-300:]!r}"
    finally:
        path.unlink()


_SETTINGS = settings(max_examples=CASES, suppress_health_check=list(HealthCheck), deadline=None)


@_SETTINGS
@given(data=st.data())
def test_gguf_mutations(worker, tmp_path_factory, data):
    tmp_dir = tmp_path_factory.mktemp("gguf", numbered=False) if not hasattr(worker, "gdir") else worker.gdir
    worker.gdir = tmp_dir
    mutator = data.draw(st.sampled_from(GGUF_MUTATORS), label="mutator")
    blob = mutator(data, _BASE_GGUF)
    argv = data.draw(st.sampled_from([[], ["--json"]]), label="argv")
    _run_case(worker, tmp_dir, "gguf", blob, argv)


@_SETTINGS
@given(data=st.data())
def test_safetensors_mutations(worker, tmp_path_factory, data):
    tmp_dir = tmp_path_factory.mktemp("st", numbered=False) if not hasattr(worker, "sdir") else worker.sdir
    worker.sdir = tmp_dir
    mutator = data.draw(st.sampled_from(ST_MUTATORS), label="mutator")
    blob = mutator(data, _BASE_ST)
    argv = data.draw(st.sampled_from([[], ["--json"]]), label="argv")
    _run_case(worker, tmp_dir, "safetensors", blob, argv)


_BASE_GGUF = F.base_gguf()
_BASE_ST = F.base_st()
