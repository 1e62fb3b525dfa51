"""What one architecture family is, as data: the class every module of llmq/archs/ instantiates.

A :class:`Family` holds every per-architecture fact the commands need: HF ⇄ GGUF tensor names, the metadata
keys both ways, tensor transforms (q/k permutation, Gemma's norm offset), tokenizer kind, the GPTQ/AWQ
sequential and scale groups, and the estimator's sliding-window layout. Families with extra metadata subclass
it and override :meth:`Family.gguf_kv` / :meth:`Family.hf_config`. Nothing here imports torch.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmq.errors import UnsupportedArchitecture

KV = list[tuple[str, Any, Any]]  # (key, value, GGUFValueType or None to infer)

# HF name ({bid} = block index) -> GGUF name, shared by every llama-layout family.
LLAMA_TENSORS: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{bid}.input_layernorm.weight": "blk.{bid}.attn_norm.weight",
    "model.layers.{bid}.self_attn.q_proj.weight": "blk.{bid}.attn_q.weight",
    "model.layers.{bid}.self_attn.q_proj.bias": "blk.{bid}.attn_q.bias",
    "model.layers.{bid}.self_attn.k_proj.weight": "blk.{bid}.attn_k.weight",
    "model.layers.{bid}.self_attn.k_proj.bias": "blk.{bid}.attn_k.bias",
    "model.layers.{bid}.self_attn.v_proj.weight": "blk.{bid}.attn_v.weight",
    "model.layers.{bid}.self_attn.v_proj.bias": "blk.{bid}.attn_v.bias",
    "model.layers.{bid}.self_attn.o_proj.weight": "blk.{bid}.attn_output.weight",
    "model.layers.{bid}.self_attn.o_proj.bias": "blk.{bid}.attn_output.bias",
    "model.layers.{bid}.self_attn.q_norm.weight": "blk.{bid}.attn_q_norm.weight",
    "model.layers.{bid}.self_attn.k_norm.weight": "blk.{bid}.attn_k_norm.weight",
    "model.layers.{bid}.post_attention_layernorm.weight": "blk.{bid}.ffn_norm.weight",
    "model.layers.{bid}.mlp.gate_proj.weight": "blk.{bid}.ffn_gate.weight",
    "model.layers.{bid}.mlp.up_proj.weight": "blk.{bid}.ffn_up.weight",
    "model.layers.{bid}.mlp.down_proj.weight": "blk.{bid}.ffn_down.weight",
    "model.layers.{bid}.mlp.gate_proj.bias": "blk.{bid}.ffn_gate.bias",
    "model.layers.{bid}.mlp.up_proj.bias": "blk.{bid}.ffn_up.bias",
    "model.layers.{bid}.mlp.down_proj.bias": "blk.{bid}.ffn_down.bias",
}

LLAMA_BLOCK = tuple(f"{t}.weight" for t in (
    "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down",
))  # fmt: skip

# HF tensors that carry no weights llama.cpp uses
SKIPPED_HF = re.compile(r"(\.rotary_emb\.inv_freq|\.attention\.masked_bias|\.attention\.bias)$")


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read the same input, and the op whose output that input is (AWQ folds scales into it).

    ``inspect`` is the submodule whose output measures the loss of a scale choice (the attention for q/k/v, the
    MLP for gate/up, the Linear itself otherwise). ``prev_kind`` is "norm" or "linear".
    """

    prev: str
    prev_kind: str
    linears: tuple[str, ...]
    inspect: str


ATTN_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MLP_IN = ("mlp.gate_proj", "mlp.up_proj")
LLAMA_SEQUENTIAL: tuple[tuple[str, ...], ...] = (ATTN_QKV, ("self_attn.o_proj",), MLP_IN, ("mlp.down_proj",))


