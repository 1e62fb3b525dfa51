"""The architecture facts memory depends on, read from an HF config.json or GGUF metadata.

One ``ModelArch`` describes every layer: its kind (full attention, sliding-window attention, recurrent/SSM),
its KV heads and head sizes, so the KV cache code never guesses from hidden_size/num_heads when the model says
otherwise (explicit ``head_dim``, MLA latent sizes, per-layer head counts, ``layer_types``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from llmq.errors import BadInput

FULL, SWA, RECURRENT = "full", "swa", "recurrent"


@dataclass
class ModelArch:
    arch: str
    n_layers: int
    hidden: int
    n_heads: int
    vocab: int
    ffn: int = 0
    layer_kinds: list[str] = field(default_factory=list)
    n_kv_heads: list[int] = field(default_factory=list)  # per layer (0 for recurrent layers)
    head_dim_k: int = 0
    head_dim_v: int = 0
    sliding_window: int = 0
    tied_embeddings: bool = False
    max_context: int = 0
    dtype: str = "BF16"  # the checkpoint's parameter dtype (safetensors code)
    # MoE
    n_experts: int = 0
    n_experts_active: int = 0
    moe_ffn: int = 0
    n_shared_experts: int = 0
    first_dense_layers: int = 0
    # MLA: the cache holds kv_lora_rank + qk_rope_head_dim per token and layer, no V
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    # recurrent state per sequence and recurrent layer, in elements (kept in f32 by llama.cpp and vLLM)
    conv_state: int = 0
    ssm_state: int = 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def kv_elements_per_token(self, layer: int) -> tuple[int, int]:
        """(K elements, V elements) one token adds to one layer's cache."""
        if self.layer_kinds[layer] == RECURRENT:
            return 0, 0
        if self.is_mla:
            return self.kv_lora_rank + self.qk_rope_head_dim, 0
        kvh = self.n_kv_heads[layer]
        return kvh * self.head_dim_k, kvh * self.head_dim_v


