"""Byte-level builders and a field walker for GGUF and safetensors, independent of llmq's parsers.

The fuzz suite, tests/test_parsers.py and tests/test_big_headers.py build their valid, hostile and huge headers
here; the walker lists where each length, count and type field of a valid GGUF lies, for structured mutation.
"""

from __future__ import annotations

import json
import struct

import numpy as np

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {
    U8: "B",
    I8: "b",
    U16: "H",
    I16: "h",
    U32: "I",
    I32: "i",
    F32: "f",
    BOOL: "?",
    U64: "Q",
    I64: "q",
    F64: "d",
}


def s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def scalar(vtype: int, value) -> bytes:
    return struct.pack("<" + _FMT[vtype], value)


def array(sub: int, items: list) -> bytes:
    body = b"".join(s(x) for x in items) if sub == STR else b"".join(scalar(sub, x) for x in items)
    return struct.pack("<IQ", sub, len(items)) + body


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def tensor_record(name: str, dims: list[int], ggml_type: int, offset: int) -> bytes:
    return (
        s(name)
        + struct.pack("<I", len(dims))
        + struct.pack(f"<{len(dims)}Q", *dims)
        + struct.pack("<IQ", ggml_type, offset)
    )


def gguf(kvs: list[bytes], records: list[bytes], *, version: int = 3, n_tensors: int | None = None,
         n_kv: int | None = None, data: bytes = b"", alignment: int = 32) -> bytes:  # fmt: skip
    head = b"GGUF" + struct.pack("<IQQ", version, len(records) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)  # fmt: skip
    head += b"".join(kvs) + b"".join(records)
    head += b"\0" * (-len(head) % alignment)
    return head + data


def base_gguf(vocab: int = 300) -> bytes:
    """A small valid GGUF: scalar keys, a string vocabulary, score and type arrays, four tensors."""
    rng = np.random.default_rng(0)
    tokens = [f"tok{i}" for i in range(vocab)]
    kvs = [
        kv("general.architecture", STR, s("llama")),
        kv("general.name", STR, s("fuzz")),
        kv("llama.block_count", U32, scalar(U32, 1)),
        kv("llama.context_length", U32, scalar(U32, 2048)),
        kv("llama.embedding_length", U32, scalar(U32, 64)),
        kv("llama.attention.head_count", U32, scalar(U32, 4)),
        kv("llama.rope.freq_base", F32, scalar(F32, 10000.0)),
        kv("general.file_type", U32, scalar(U32, 0)),
        kv("tokenizer.ggml.model", STR, s("gpt2")),
        kv("tokenizer.ggml.tokens", ARR, array(STR, tokens)),
        kv("tokenizer.ggml.scores", ARR, array(F32, [float(-i) for i in range(vocab)])),
        kv("tokenizer.ggml.token_type", ARR, array(I32, [1] * vocab)),
        kv("tokenizer.ggml.bos_token_id", U32, scalar(U32, 1)),
    ]
    # (name, dims ne0-first, ggml type, bytes)
    specs = [("token_embd.weight", [64, 8], 0, 64 * 8 * 4), ("blk.0.attn_q.weight", [64, 4], 2, 4 * 2 * 18),
             ("blk.0.attn_norm.weight", [64], 0, 256), ("output_norm.weight", [64], 1, 128)]  # fmt: skip
    records, off, data = [], 0, b""
    for name, dims, t, nbytes in specs:
        records.append(tensor_record(name, dims, t, off))
        chunk = rng.integers(0, 255, nbytes, dtype=np.uint8).tobytes()
        if t == 0:
            chunk = (rng.standard_normal(nbytes // 4) * 0.02).astype(np.float32).tobytes()
        if t == 1:
            chunk = (rng.standard_normal(nbytes // 2) * 0.02).astype(np.float16).tobytes()
        data += chunk + b"\0" * (-nbytes % 32)
        off += nbytes + (-nbytes % 32)
    return gguf(kvs, records, data=data)


def walk_gguf(blob: bytes) -> list[tuple[str, int, int]]:
    """(kind, offset, size) of every length/count/type field of a valid GGUF header, in file order.

    kinds: version, count, strlen, vtype, arrtype, arrcount, scalar, ndims, dim, ggmltype, offset."""
    fields = [("version", 4, 4), ("count", 8, 8), ("count", 16, 8)]
    n_tensors, n_kv = struct.unpack_from("<QQ", blob, 8)
    pos = 24

    def string() -> None:
        nonlocal pos
        fields.append(("strlen", pos, 8))
        (n,) = struct.unpack_from("<Q", blob, pos)
        pos += 8 + n

    def value(vt: int) -> None:
        nonlocal pos
        if vt == STR:
            string()
        elif vt == ARR:
            fields.append(("arrtype", pos, 4))
            fields.append(("arrcount", pos + 4, 8))
            sub, count = struct.unpack_from("<IQ", blob, pos)
            pos += 12
            for _ in range(count):
                value(sub)
        else:
            size = struct.calcsize(_FMT[vt])
            fields.append(("scalar", pos, size))
            pos += size

    for _ in range(n_kv):
        string()
        fields.append(("vtype", pos, 4))
        (vt,) = struct.unpack_from("<I", blob, pos)
        pos += 4
        value(vt)
    for _ in range(n_tensors):
        string()
        fields.append(("ndims", pos, 4))
        (nd,) = struct.unpack_from("<I", blob, pos)
        pos += 4
        for _ in range(nd):
            fields.append(("dim", pos, 8))
            pos += 8
        fields.append(("ggmltype", pos, 4))
        fields.append(("offset", pos + 4, 8))
        pos += 12
    return fields


def st(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def base_st_header() -> dict:
    return {
        "__metadata__": {"format": "pt"},
        "model.embed_tokens.weight": {"dtype": "F32", "shape": [8, 4], "data_offsets": [0, 128]},
        "model.layers.0.self_attn.q_proj.weight": {
            "dtype": "BF16",
            "shape": [4, 4],
            "data_offsets": [128, 160],
        },
        "model.norm.weight": {"dtype": "F16", "shape": [4], "data_offsets": [160, 168]},
        "lm_head.weight": {"dtype": "I8", "shape": [2, 4], "data_offsets": [168, 176]},
    }


def base_st() -> bytes:
    return st(base_st_header(), bytes(range(176)))
