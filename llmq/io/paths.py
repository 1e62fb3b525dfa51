"""Symlink policy for model inputs: files of a model may not resolve outside its directory.

A model directory (an HF checkpoint, or the directory holding a GGUF and its split parts) is trusted only for
what lies inside it. A shard, a shard directory, config.json, a tokenizer file or a split part that is a
symlink resolving elsewhere is refused, so a downloaded model cannot make llmq read (and copy into an output,
or print from) a file of the user's choosing elsewhere. Exactly one layout of links out is allowed: the
Hugging Face cache, where ``…/models--owner--name/snapshots/<rev>/FILE`` links into ``…/models--owner--name/blobs/``.
``--allow-symlinks`` (``allow_symlinks(True)``) lifts the policy. The path the user names is theirs to choose:
only what is found through it is checked.
"""

from __future__ import annotations

import os
from pathlib import Path

from llmq.errors import UnsafePath


def _env_default() -> bool:
    return os.environ.get("LLMQ_ALLOW_SYMLINKS", "") not in ("", "0")


_allow = _env_default()


def allow_symlinks(on: bool = True) -> None:
    """Follow symlinks out of model directories (``on``, or LLMQ_ALLOW_SYMLINKS=1) from now on; the CLI sets
    this from ``--allow-symlinks`` at every invocation."""
    global _allow
    _allow = on or _env_default()


def symlinks_allowed() -> bool:
    return _allow


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _hf_blobs(real_root: str) -> str | None:
    """The blobs/ directory of an HF cache snapshot directory, else None."""
    snapshots = os.path.dirname(real_root)
    repo = os.path.dirname(snapshots)
    if os.path.basename(snapshots) == "snapshots" and os.path.basename(repo).startswith(
        ("models--", "datasets--")
    ):
        return os.path.join(repo, "blobs")
    return None


def check_inside(path: str | os.PathLike, root: str | os.PathLike) -> None:
    """Refuse ``path`` (a file or directory found inside model directory ``root``) when it resolves outside
    ``root`` and outside the HF cache's blobs/ of a snapshot directory, unless symlinks are allowed."""
    if _allow:
        return
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if _within(real, real_root):
        return
    blobs = _hf_blobs(real_root)
    if blobs is not None and _within(real, os.path.realpath(blobs)):
        return
    raise UnsafePath(
        f"{path} is a symlink resolving outside the model directory (to {real}); "
        "pass --allow-symlinks if you trust it"
    )


def check_model_dir(directory: str | os.PathLike) -> None:
    """Check every entry of a model directory (shards, shard directories, config and tokenizer files)."""
    if _allow:
        return
    directory = Path(directory)
    for entry in directory.iterdir():
        if entry.is_symlink():
            check_inside(entry, directory)