def _first(cfg: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float": "F32", "half": "F16"}

# Architectures whose SWA layout is implied rather than listed: period n, the last layer of each period global.
# Families llmq converts declare theirs in llmq.archs (Family.swa_period); these are the others.
_OTHER_SWA_PERIOD = {"cohere2": 4, "gpt_oss": 2, "gpt-oss": 2}


def _swa_period(arch: str) -> int:
    from llmq.archs import FAMILIES, lookup

    family = lookup({"model_type": arch}) or FAMILIES.get(arch)
    return family.swa_period if family is not None else _OTHER_SWA_PERIOD.get(arch, 0)


def _llama_cpp_swa(arch: str) -> bool:
    from llmq.archs import FAMILIES

    family = FAMILIES.get(arch)
    return family is None or family.swa_in_llama_cpp


def _layer_kinds_from_config(cfg: Mapping[str, Any], model_type: str, n_layers: int) -> list[str]:
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == n_layers:
        kinds = []
        for t in types:
            t = str(t)
            if t in ("sliding_attention", "chunked_attention", "local"):
                kinds.append(SWA)
            elif t in ("full_attention", "attention", "global", "hybrid"):
                kinds.append(FULL)
            else:  # mamba, linear_attention, conv, ...
                kinds.append(RECURRENT)
        return kinds
    for key in ("attn_layer_indices", "attention_layer_indices"):  # jamba/falcon-h1 style hybrids
        if isinstance(cfg.get(key), list):
            attn = set(cfg[key])
            return [FULL if i in attn else RECURRENT for i in range(n_layers)]
    if model_type in ("mamba", "mamba2", "falcon_mamba"):
        return [RECURRENT] * n_layers
    window = cfg.get("sliding_window")
    if window and _swa_period(model_type):
        period = int(cfg.get("sliding_window_pattern") or _swa_period(model_type))
        return [SWA if i % period < period - 1 else FULL for i in range(n_layers)]
    if window and model_type in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe"):
        if not cfg.get("use_sliding_window"):
            return [FULL] * n_layers
        first_full = int(cfg.get("max_window_layers") or n_layers)
        return [FULL if i < first_full else SWA for i in range(n_layers)]
    if window and window < int(cfg.get("max_position_embeddings") or 1 << 62):
        return [SWA] * n_layers  # mistral-style: every layer slides
    return [FULL] * n_layers


def from_config(cfg: Mapping[str, Any]) -> ModelArch:
    """Build the ModelArch of an HF config.json (text config of multimodal models)."""
    if isinstance(cfg.get("text_config"), Mapping):
        outer_tied = cfg.get("tie_word_embeddings")
        cfg = {
            **cfg["text_config"],
            **({"tie_word_embeddings": outer_tied} if outer_tied is not None else {}),
        }
    model_type = str(cfg.get("model_type", "unknown"))
    try:
        n_layers = int(_first(cfg, "num_hidden_layers", "n_layer", "num_layers"))
        hidden = int(_first(cfg, "hidden_size", "d_model", "n_embd"))
        vocab = int(cfg["vocab_size"])
    except (KeyError, TypeError, ValueError):
        raise BadInput("config.json lacks num_hidden_layers, hidden_size or vocab_size") from None
    n_heads = int(_first(cfg, "num_attention_heads", "n_head", default=0) or 0)
    kinds = _layer_kinds_from_config(cfg, model_type, n_layers)
    kvh = _first(cfg, "num_key_value_heads", "num_kv_heads", default=n_heads)
    kvh_list = [int(x) for x in kvh] if isinstance(kvh, list) else [int(kvh or n_heads)] * n_layers
    head_dim = int(_first(cfg, "head_dim", default=0) or (hidden // n_heads if n_heads else 0))
    a = ModelArch(
        arch=model_type,
        n_layers=n_layers,
        hidden=hidden,
        n_heads=n_heads,
        vocab=vocab,
        ffn=int(_first(cfg, "intermediate_size", "ffn_hidden_size", "n_inner", default=0) or 4 * hidden),
        layer_kinds=kinds,
        n_kv_heads=[0 if k == RECURRENT else h for k, h in zip(kinds, kvh_list, strict=True)],
        head_dim_k=head_dim,
        head_dim_v=int(_first(cfg, "v_head_dim", default=0) or head_dim),
        sliding_window=int(cfg.get("sliding_window") or 0),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_context=int(_first(cfg, "max_position_embeddings", "n_positions", default=0) or 0),
        dtype=_DTYPES.get(str(_first(cfg, "torch_dtype", "dtype", default="bfloat16")), "BF16"),
        n_experts=int(_first(cfg, "num_local_experts", "n_routed_experts", "num_experts", default=0) or 0),
        n_experts_active=int(_first(cfg, "num_experts_per_tok", "num_experts_per_token", default=0) or 0),
        moe_ffn=int(_first(cfg, "moe_intermediate_size", default=0) or 0),
        n_shared_experts=int(_first(cfg, "n_shared_experts", "num_shared_experts", default=0) or 0),
        first_dense_layers=int(_first(cfg, "first_k_dense_replace", default=0) or 0),
        kv_lora_rank=int(cfg.get("kv_lora_rank") or 0),
        qk_rope_head_dim=int(cfg.get("qk_rope_head_dim") or 0),
    )
    if a.is_moe and not a.moe_ffn:
        a.moe_ffn = a.ffn
    if a.is_mla:
        a.head_dim_k = int(cfg.get("qk_nope_head_dim", 0)) + a.qk_rope_head_dim
    _recurrent_from_config(a, cfg)
    return a


def _recurrent_from_config(a: ModelArch, cfg: Mapping[str, Any]) -> None:
    if RECURRENT not in a.layer_kinds:
        return
    if cfg.get("linear_num_value_heads"):  # qwen3-next gated delta net
        hk, hv = int(cfg["linear_key_head_dim"]), int(cfg["linear_value_head_dim"])
        nk, nv = int(cfg["linear_num_key_heads"]), int(cfg["linear_num_value_heads"])
        a.conv_state = (int(cfg.get("linear_conv_kernel_dim", 4)) - 1) * (2 * nk * hk + nv * hv)
        a.ssm_state = nv * hk * hv
        return
    d_state = int(_first(cfg, "state_size", "mamba_d_state", "ssm_state_size", default=16))
    d_conv = int(_first(cfg, "conv_kernel", "mamba_d_conv", default=4))
    expand = int(_first(cfg, "expand", "mamba_expand", default=2))
    d_inner = int(_first(cfg, "intermediate_size", "mamba_d_inner", default=0) or expand * a.hidden)
    if cfg.get("model_type") in ("jamba",) or not cfg.get("n_groups", cfg.get("mamba_n_groups")):
        groups = 0  # mamba-1: conv over d_inner only
    else:
        groups = int(_first(cfg, "n_groups", "mamba_n_groups", default=1))
    a.conv_state = (d_conv - 1) * (d_inner + 2 * groups * d_state)
    a.ssm_state = d_state * d_inner


def _per_layer(value: Any, n: int) -> list[int]:
    if isinstance(value, list) and len(value) == n:
        return [int(v) for v in value]
    return [int(value)] * n


def from_gguf(meta: Mapping[str, Any], tensors: list | None = None) -> ModelArch:
    """Build the ModelArch of a GGUF file from its metadata keys (the names llama.cpp reads)."""
    arch = str(meta.get("general.architecture", ""))
    p = arch + "."
    try:
        n_layers = int(meta[p + "block_count"])
        hidden = int(meta[p + "embedding_length"])
    except (KeyError, TypeError, ValueError):
        raise BadInput(f"GGUF metadata lacks {p}block_count / {p}embedding_length") from None
    heads = _per_layer(meta.get(p + "attention.head_count", 0), n_layers)
    kvh = _per_layer(meta.get(p + "attention.head_count_kv", heads), n_layers)
    n_heads = max(heads) if heads else 0
    vocab = meta.get(p + "vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    if not vocab and tensors:
        vocab = next((t.shape[0] for t in tensors if t.name == "token_embd.weight"), 0)
    head_k = int(meta.get(p + "attention.key_length") or (hidden // n_heads if n_heads else 0))
    window = int(meta.get(p + "attention.sliding_window") or 0)
    if window and not _llama_cpp_swa(arch):
        window = 0
    kinds = [FULL] * n_layers
    pattern = meta.get(p + "attention.sliding_window_pattern")
    if window:
        if isinstance(pattern, list) and len(pattern) == n_layers:
            kinds = [SWA if x else FULL for x in pattern]
        else:
            period = int(pattern) if isinstance(pattern, int) else _swa_period(arch)
            kinds = [SWA if period == 0 or i % period < period - 1 else FULL for i in range(n_layers)]
    ssm_inner = int(meta.get(p + "ssm.inner_size") or 0)
    if (
        ssm_inner
    ):  # llama.cpp marks recurrent layers by a zero KV head count in hybrids, all layers in pure SSMs
        kinds = [
            RECURRENT if h == 0 or not meta.get(p + "attention.head_count") else k
            for k, h in zip(kinds, kvh, strict=True)
        ]
    a = ModelArch(
        arch=arch,
        n_layers=n_layers,
        hidden=hidden,
        n_heads=n_heads,
        vocab=int(vocab),
        ffn=max(_per_layer(meta.get(p + "feed_forward_length", 0), n_layers)),
        layer_kinds=kinds,
        n_kv_heads=[0 if k == RECURRENT else h for k, h in zip(kinds, kvh, strict=True)],
        head_dim_k=head_k,
        head_dim_v=int(meta.get(p + "attention.value_length") or head_k),
        sliding_window=window,
        tied_embeddings=bool(tensors) and not any(t.name == "output.weight" for t in tensors),
        max_context=int(meta.get(p + "context_length") or 0),
        n_experts=int(meta.get(p + "expert_count") or 0),
        n_experts_active=int(meta.get(p + "expert_used_count") or 0),
        moe_ffn=int(meta.get(p + "expert_feed_forward_length") or 0),
        n_shared_experts=int(meta.get(p + "expert_shared_count") or 0),
        first_dense_layers=int(meta.get(p + "leading_dense_block_count") or 0),
        kv_lora_rank=int(meta.get(p + "attention.kv_lora_rank") or 0),
    )
    if a.is_mla:
        a.qk_rope_head_dim = int(meta.get(p + "rope.dimension_count") or 0)
    if ssm_inner:
        d_state, d_conv = int(meta.get(p + "ssm.state_size") or 0), int(meta.get(p + "ssm.conv_kernel") or 0)
        groups = int(meta.get(p + "ssm.group_count") or 0)
        a.conv_state = max(d_conv - 1, 0) * (ssm_inner + 2 * groups * d_state)
        a.ssm_state = d_state * ssm_inner
    return a
