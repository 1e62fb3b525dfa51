"""Structured mutators for GGUF and safetensors files, driven by hypothesis' ``data`` strategy.

Each mutator takes a valid file's bytes and returns hostile bytes: boundary values in length/count/type fields
(walk_gguf finds them), fields stretched to the end of the file, truncation, byte flips, spliced chunks, hostile
extra keys, and for safetensors hostile JSON values (deep nesting, 5,000-digit integers, wrong types), broken
header lengths and encodings, and many zero-size tensors.
"""

from __future__ import annotations

import json
import struct

from hypothesis import strategies as st

from tests.fuzz import formats as F

BOUNDARY = [0, 1, 2, 3, 4, 7, 8, 12, 13, 31, 32, 33, 255, 256, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40,
            2**63 - 1, 2**63, 2**64 - 1]  # fmt: skip


def _put(blob: bytes, off: int, size: int, value: int) -> bytes:
    value %= 1 << (8 * size)
    return blob[:off] + value.to_bytes(size, "little") + blob[off + size :]


def gguf_field(data, blob: bytes) -> bytes:
    fields = F.walk_gguf(blob)
    kind, off, size = data.draw(st.sampled_from(fields), label="field")
    rest = len(blob) - off - size
    value = data.draw(st.sampled_from([*BOUNDARY, rest, rest + 1, rest - 1, len(blob)]) | st.integers(0, 2**64 - 1),
                      label=f"{kind}@{off}")  # fmt: skip
    return _put(blob, off, size, value)


def gguf_stretch(data, blob: bytes) -> bytes:
    """A length or count stretched to the end of the file (the issue's 1.1-3.1 GB peaks)."""
    fields = [f for f in F.walk_gguf(blob) if f[0] in ("strlen", "arrcount", "count", "dim")]
    kind, off, size = data.draw(st.sampled_from(fields), label="field")
    return _put(blob, off, size, len(blob) - off - size + data.draw(st.integers(-2, 2)))


def truncate(data, blob: bytes) -> bytes:
    return blob[: data.draw(st.integers(0, len(blob) - 1), label="cut")]


def flip(data, blob: bytes) -> bytes:
    b = bytearray(blob)
    hi = min(len(b), data.draw(st.sampled_from([64, 512, 8192, len(b)])))
    for _ in range(data.draw(st.integers(1, 8))):
        b[data.draw(st.integers(0, hi - 1))] ^= data.draw(st.integers(1, 255))
    return bytes(b)


def splice(data, blob: bytes) -> bytes:
    a = data.draw(st.integers(0, len(blob) - 1))
    n = data.draw(st.integers(1, 64))
    at = data.draw(st.integers(0, len(blob)))
    return blob[:at] + blob[a : a + n] + blob[at:]


def _hostile_kv(data) -> bytes:
    choice = data.draw(st.integers(0, 7), label="hostile kv")
    key = data.draw(st.sampled_from(["general.alignment", "x", "llama.block_count", "tokenizer.ggml.tokens"]))
    if choice == 0:  # arrays nested up to 6 deep
        depth = data.draw(st.integers(1, 6))
        payload = struct.pack("<IQ", F.U8, 1) + b"\1"
        for _ in range(depth):
            payload = struct.pack("<IQ", F.ARR, 1) + payload
        return F.kv(key, F.ARR, payload)
    if choice == 1:  # many empty nested arrays (the 2M empty arrays, scaled)
        n = data.draw(st.sampled_from([1000, 70_000, 200_000]))
        return F.kv(key, F.ARR, struct.pack("<IQ", F.ARR, n) + struct.pack("<IQ", F.U8, 0) * n)
    if choice == 2:
        vt = data.draw(st.sampled_from([F.BOOL, F.F32, F.I64, F.U8, F.STR]))
        return F.kv(key, vt, F.s("32") if vt == F.STR else F.scalar(vt, 1 if vt != F.F32 else 32.0))
    if choice == 3:
        return F.kv(key, data.draw(st.integers(13, 2**32 - 1)), b"\0" * 8)
    if choice == 4:  # a long string array of empty strings
        n = data.draw(st.sampled_from([10, 100_000, 1_000_000]))
        return F.kv(key, F.ARR, struct.pack("<IQ", F.STR, n) + b"\0" * 8 * n)
    if choice == 5:
        return F.kv(key, F.ARR, struct.pack("<IQ", data.draw(st.integers(13, 1000)), 1) + b"\0" * 8)
    if choice == 6:
        return F.kv(key, F.U32, F.scalar(F.U32, data.draw(st.sampled_from(BOUNDARY[:16]))))
    return F.kv(key, F.ARR, struct.pack("<IQ", F.F32, data.draw(st.integers(0, 2**64 - 1))))


def gguf_extra_kv(data, blob: bytes) -> bytes:
    """A hostile key inserted before the first key (the key count bumped)."""
    n_kv = struct.unpack_from("<Q", blob, 16)[0]
    return blob[:16] + struct.pack("<Q", n_kv + 1) + _hostile_kv(data) + blob[24:]


