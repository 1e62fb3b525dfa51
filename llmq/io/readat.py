"""``read_at(offset, n)`` sources and a sequential header stream over them with fixed-size reads.

Header parsers (llmq.io.gguf, llmq.io.safetensors) take a ``ReadAt`` rather than a path, so one parser serves
local files, hub range requests (llmq.estimate.sources) and tests. A ``ReadAt`` returns at most ``n`` bytes,
fewer only at the end of the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from llmq.errors import CorruptFile

ReadAt = Callable[[int, int], bytes]


def file_read_at(path: str | os.PathLike) -> ReadAt:
    """A ReadAt over a local file (pread: no shared file position, no handle kept open)."""
    path = Path(path)

    def read_at(offset: int, n: int) -> bytes:
        with open(path, "rb") as fh:
            return os.pread(fh.fileno(), n, offset)

    return read_at


class HeaderStream:
    """Sequential reads over a ReadAt in fixed-size chunks, refusing to go past ``limit`` bytes.

    Memory holds one chunk plus the item being read (itself bounded by the caller's caps), never the whole
    header: ``take(n)`` fetches exactly what is missing, rounded up to one chunk.
    """

    def __init__(self, read_at: ReadAt, name: str, limit: int, chunk: int, what: str = "header"):
        self.read_at, self.name, self.limit, self.chunk, self.what = read_at, name, limit, chunk, what
        self.buf = b""
        self.buf_start = 0  # file offset of buf[0]
        self.pos = 0  # file offset of the next byte to take
        self.eof = False  # a read came back short: nothing more to fetch

    def fill(self, n: int) -> None:
        """Make buf hold at least n bytes from pos (fewer only at the end of the file)."""
        have = self.buf_start + len(self.buf) - self.pos
        if have >= n or self.eof:
            return
        if self.pos + n > self.limit:
            raise CorruptFile(f"{self.name}: {self.what} larger than the {self.limit >> 20} MiB limit")
        want = min(max(n - have, self.chunk), self.limit - self.pos - have)
        more = self.read_at(self.pos + have, want)
        self.eof = len(more) < want
        self.buf = self.buf[self.pos - self.buf_start :] + more
        self.buf_start = self.pos

    def take(self, n: int, what: str) -> bytes:
        self.fill(n)
        off = self.pos - self.buf_start
        if off + n > len(self.buf):
            raise CorruptFile(f"{self.name}: truncated {self.what} (reading {what} at byte {self.pos})")
        self.pos += n
        return self.buf[off : off + n]
