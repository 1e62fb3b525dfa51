"""llama.cpp's own tools, built once from the llama-cpp-python source distribution, for side-by-side checks.

``llama_perplexity()`` returns the path of a ``llama-perplexity`` binary built from the ``vendor/llama.cpp`` tree
of the *installed* llama-cpp-python version (so both sides run the same ggml), or None when that is impossible
(no cmake/compiler, no network for the sdist, build failure). The build lives in
``~/.cache/llmq/llama.cpp-<version>/`` (``LLMQ_CACHE`` overrides ``~/.cache/llmq``) and is reused; a lock file
keeps concurrent callers from building twice. ``LLMQ_LLAMACPP_SRC`` may name an sdist tarball, an unpacked
sdist or a llama.cpp tree to build from instead of downloading.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

TOOL = "llama-perplexity"


def cache_root() -> Path:
    return Path(os.environ.get("LLMQ_CACHE", Path.home() / ".cache" / "llmq"))


def installed_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


def tool_dir(version: str) -> Path:
    return cache_root() / f"llama.cpp-{version}"


def _llama_tree(root: Path) -> Path | None:
    """The llama.cpp source tree inside an unpacked sdist, or ``root`` itself if it is one."""
    for cand in (root, root / "vendor" / "llama.cpp", *root.glob("*/vendor/llama.cpp")):
        if (cand / "CMakeLists.txt").is_file() and (cand / "tools" / "perplexity").is_dir():
            return cand
    return None


def _safe_extract(archive: Path, dest: Path) -> None:
    with tarfile.open(archive) as tar:
        if sys.version_info >= (3, 12):
            tar.extractall(dest, filter="data")
        else:
            base = dest.resolve()
            for m in tar.getmembers():
                target = (dest / m.name).resolve()
                if base not in target.parents and target != base or m.issym() or m.islnk() or m.isdev():
                    raise RuntimeError(f"refusing unsafe member {m.name} in {archive}")
            tar.extractall(dest)


def _source(work: Path, version: str, log) -> Path | None:
    env = os.environ.get("LLMQ_LLAMACPP_SRC")
    if env:
        p = Path(env)
        if p.is_dir():
            return _llama_tree(p)
        if p.is_file():
            _safe_extract(p, work / "src")
            return _llama_tree(work / "src")
        return None
    src = work / "src"
    tree = _llama_tree(src) if src.is_dir() else None
    if tree:
        return tree
    dl = work / "sdist"
    dl.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"llama-cpp-python=={version}", "-d", str(dl)]  # fmt: skip
    if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
        return None
    archives = sorted(dl.glob("llama_cpp_python-*.tar.gz"))
    if not archives:
        return None
    _safe_extract(archives[-1], src)
    return _llama_tree(src)


def _build(tree: Path, work: Path, log) -> Path | None:
    build = work / "build"
    jobs = str(
        max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    )
    configure = [
        "cmake", "-S", str(tree), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
        # The same CPU code paths as the llama-cpp-python wheel built on this machine (GGML_NATIVE).
        "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF",
        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
        "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_APP=OFF",
    ]  # fmt: skip
    steps = [configure, ["cmake", "--build", str(build), "--target", TOOL, "-j", jobs]]
    for cmd in steps:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
            return None
    found = [p for p in build.rglob(TOOL) if p.is_file() and os.access(p, os.X_OK)]
    return found[0] if found else None


def llama_perplexity(build: bool = True) -> Path | None:
    """Path of a cached ``llama-perplexity``; build it when missing and ``build`` is set. None if impossible."""
    version = installed_version()
    if version is None:
        return None
    work = tool_dir(version)
    binary = work / "bin" / TOOL
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    if not build or shutil.which("cmake") is None or not (shutil.which("c++") or shutil.which("g++")):
        return None
    work.mkdir(parents=True, exist_ok=True)
    with open(work / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second caller waits here, then finds the binary
        if binary.is_file():
            return binary
        with open(work / "build.log", "ab") as log:
            try:
                tree = _source(work, version, log)
                built = _build(tree, work, log) if tree else None
            except (OSError, RuntimeError, tarfile.TarError) as e:
                log.write(f"failed: {e}\n".encode())
                built = None
        if built is None:
            return None
        binary.parent.mkdir(parents=True, exist_ok=True)
        tmp = binary.with_suffix(".tmp")
        shutil.copy2(built, tmp)
        os.replace(tmp, binary)
    return binary