def gguf_many_tensors(data, blob: bytes) -> bytes:
    """Many tiny tensor records (the issue's 3M, scaled): distinct, duplicate or overlapping."""
    n = data.draw(st.sampled_from([10, 1000, 50_000, 140_000]), label="records")
    mode = data.draw(st.sampled_from(["distinct", "duplicate", "overlap", "zero"]))
    recs = []
    for i in range(n):
        name = "t" if mode == "duplicate" else f"t{i}"
        dims = [0] if mode == "zero" else [8]
        recs.append(F.tensor_record(name, dims, 0, 0 if mode in ("overlap", "zero") else 32 * i))
    return F.gguf([F.kv("general.architecture", F.STR, F.s("llama"))], recs, data=b"\0" * 32 * n)


GGUF_MUTATORS = [gguf_field, gguf_stretch, truncate, flip, splice, gguf_extra_kv, gguf_many_tensors]


# ----------------------------------------------------------------------------------------------- safetensors


def _hostile_json(data):
    choice = data.draw(st.integers(0, 9), label="hostile value")
    if choice == 0:
        d = data.draw(st.sampled_from([5, 9, 100, 1000, 100_000]))
        return json.loads("[" * min(d, 50) + "]" * min(d, 50)) if d <= 50 else _Raw("[" * d + "]" * d)
    if choice == 1:
        return _Raw("9" * data.draw(st.sampled_from([20, 21, 4300, 4301, 5000, 100_000])))
    if choice == 2:
        return data.draw(st.sampled_from([-1, -(2**63), 2**64, 2**64 - 1, 1e308, -0.0, True, False, None]))
    if choice == 3:
        return data.draw(st.sampled_from([["F32"], {"a": 1}, "", "F32\x1b[2J", "\ud800x"]))
    if choice == 4:
        return [data.draw(st.integers(-2, 2**40)) for _ in range(data.draw(st.integers(0, 6)))]
    if choice == 5:
        return "x" * data.draw(st.sampled_from([1, 5000, 1 << 20]))
    if choice == 6:
        return [0] * data.draw(st.sampled_from([3, 100_000]))
    if choice == 7:
        return {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "extra": [1]}
    if choice == 8:
        return data.draw(st.sampled_from(["BF16", "F8_E4M3", "I64", "U64", "BOOL", "F64", "Q4_0", "f32"]))
    return data.draw(st.text(max_size=20))


class _Raw(str):
    """JSON text placed verbatim (nesting and integers json.dumps would not write)."""


def _dump(obj) -> str:
    if isinstance(obj, _Raw):
        return str(obj)
    if isinstance(obj, dict):
        return "{" + ",".join(json.dumps(k) + ":" + _dump(v) for k, v in obj.items()) + "}"
    if isinstance(obj, list):
        return "[" + ",".join(_dump(v) for v in obj) + "]"
    return json.dumps(obj)


def st_value(data, blob: bytes) -> bytes:
    hdr = F.base_st_header()
    name = data.draw(st.sampled_from(list(hdr)), label="tensor")
    target = hdr[name]
    if name != "__metadata__" and data.draw(st.booleans()):
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]), label="field")
        if data.draw(st.booleans()) and isinstance(target[field], list) and target[field]:
            target[field][data.draw(st.integers(0, len(target[field]) - 1))] = _hostile_json(data)
        else:
            target[field] = _hostile_json(data)
    elif data.draw(st.booleans()):
        hdr[name] = _hostile_json(data)
    else:
        del hdr[name]
    return F.st(_dump(hdr).encode("utf-8", "surrogatepass"), blob[8 + struct.unpack_from("<Q", blob)[0] :])


def st_length(data, blob: bytes) -> bytes:
    n = struct.unpack_from("<Q", blob)[0]
    value = data.draw(
        st.sampled_from([*BOUNDARY, n - 1, n + 1, len(blob) - 8, len(blob) - 7]), label="length"
    )
    return _put(blob, 0, 8, value)


def st_encoding(data, blob: bytes) -> bytes:
    n = struct.unpack_from("<Q", blob)[0]
    text = blob[8 : 8 + n].decode()
    enc = data.draw(st.sampled_from(["utf-16", "utf-16-le", "utf-32", "utf-8-sig", "latin-1-bad"]))
    raw = text.replace("pt", "p\xe9").encode("latin-1") if enc == "latin-1-bad" else text.encode(enc)
    return F.st(raw, blob[8 + n :])


def st_many(data, blob: bytes) -> bytes:
    """Many zero-size tensors (the issue's 1.5M, scaled) or many metadata keys."""
    n = data.draw(st.sampled_from([10, 10_000, 140_000]), label="entries")
    if data.draw(st.booleans()):
        body = (
            b"{"
            + b",".join(b'"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}' % i for i in range(n))
            + b"}"
        )
    else:
        body = b'{"__metadata__":{' + b",".join(b'"k%d":"v"' % i for i in range(n)) + b"}}"
    return F.st(body)


ST_MUTATORS = [st_value, st_length, st_encoding, st_many, truncate, flip, splice]
