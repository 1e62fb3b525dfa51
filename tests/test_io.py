"""The tensor IO layer: readers against the reference libraries, writers round trip, untrusted input."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmq.errors import BadInput, CorruptFile, LlmqError, OutputExists, UnsafeCheckpoint
from llmq.io import (
    AtomicOutput,
    GGUFFileWriter,
    GGUFReader,
    SafetensorsReader,
    SafetensorsWriter,
    open_checkpoint,
)
from llmq.io.base import TensorInfo, check_output
from llmq.io.ggml_types import GGML_TYPES, GGUFValueType, type_nbytes
from llmq.io.gguf import RawStrings
from llmq.io.safetensors import save_file

# ---------------------------------------------------------------------------------------------- safetensors


def _tensors():
    import torch

    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(64, 32, generator=g),
        "b.weight": torch.randn(16, 48, generator=g).to(torch.bfloat16),
        "c.bias": torch.randn(48, generator=g).to(torch.float16),
        "d.idx": torch.arange(10, dtype=torch.int32),
        "e.mask": torch.tensor([1, 0, 1], dtype=torch.uint8),
        "f.empty": torch.zeros(0, 4),
    }


def test_safetensors_single_file_matches_reference(tmp_path):
    import safetensors.torch

    tensors = _tensors()
    save_file(tensors, tmp_path / "x.safetensors", metadata={"k": "v"})
    ref = safetensors.torch.load_file(tmp_path / "x.safetensors")  # the reference reader accepts our bytes
    r = SafetensorsReader(tmp_path / "x.safetensors")
    assert r.metadata == {"format": "pt", "k": "v"}
    for name, t in tensors.items():
        assert r.read(name).dtype == t.dtype
        assert bool((r.read(name) == t).all()) and bool((ref[name] == t).all())
    # and we read what the reference writer wrote
    safetensors.torch.save_file(tensors, tmp_path / "ref.safetensors")
    r2 = open_checkpoint(tmp_path / "ref.safetensors")
    for name, t in tensors.items():
        assert bool((r2.read(name) == t).all())
        assert r2.info(name).shape == tuple(t.shape)


def test_sharded_writer_and_index(tmp_path):
    tensors = _tensors()
    infos = [TensorInfo(n, {"torch.float32": "F32", "torch.bfloat16": "BF16", "torch.float16": "F16",
                            "torch.int32": "I32", "torch.uint8": "U8"}[str(t.dtype)], tuple(t.shape),
                        t.numel() * t.element_size()) for n, t in tensors.items()]  # fmt: skip
    w = SafetensorsWriter(tmp_path, max_shard_bytes=4000)
    w.plan(infos)
    for n, t in tensors.items():
        w.write(n, t)
    files = w.close()
    assert len(files) > 1 and all(f.exists() for f in files)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    r = open_checkpoint(tmp_path)
    assert r.kind == "safetensors" and set(r.names()) == set(tensors)
    for n, t in tensors.items():
        assert bool((r.read(n) == t).all())


def test_writer_enforces_order_and_sizes(tmp_path):
    w = SafetensorsWriter(tmp_path)
    w.plan([TensorInfo("x", "F32", (2,), 8), TensorInfo("y", "F32", (2,), 8)])
    with pytest.raises(RuntimeError, match="planned order"):
        w.write("y", np.zeros(2, np.float32))
    with pytest.raises(BadInput, match="bytes given"):
        w.write("x", np.zeros(3, np.float32))
    w.write("x", np.zeros(2, np.float32))
    with pytest.raises(RuntimeError, match="never written"):
        w.close()


def _st_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"\x01\x02", "too small"),
        (struct.pack("<Q", 1 << 40) + b"{}", "exceeds the .* MiB limit"),
        (struct.pack("<Q", 4) + b"{no}", "not valid JSON"),
        (_st_bytes([1, 2]), "not a JSON object"),  # type: ignore[arg-type]
        (
            _st_bytes({"x": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
            "unknown dtype",
        ),
        (_st_bytes({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "needs 8"),
        (
            _st_bytes({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
            "past the end",
        ),
        (
            _st_bytes({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
            "invalid shape",
        ),
        (
            _st_bytes(
                {
                    "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                b"\0" * 12,
            ),
            "overlap",
        ),  # fmt: skip
        (_st_bytes({"__metadata__": {"a": 1}}), "__metadata__"),
    ],
)
def test_safetensors_untrusted(tmp_path, blob, match):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(blob)
    with pytest.raises(CorruptFile, match=match):
        SafetensorsReader(p)


def test_index_shard_outside_dir_refused(tmp_path):
    save_file({"x": np.zeros(2, np.float32)}, tmp_path.parent / "outside.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "../outside.safetensors"}})
    )
    with pytest.raises(CorruptFile, match="leaves the model directory"):
        open_checkpoint(tmp_path)


def test_index_missing_shard(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "m-1.safetensors"}})
    )
    with pytest.raises(BadInput, match="missing"):
        open_checkpoint(tmp_path)


def test_pickle_needs_opt_in(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(UnsafeCheckpoint, match="allow-pickle"):
        open_checkpoint(tmp_path)
    with pytest.raises(UnsafeCheckpoint):
        open_checkpoint(tmp_path / "pytorch_model.bin")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400), n=st.integers(0, 2**64 - 1))
def test_fuzz_safetensors_header(tmp_path, data, n):
    p = tmp_path / "f.safetensors"
    p.write_bytes(struct.pack("<Q", n if n % 3 else len(data)) + data)
    try:
        r = SafetensorsReader(p)
        for name in r.names():
            r.read_raw(name)
    except LlmqError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_safetensors_structured(tmp_path, data):
    entry = st.fixed_dictionaries(
        {
            "dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "X"]),
            "shape": st.lists(st.integers(-2, 6), max_size=3),
            "data_offsets": st.lists(st.integers(-1, 80), min_size=0, max_size=3),
        }
    )
    header = data.draw(st.dictionaries(st.text(max_size=4), entry, max_size=4))
    payload = data.draw(st.binary(max_size=80))
    p = tmp_path / "s.safetensors"
    p.write_bytes(_st_bytes(header, payload))
    try:
        r = SafetensorsReader(p)
        for name in r.names():
            assert r.read_raw(name).nbytes == r.info(name).nbytes
    except LlmqError:
        pass


# ---------------------------------------------------------------------------------------------- GGUF


def test_ggml_table_matches_gguf_py():
    import gguf

    for t in gguf.GGMLQuantizationType:  # every type gguf-py knows: llmq never needs gguf-py for a size
        tid, blk, size = GGML_TYPES[t.name]
        assert tid == t.value and (blk, size) == gguf.GGML_QUANT_SIZES[t], t.name
    for v in gguf.GGUFValueType:
        assert GGUFValueType[v.name].value == v.value


def test_gguf_reader_matches_gguf_py(smollm2_gguf_path):
    import gguf

    ref = gguf.GGUFReader(smollm2_gguf_path)
    r = GGUFReader(smollm2_gguf_path)
    assert len(r.names()) == len(ref.tensors)
    for t in ref.tensors:
        info = r.info(t.name)
        assert info.dtype == t.tensor_type.name
        assert info.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
        assert info.nbytes == t.n_bytes
        assert np.array_equal(
            r.read_raw(t.name).reshape(-1).view(np.uint8), np.asarray(t.data).reshape(-1).view(np.uint8)
        )
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        ours = r.metadata[key]
        theirs = field.contents()
        assert ours == theirs, key


def test_gguf_dequantize_matches_gguf_py(smollm2_gguf_path):
    import gguf

    r = GGUFReader(smollm2_gguf_path)
    ref = {t.name: t for t in gguf.GGUFReader(smollm2_gguf_path).tensors}
    for name in ("blk.0.attn_q.weight", "token_embd.weight", "blk.0.attn_norm.weight"):
        t = ref[name]
        want = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        assert np.array_equal(r.read_float(name).reshape(-1), np.asarray(want).reshape(-1))
    assert tuple(r.read("blk.0.attn_q.weight").shape) == (576, 576)


def _write_gguf(
    path: Path, tensors: dict[str, tuple[str, np.ndarray]], split: int | None = None
) -> list[Path]:
    w = GGUFFileWriter(path, "llama", split_max_bytes=split)
    w.add("general.name", "tést")
    w.add("some.u8", 7, GGUFValueType.UINT8)
    w.add("some.i64", -5, GGUFValueType.INT64)
    w.add("some.f64", 0.1, GGUFValueType.FLOAT64)
    w.add("some.bool", True)
    w.add("some.strings", ["a", "", "\u00e9\U0001f600"])
    w.add("some.floats", [0.5, 1.5], GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
    w.add("some.nested", [[1, 2], [3]], GGUFValueType.ARRAY, GGUFValueType.ARRAY)
    w.plan([TensorInfo(n, t, a.shape if t in ("F32", "F16") else (a.shape[0], a.shape[1] // GGML_TYPES[t][2] * GGML_TYPES[t][1]), a.nbytes) for n, (t, a) in tensors.items()])  # fmt: skip
    for n, (_, a) in tensors.items():
        w.write(n, a)
    return w.close()


def test_gguf_writer_round_trip_and_reference_reader(tmp_path):
    import gguf

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 64), dtype=np.float32)
    tensors = {
        "a": ("F32", x),
        "b": ("F16", x.astype(np.float16)),
        "c": ("Q8_0", gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)),
        "d": ("F32", rng.standard_normal(7, dtype=np.float32)),
    }
    (path,) = _write_gguf(tmp_path / "m.gguf", tensors)
    r = GGUFReader(path)
    assert (
        r.metadata["general.name"] == "tést" and r.metadata["some.u8"] == 7 and r.metadata["some.i64"] == -5
    )
    assert r.metadata["some.strings"] == ["a", "", "\u00e9\U0001f600"]
    assert r.metadata["some.nested"] == [[1, 2], [3]] and r.metadata["some.bool"] is True
    for n, (_, a) in tensors.items():
        assert np.array_equal(r.read_raw(n).reshape(-1).view(np.uint8), a.reshape(-1).view(np.uint8))
    ref = gguf.GGUFReader(path)
    assert ref.fields["general.name"].contents() == "tést"
    assert {t.name for t in ref.tensors} == set(tensors)
    assert np.array_equal(np.asarray(ref.get_tensor(0).data), x)


def test_gguf_raw_string_arrays_copy_byte_for_byte(tmp_path, smollm2_gguf_path):
    """decode_strings="raw" keeps vocabularies as their bytes; written back they are identical, and they decode
    to the same strings as a decoding read."""
    raw = GGUFReader(smollm2_gguf_path, decode_strings="raw")
    decoded = GGUFReader(smollm2_gguf_path)
    tokens = raw.metadata["tokenizer.ggml.tokens"]
    assert isinstance(tokens, RawStrings) and len(tokens) == len(decoded.metadata["tokenizer.ggml.tokens"])
    assert list(tokens) == decoded.metadata["tokenizer.ggml.tokens"] and tokens[5] == list(tokens)[5]
    out = tmp_path / "meta.gguf"
    w = GGUFFileWriter(out, None)
    for key, val in raw.metadata.items():
        vtype, sub = raw.kv_types[key]
        w.add(key, val, vtype, sub)
    w.plan([])
    w.close()
    again = GGUFReader(out)
    for key, val in decoded.metadata.items():
        assert again.metadata[key] == val, key
    assert out.read_bytes()[24:].rstrip(b"\0") in Path(smollm2_gguf_path).read_bytes()  # kv section verbatim


def test_gguf_split_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {f"t{i}": ("F32", rng.standard_normal((8, 32), dtype=np.float32)) for i in range(5)}
    paths = _write_gguf(tmp_path / "m.gguf", tensors, split=2500)
    assert [p.name for p in paths][0] == f"m-00001-of-{len(paths):05d}.gguf" and len(paths) > 1
    r = open_checkpoint(paths[-1])  # any split opens the whole model
    assert r.metadata["general.name"] == "tést" and "split.count" not in r.metadata
    for n, (_, a) in tensors.items():
        assert np.array_equal(r.read_raw(n), a)
    paths[1].unlink()
    with pytest.raises(BadInput, match="incomplete"):
        open_checkpoint(paths[0])


def _gguf_header(n_tensors: int, kvs: bytes = b"", n_kv: int = 0, infos: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kvs + infos


def _s(x: str) -> bytes:
    return struct.pack("<Q", len(x)) + x.encode()


def _tinfo(name: str, dims: list[int], ttype: int, offset: int) -> bytes:
    return (
        _s(name)
        + struct.pack("<I", len(dims))
        + struct.pack(f"<{len(dims)}Q", *dims)
        + struct.pack("<IQ", ttype, offset)
    )


def _pad(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 32)


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"GGML" + b"\0" * 40, "bad magic"),
        (b"GGUF" + struct.pack("<IQQ", 1, 0, 0), "version"),
        (_gguf_header(0, n_kv=1 << 60), "more than"),
        (_gguf_header(0, struct.pack("<Q", 1 << 50), 1), "exceeds the"),
        (_gguf_header(0, _s("k") + struct.pack("<IIQ", 9, 4, 1 << 40), 1), "exceeds the"),
        (_gguf_header(0, _s("k") + struct.pack("<I", 77), 1), "unknown GGUF value type"),
        (_pad(_gguf_header(1, infos=_tinfo("t", [4], 99, 0))) + b"\0" * 16, "unknown ggml type"),
        (_pad(_gguf_header(1, infos=_tinfo("t", [4], 0, 0))) + b"\0" * 8, "past the end"),
        (_pad(_gguf_header(1, infos=_tinfo("t", [33], 8, 0))) + b"\0" * 64, "not a multiple"),
        (_pad(_gguf_header(1, infos=_tinfo("t", [1, 1, 1, 1, 1], 0, 0))) + b"\0" * 64, "dimensions"),
        (
            _pad(_gguf_header(2, infos=_tinfo("a", [8], 0, 0) + _tinfo("b", [8], 0, 0))) + b"\0" * 64,
            "overlap",
        ),
        (_pad(_gguf_header(1, infos=_tinfo("t", [4], 0, 3))) + b"\0" * 64, "not aligned"),
        (_gguf_header(1, infos=_s("tensorname")[:12]), "truncated"),
    ],
)
def test_gguf_untrusted(tmp_path, blob, match):
    p = tmp_path / "bad.gguf"
    p.write_bytes(blob)
    with pytest.raises(CorruptFile, match=match):
        open_checkpoint(p)


def test_truncated_real_gguf(tmp_path, smollm2_gguf_path):
    data = smollm2_gguf_path.read_bytes()
    for cut in (30, 2_000, 1_000_000, len(data) - 100):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        with pytest.raises(CorruptFile):
            GGUFReader(p)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300), st.integers(0, 4), st.integers(0, 4))
def test_fuzz_gguf_header(tmp_path, data, n_tensors, n_kv):
    p = tmp_path / "f.gguf"
    p.write_bytes(_gguf_header(n_tensors, data, n_kv))
    try:
        r = GGUFReader(p)
        for name in r.names():
            r.read_raw(name)
    except LlmqError:
        pass


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_gguf_mutations(tmp_path, data):
    """Flip bytes of a valid small GGUF: the parser rejects or reads, never crashes or over-allocates."""
    base = tmp_path / "base.gguf"
    if not base.exists():
        _write_gguf(base, {"a": ("F32", np.ones((2, 32), np.float32))})
    blob = bytearray(base.read_bytes())
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    p = tmp_path / "m.gguf"
    p.write_bytes(bytes(blob))
    try:
        r = GGUFReader(p)
        for name in r.names():
            r.read_raw(name)
    except LlmqError:
        pass


# ---------------------------------------------------------------------------------------------- outputs


def test_atomic_output_leaves_nothing_on_error(tmp_path):
    dst = tmp_path / "out.gguf"
    with pytest.raises(ZeroDivisionError), AtomicOutput(dst, is_dir=False) as tmp:
        tmp.write_bytes(b"partial")
        1 / 0  # noqa: B018
    assert not dst.exists() and list(tmp_path.iterdir()) == []
    with AtomicOutput(dst, is_dir=False) as tmp:
        tmp.write_bytes(b"done")
    assert dst.read_bytes() == b"done"
    with pytest.raises(OutputExists):
        check_output(dst, force=False)
    check_output(dst, force=True)


def test_output_never_an_input(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(BadInput, match="overwrite"):
        check_output(tmp_path / "model", force=True, inputs=[tmp_path / "model"])
    with pytest.raises(BadInput, match="inside"):
        check_output(tmp_path / "model" / "x.gguf", force=True, inputs=[tmp_path / "model"])
    with pytest.raises(BadInput, match="does not exist"):
        check_output(tmp_path / "no" / "x.gguf", force=False)


def test_type_nbytes():
    assert type_nbytes("Q4_K", (10, 512)) == 10 * 2 * 144
    assert type_nbytes("F16", (3, 5)) == 30
    with pytest.raises(BadInput):
        type_nbytes("Q4_K", (10, 576))
