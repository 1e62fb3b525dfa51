from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

from tests.helpers import make_tiny_model, shared_dir, smollm2_gguf

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub
try:  # the library reads local data only from $LLMQ_SHARED (it never guesses a path): tell it where CI put it
    os.environ.setdefault("LLMQ_SHARED", str(shared_dir()))
except FileNotFoundError:
    pass

# CI replays the same examples every run (a red build is reproducible); HYPOTHESIS_PROFILE=explore searches anew
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared() -> Path:
    try:
        return shared_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def wikitext(shared: Path) -> str:
    return (shared / "data" / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    from llmq.errors import MissingDependency

    try:
        return smollm2_gguf()
    except MissingDependency as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf_path: Path, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as an HF checkpoint, converted once per session with llmq itself."""
    from llmq.conversion import convert

    out = tmp_path_factory.mktemp("smollm2") / "hf"
    convert(smollm2_gguf_path, out)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Random llama: 2 layers, hidden 256, vocab 512, 2 shards, f32."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def tiny_llama_odd(tmp_path_factory) -> Path:
    """Random llama whose rows are not multiples of 256 (hidden 320, ffn 576), 3 shards, bf16."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama_odd", hidden=320, heads=5, kv_heads=5,
                           ffn=576, shards=3, dtype="bfloat16")  # fmt: skip
