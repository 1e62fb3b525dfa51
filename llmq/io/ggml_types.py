"""GGML tensor types and GGUF value types: the format facts llmq needs without importing gguf-py.

`import gguf` costs about a second (it pulls in yaml and sentencepiece); header reading, `llmq inspect` and the
memory estimator must stay fast, so the numbers of the GGUF spec live here. tests/test_io_gguf.py checks this
table against gguf-py's constants so the two can never drift apart.
"""

from __future__ import annotations

from enum import IntEnum

from llmq.errors import ShapeError, UnsupportedType

# ggml type name -> (type id, elements per block, bytes per block)
GGML_TYPES: dict[str, tuple[int, int, int]] = {
    "F32": (0, 1, 4), "F16": (1, 1, 2), "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20),
    "Q5_0": (6, 32, 22), "Q5_1": (7, 32, 24), "Q8_0": (8, 32, 34), "Q8_1": (9, 32, 40),
    "Q2_K": (10, 256, 84), "Q3_K": (11, 256, 110), "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176),
    "Q6_K": (14, 256, 210), "Q8_K": (15, 256, 292), "IQ2_XXS": (16, 256, 66), "IQ2_XS": (17, 256, 74),
    "IQ3_XXS": (18, 256, 98), "IQ1_S": (19, 256, 50), "IQ4_NL": (20, 32, 18), "IQ3_S": (21, 256, 110),
    "IQ2_S": (22, 256, 82), "IQ4_XS": (23, 256, 136), "I8": (24, 1, 1), "I16": (25, 1, 2),
    "I32": (26, 1, 4), "I64": (27, 1, 8), "F64": (28, 1, 8), "IQ1_M": (29, 256, 56), "BF16": (30, 1, 2),
    "TQ1_0": (34, 256, 54), "TQ2_0": (35, 256, 66), "MXFP4": (39, 32, 17), "NVFP4": (40, 64, 36),
    "Q1_0": (41, 128, 18),
}  # fmt: skip

GGML_TYPE_BY_ID: dict[int, str] = {v[0]: k for k, v in GGML_TYPES.items()}

# ggml names of the plain element types -> safetensors dtype codes (F32/F16/BF16 share the name)
GGML_TO_ST: dict[str, str] = {"F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F64",
                              "I8": "I8", "I16": "I16", "I32": "I32", "I64": "I64"}  # fmt: skip
ST_TO_GGML: dict[str, str] = {v: k for k, v in GGML_TO_ST.items()}

NUMPY_DTYPES: dict[str, str] = {
    "F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8", "I8": "i1", "I16": "<i2", "I32": "<i4",
    "I64": "<i8", "U8": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8", "BOOL": "?",
    "F8_E4M3": "u1", "F8_E5M2": "u1",
}  # fmt: skip


def is_block_type(name: str) -> bool:
    return name in GGML_TYPES and GGML_TYPES[name][1] > 1


def _sizes(name: str) -> tuple[int, int]:
    try:
        return GGML_TYPES[name][1:]
    except KeyError:
        raise UnsupportedType(f"unknown ggml type {name!r}") from None


def block_size(name: str) -> int:
    """Elements per block of ggml type ``name`` (1 for the plain types)."""
    return _sizes(name)[0]


def type_nbytes(name: str, shape: tuple[int, ...] | list[int]) -> int:
    """Bytes a tensor of ggml type ``name`` and torch-order ``shape`` takes (rows of whole blocks, no padding)."""
    blk, size = _sizes(name)
    n = 1
    for d in shape:
        n *= int(d)
    row = int(shape[-1]) if len(shape) else 1
    if row % blk:
        raise ShapeError(f"row length {row} is not a multiple of the {name} block size {blk}")
    return n // blk * size


def row_nbytes(name: str, n_per_row: int) -> int:
    """Bytes of one row of ``n_per_row`` elements of ggml type ``name``."""
    return type_nbytes(name, (n_per_row,))


class GGUFValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# struct formats of the fixed-size value types
SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}  # fmt: skip

NUMPY_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "u1", GGUFValueType.INT8: "i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}  # fmt: skip

GGUF_MAGIC = b"GGUF"
GGUF_DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4
