"""1 GB sparse files with hostile headers: the parsers' memory must not follow the file size (issue 15).

Each file is sparse (a few KB on disk). `llmq inspect` runs in a forked child of the fuzz worker, which reports
its peak RSS growth; a parser that re-read the file in growing windows peaked at 1.1-3.1 GB here.
"""

from __future__ import annotations

import os
import struct

import pytest

from tests.fuzz import formats as F
from tests.fuzz.runner import MAX_RSS_GROWTH, Worker

GB = 1 << 30


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


def _sparse(path, head: bytes, size: int = GB, tail: tuple[int, bytes] | None = None):
    with open(path, "wb") as f:
        f.write(head)
        if tail:
            f.seek(tail[0])
            f.write(tail[1])
        f.truncate(size)
    return path


def _valid_gguf_1gb() -> bytes:
    """A header with one 1 GiB - 4 KiB tensor (its data is the sparse rest of the file)."""
    n = (GB - 4096) // 4
    return F.gguf([F.kv("general.architecture", F.STR, F.s("llama"))], [F.tensor_record("w", [n], 0, 0)])


CASES = {
    "gguf version 4": (b"GGUF" + struct.pack("<IQQ", 4, 1, 1), 2, "unsupported GGUF version 4"),
    "gguf key length to the end": (b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, GB - 32), 2, "exceeds"),
    "gguf string value to the end": (
        b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + F.s("k") + struct.pack("<IQ", F.STR, GB - 45), 2, "exceeds"),
    "gguf array count to the end": (
        b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + F.s("k") + struct.pack("<IIQ", F.ARR, F.U8, GB - 49), 2, "exceeds"),
    "gguf 1M-entry vocabulary of empty strings": (
        b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + F.s("k") + struct.pack("<IIQ", F.ARR, F.STR, 1 << 20), 0, ""),
    "gguf tensor count to the end": (b"GGUF" + struct.pack("<IQQ", 3, GB // 40, 0), 2, "more than the limits"),
    "gguf valid, 1 GiB of data": (_valid_gguf_1gb(), 0, ""),
    "safetensors header length to the end": (struct.pack("<Q", GB - 8) + b"{", 2, "exceeds the"),
    "safetensors valid, 1 GiB of data": (
        F.st({"w": {"dtype": "U8", "shape": [GB - 128], "data_offsets": [0, GB - 128]}}).ljust(128, b" "), 0, ""),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_big_sparse_file(worker, tmp_path, case):
    head, code, msg = CASES[case]
    if case.startswith("safetensors valid"):
        head = struct.pack("<Q", 120) + head[8:128]
    suffix = ".gguf" if case.startswith("gguf") else ".safetensors"
    path = _sparse(tmp_path / f"big{suffix}", head)
    assert os.path.getsize(path) == GB
    r = worker.run(["inspect", str(path), "--json"])
    assert r.code == code, r.stderr
    assert msg in r.stderr
    assert r.rss_growth < MAX_RSS_GROWTH / 4, f"peak RSS grew {r.rss_growth / 2**20:.0f} MiB"
    assert r.cpu < 2.0
