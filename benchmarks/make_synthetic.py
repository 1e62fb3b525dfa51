"""Write a random llama-architecture HF checkpoint of any size, streaming (one tensor in memory at a time).

Used by the streaming test and the convert/quantize benchmarks (e.g. a 1B-class llama: --hidden 2048
--ffn 5632 --layers 22 --vocab 32000 --heads 32 --kv-heads 4).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmq.io import SafetensorsWriter  # noqa: E402
from llmq.io.base import TensorInfo  # noqa: E402
from llmq.io.rows import from_float32  # noqa: E402


def tensors(a) -> list[tuple[str, tuple[int, ...]]]:
    hd = a.hidden // a.heads
    out = [("model.embed_tokens.weight", (a.vocab, a.hidden))]
    for i in range(a.layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (a.hidden,)),
            (p + "self_attn.q_proj.weight", (a.hidden, a.hidden)),
            (p + "self_attn.k_proj.weight", (a.kv_heads * hd, a.hidden)),
            (p + "self_attn.v_proj.weight", (a.kv_heads * hd, a.hidden)),
            (p + "self_attn.o_proj.weight", (a.hidden, a.hidden)),
            (p + "post_attention_layernorm.weight", (a.hidden,)),
            (p + "mlp.gate_proj.weight", (a.ffn, a.hidden)),
            (p + "mlp.up_proj.weight", (a.ffn, a.hidden)),
            (p + "mlp.down_proj.weight", (a.hidden, a.ffn)),
        ]
    out += [("model.norm.weight", (a.hidden,)), ("lm_head.weight", (a.vocab, a.hidden))]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--shard-size", type=int, default=2 * 1000**3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--tokenizer-from",
        type=Path,
        default=None,
        help="copy tokenizer files from this HF directory (a vocabulary llama.cpp's converter knows)",
    )
    a = ap.parse_args()
    code, size = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}[a.dtype]
    specs = tensors(a)
    a.out.mkdir(parents=True, exist_ok=True)
    w = SafetensorsWriter(a.out, max_shard_bytes=a.shard_size)
    w.plan([TensorInfo(n, code, s, int(np.prod(s)) * size) for n, s in specs])
    rng = np.random.default_rng(a.seed)
    for name, shape in specs:
        if len(shape) == 1:
            x = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        else:
            x = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.5 / np.sqrt(shape[1]))
        if code == "BF16":
            x = from_float32(x, "BF16")
        elif code == "F16":
            x = x.astype(np.float16)
        w.write(name, x)
        del x
    w.close()
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.hidden,
        "intermediate_size": a.ffn, "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads, "vocab_size": a.vocab, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 0, "eos_token_id": 0, "torch_dtype": a.dtype,
    }  # fmt: skip
    (a.out / "config.json").write_text(json.dumps(cfg, indent=2))
    if a.tokenizer_from:
        import shutil

        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
            if (a.tokenizer_from / name).exists():
                shutil.copy(a.tokenizer_from / name, a.out / name)
        return
    from tests.helpers import write_tokenizer

    write_tokenizer(a.out, min(a.vocab, 512))


if __name__ == "__main__":
    main()
