"""The estimator's tensor record: the same fields as ``llmq.io.base.TensorInfo``, without importing ``llmq.io``.

Importing ``llmq.io`` pulls numpy and the GGUF reader (~0.3 s here); a bare config.json must answer faster than
that, so the config path never imports it. Readers of real checkpoints still return ``TensorInfo`` objects, which
have the same attributes. tests/test_estimate.py checks that the two element-size tables agree.
"""

from __future__ import annotations

from dataclasses import dataclass

ELEMENT_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: str | None = None
    offset: int | None = None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n
