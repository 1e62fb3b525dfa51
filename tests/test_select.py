"""--ignore/--only: the one pattern language (llmq.quant.select) and that every torch-family method uses it."""

from __future__ import annotations

import pytest

from llmq.errors import BadInput
from llmq.io.base import TensorInfo
from llmq.quant.select import DEFAULT_IGNORE, check_patterns, is_selected, matches, select_layers

Q0 = "model.layers.0.self_attn.q_proj"
D0 = "model.layers.0.mlp.down_proj"
Q1 = "model.layers.1.self_attn.q_proj"


def _infos():
    mk = lambda n, s, d="F16": TensorInfo(n, d, s, 0)  # noqa: E731
    return [
        mk("model.embed_tokens.weight", (512, 64)),
        mk(Q0 + ".weight", (64, 64)),
        mk(D0 + ".weight", (64, 128)),
        mk("model.layers.0.input_layernorm.weight", (64,)),
        mk(Q1 + ".weight", (64, 64)),
        mk("model.norm.weight", (64,)),
        mk("lm_head.weight", (512, 64)),
        mk("model.layers.0.self_attn.q_proj.qweight", (8, 64), "I32"),
    ]


@pytest.mark.parametrize(
    ("pattern", "hit"),
    [
        ("q_proj", True),  # a whole dotted part
        ("self_attn.q_proj", True),  # a run of parts
        ("layers.0", True),
        ("model", True),
        ("*.self_attn.*", True),  # a glob over the whole name
        ("model.layers.*.self_attn.q_proj", True),
        ("*q_pr*", True),
        ("re:q_proj$", True),  # a regex, searched
        ("re:^model\\.layers\\.0\\.", True),
        ("proj", False),  # not a whole part
        ("layers.1", False),
        ("ayers.0", False),
        ("Q_PROJ", False),  # case-sensitive
        ("re:^q_proj", False),
        ("model.layers.0.self_attn.q_proj.weight", False),  # module names, not tensor names
    ],
)
def test_pattern_language(pattern, hit):
    assert matches(Q0, pattern) is hit


def test_defaults_ignore_only():
    names = [layer.name for layer in select_layers(_infos())]
    assert names == [Q0, D0, Q1]  # no embeddings, norms, head, or already-packed tensors
    assert "*embed*" in DEFAULT_IGNORE
    names = [layer.name for layer in select_layers(_infos(), ignore=["*.layers.1.*"])]
    assert names == [Q0, D0]
    names = [layer.name for layer in select_layers(_infos(), ignore=["layers.1"])]
    assert names == [Q0, D0]
    # --only overrides the default exclusions
    names = [layer.name for layer in select_layers(_infos(), only=["re:down_proj$", "lm_head"])]
    assert names == [D0, "lm_head"]
    # --ignore wins over --only
    assert [x.name for x in select_layers(_infos(), only=["q_proj"], ignore=["layers.0"])] == [Q1]
    # "output" is the head only as a whole name (GGUF-style), not a part of other modules
    assert not is_selected("output") and is_selected("model.layers.0.attention.output.dense")
    with pytest.raises(BadInput, match="no Linear"):
        select_layers(_infos(), only=["nothing*"])


def test_bad_patterns_fail_early():
    with pytest.raises(BadInput, match="bad pattern"):
        check_patterns(["re:("])
    with pytest.raises(BadInput, match="empty"):
        check_patterns([""])
    assert check_patterns("lm_head") == ("lm_head",)
    from llmq.quant.blockwise.awq import AWQConfig
    from llmq.quant.blockwise.gptq import GPTQConfig
    from llmq.quant.layerwise.nf4 import NF4Config
    from llmq.quant.layerwise.rtn import RTNConfig

    for cls in (RTNConfig, NF4Config, GPTQConfig, AWQConfig):
        with pytest.raises(BadInput, match="bad pattern"):
            cls(ignore=("re:[",))
        assert cls(only="q_proj").only == ("q_proj",)


def test_blockwise_plan_uses_the_same_language(tmp_path):
    """GPTQ/AWQ's metadata plan selects exactly the block Linears the layerwise selection would."""
    pytest.importorskip("transformers")
    from llmq.quant.blockwise.gptq import GPTQConfig
    from llmq.quant.blockwise.pipeline import make_plan, open_source
    from tests.helpers import make_tiny_model

    src = make_tiny_model(tmp_path / "m", layers=2, hidden=64, ffn=128, vocab=128, shards=1)
    reader = open_source(src)
    for ignore, only in [
        ((), ()),
        (("re:layers\\.1\\.",), ()),
        ((), ("mlp",)),
        (("down_proj",), ("layers.0",)),
    ]:
        plan = make_plan(reader, GPTQConfig(ignore=ignore, only=only, group_size=32))
        chosen = [plan.arch.block_prefix(i) + rel for i, blk in enumerate(plan.targets) for rel in blk]
        expected = [x.name for x in select_layers(reader.infos(), ignore=ignore, only=only)]
        assert sorted(chosen) == sorted(expected) and chosen
    reader.close()