def llama_scale_groups(post_attn_norm: str = "post_attention_layernorm") -> tuple[ScaleGroup, ...]:
    return (
        ScaleGroup("input_layernorm", "norm", ATTN_QKV, "self_attn"),
        # v -> o only works when v's output rows map one-to-one to o's input columns (no GQA); checked at run time
        ScaleGroup("self_attn.v_proj", "linear", ("self_attn.o_proj",), "self_attn.o_proj"),
        ScaleGroup(post_attn_norm, "norm", MLP_IN, "mlp"),
        ScaleGroup("mlp.up_proj", "linear", ("mlp.down_proj",), "mlp.down_proj"),
    )


@dataclass(frozen=True)
class Family:
    name: str  # registry key; also the GGUF general.architecture
    model_types: tuple[str, ...]  # HF config.json model_type values this family covers
    hf_classes: tuple[str, ...]  # config.json "architectures" it converts from
    hf_class: str  # what GGUF -> HF writes
    tensors: Mapping[str, str] = field(default_factory=lambda: LLAMA_TENSORS)
    permute_qk: bool = False  # llama.cpp's llama arch wants q/k rows interleaved per head
    # RMSNorm multiplies by (1 + w) (Gemma): llama.cpp stores 1 + w; AWQ folds scales as (1 + w) / s - 1
    norm_shift: float = 0.0
    tied_output: bool = False  # llama.cpp never reads an lm_head for it
    attention_bias: bool | None = None  # written into config.json (GGUF -> HF) when not None
    extra_config: Mapping[str, Any] = field(default_factory=dict)  # constant config.json entries
    tokenizer: str = "llama"  # how convert_hf_to_gguf.py picks the vocabulary (see llmq.io.tokenizer)
    writes_vocab_size: bool = False  # llama's converter adds vocab_size and rope.dimension_count
    # block-wise quantizers (GPTQ/AWQ)
    layers: str = "model.layers"
    sequential: tuple[tuple[str, ...], ...] = LLAMA_SEQUENTIAL
    scale_groups: tuple[ScaleGroup, ...] = field(default_factory=llama_scale_groups)
    # estimator: implied sliding-window period (last layer of each period global), 0 = none
    swa_period: int = 0
    swa_in_llama_cpp: bool = True  # False: llama.cpp ignores the config's sliding window (Phi-3)
    # validation: GGUF tensors every model of the family has (output.weight unless tied), per block and global
    block_tensors: tuple[str, ...] = LLAMA_BLOCK
    global_tensors: tuple[str, ...] = ("token_embd.weight", "output_norm.weight", "output.weight")
    # GGUF tensors derived from the config (rope factors): written HF -> GGUF, dropped GGUF -> HF
    gguf_only: tuple[str, ...] = ("rope_freqs.weight",)

    @property
    def gguf_arch(self) -> str:
        return self.name

    # -------------------------------------------------------------------------------------- metadata hooks
    def source_config(self, config: Mapping[str, Any]) -> Mapping[str, Any]:
        """The config of the language model inside a checkpoint's config.json (multimodal wrappers nest it)."""
        return config

    def source_name(self, name: str) -> str | None:
        """A checkpoint tensor name in the family's text-model naming; None for tensors outside it (vision)."""
        return name

    def gguf_kv(self, config: Mapping[str, Any]) -> KV:
        """Family-specific KVs written after the attention key/value lengths."""
        return []

    def rope_kv(self, config: Mapping[str, Any]) -> KV:
        """Rope scaling and base-frequency KVs (see llmq.archs.rope)."""
        from llmq.archs.rope import gguf_rope_kv

        return gguf_rope_kv(self.name, config)

    def extra_tensors(self, config: Mapping[str, Any]) -> list[tuple[str, np.ndarray]]:
        """GGUF-only float32 tensors derived from the config, written before the model's tensors."""
        return []

    def hf_config(self, meta: Mapping[str, Any], head_dim: int) -> dict[str, Any]:
        """Family-specific config.json entries read back from GGUF KVs."""
        return {}

    def tensor_shapes(self, d: Any) -> dict[str, tuple[int, ...]]:
        """Shape (out, in) each tensor must have for dimensions ``d`` (a validate.Dims), by GGUF name without
        the ``blk.N.`` prefix."""
        h, f, hd = d.hidden, d.ffn, d.head_dim
        q, kv = d.heads * hd, d.kv_heads * hd
        out = {"attn_q": (q, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, q),
               "ffn_gate": (f, h), "ffn_up": (f, h), "ffn_down": (h, f)}  # fmt: skip
        shapes = {f"{k}.weight": v for k, v in out.items()} | {f"{k}.bias": v[:1] for k, v in out.items()}
        for norm in ("attn_norm", "ffn_norm", "post_attention_norm", "post_ffw_norm", "output_norm"):
            shapes[f"{norm}.weight"] = (h,)
        shapes["attn_q_norm.weight"] = shapes["attn_k_norm.weight"] = (hd,)
        if d.vocab:
            shapes["token_embd.weight"] = shapes["output.weight"] = (d.vocab, h)
        return shapes

    # -------------------------------------------------------------------------------------- tensor names
    def hf_to_gguf_name(self, name: str) -> str | None:
        """GGUF name of an HF tensor, None for tensors llama.cpp does not use; raises for unknown tensors."""
        source = self.source_name(name)
        if source is None:
            return None
        name = source
        if SKIPPED_HF.search(name) or (self.tied_output and name == "lm_head.weight"):
            return None
        got = _lookup(_compiled(tuple(self.tensors.items())), name)
        if got is None:
            raise UnsupportedArchitecture(f"tensor {name} has no GGUF name for architecture {self.name}")
        return got

    def gguf_to_hf_name(self, name: str) -> str | None:
        """HF name of a GGUF tensor; None for GGUF-only tensors (rope_freqs) HF derives from the config."""
        if name in self.gguf_only:
            return None
        got = _lookup(_compiled(tuple((v, k) for k, v in self.tensors.items())), name)
        if got is None:
            raise UnsupportedArchitecture(
                f"GGUF tensor {name} has no Hugging Face name for architecture {self.name}"
            )
        return got

    def shifted_norm(self, gguf_name: str) -> bool:
        """Whether this tensor is stored as (1 + w) in GGUF."""
        return bool(self.norm_shift) and gguf_name.endswith("norm.weight")

    def qk_heads(self, hf_name: str, n_head: int, n_head_kv: int) -> int | None:
        """Heads to (un)permute over for this HF tensor; None when the family or tensor needs none."""
        if not self.permute_qk:
            return None
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return n_head
        if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return n_head_kv
        return None

    # -------------------------------------------------------------------------------------- block-wise
    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.sequential for name in group)

    @property
    def norm_offset(self) -> float:
        return self.norm_shift

    def block_prefix(self, i: int) -> str:
        return f"{self.layers}.{i}."


@functools.lru_cache(maxsize=64)
def _compiled(pairs: tuple[tuple[str, str], ...]) -> list[tuple[re.Pattern[str], str]]:
    out = []
    for src, dst in pairs:
        pat = re.escape(src).replace(r"\{bid\}", r"(?P<bid>\d+)")
        out.append((re.compile(f"^{pat}$"), dst))
    return out


def _lookup(table: list[tuple[re.Pattern[str], str]], name: str) -> str | None:
    for pat, dst in table:
        m = pat.match(name)
        if m:
            return dst.format(bid=m.groupdict().get("bid", ""))
    return None


def head_dim(config: Mapping[str, Any]) -> int:
    hd = config.get("head_dim")
    return int(hd) if hd else int(config["hidden_size"]) // int(config["num_attention_heads"])


def f32_short(value: Any) -> float:
    """A GGUF float32 as the short decimal it was written from (9.999999747e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF → llama.cpp row order of a q/k projection: per head, rotary halves become interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of :func:`permute_qk`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
