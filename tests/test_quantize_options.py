"""`llmq quantize -O key=value` and `--config FILE`: a plugin's own options, checked against its config."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import pytest
from typer.testing import CliRunner

from llmq.errors import BadInput
from llmq.io.base import AtomicOutput, TensorInfo
from llmq.quant.base import QuantConfig, QuantizeResult, gather_options, quantizers


@dataclass(frozen=True)
class ToyConfig(QuantConfig):
    format: str = "toy"
    bits: int = 4
    alpha: float = 0.5
    levels: tuple[int, ...] = (4, 8)
    verbose: bool = False
    note: str | None = "default"
    mode: Literal["fast", "exact"] = "fast"

    def __post_init__(self) -> None:
        if self.alpha < 0:
            raise BadInput("alpha must be >= 0")


class ToyQuantizer:
    """Writes its config as JSON: enough to see which values reached it."""

    name: ClassVar[str] = "toy"
    config_cls: ClassVar[type[QuantConfig]] = ToyConfig
    formats: ClassVar[tuple[str, ...]] = ("toy",)

    def plan(self, src: Path, config: QuantConfig):
        return [TensorInfo("w", "U8", (3,), 3)]

    def run(self, src, out, config, *, force=False, progress=None) -> QuantizeResult:
        with AtomicOutput(out, is_dir=False, force=force) as tmp:
            tmp.write_text(json.dumps(config.to_dict()))
        return QuantizeResult(output=out, method="toy", format="toy", config=config.to_dict(), n_params=3)


@pytest.fixture
def toy():
    quantizers.add("toy", ToyQuantizer)
    yield
    quantizers._items.pop("toy", None)


def _run(tmp_path: Path, *args: str):
    from llmq.cli.app import app

    (tmp_path / "src").mkdir(exist_ok=True)
    out = tmp_path / "out.json"
    out.unlink(missing_ok=True)
    res = CliRunner().invoke(app, ["quantize", str(tmp_path / "src"), "-o", str(out), "-m", "toy", *args])
    return res, (json.loads(out.read_text()) if out.exists() else None)


def test_plugin_options_from_o_flags(toy, tmp_path):
    res, cfg = _run(tmp_path, "-O", "alpha=0.25", "-O", "levels=2", "-O", "levels=3", "-O", "verbose=yes",
                    "-O", "note=none", "-O", "mode=exact", "--option", "bits=8")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert cfg["alpha"] == 0.25 and cfg["levels"] == [2, 3] and cfg["verbose"] is True
    assert cfg["note"] is None and cfg["mode"] == "exact" and cfg["bits"] == 8
    res, cfg = _run(tmp_path, "-O", "levels=[1, 5, 7]", "-O", "bits=2")
    assert res.exit_code == 0 and cfg["levels"] == [1, 5, 7] and cfg["bits"] == 2


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_plugin_options_from_file_flags_override(toy, tmp_path, suffix):
    conf = tmp_path / f"toy{suffix}"
    if suffix == ".toml":
        conf.write_text('alpha = 2\nlevels = [3]\nverbose = true\nmode = "exact"\nbits = 3\nversion = 1\n')
    else:
        conf.write_text(json.dumps({"alpha": 2, "levels": [3], "verbose": True, "mode": "exact", "bits": 3}))
    res, cfg = _run(tmp_path, "--config", str(conf))
    assert res.exit_code == 0, res.output
    assert cfg["alpha"] == 2.0 and isinstance(cfg["alpha"], float) and cfg["levels"] == [3]
    assert cfg["verbose"] is True and cfg["mode"] == "exact" and cfg["bits"] == 3
    # -O overrides the file, an explicit common flag overrides both
    res, cfg = _run(tmp_path, "--config", str(conf), "-O", "alpha=1.5", "-O", "bits=5", "--bits", "6")
    assert res.exit_code == 0, res.output
    assert cfg["alpha"] == 1.5 and cfg["bits"] == 6 and cfg["levels"] == [3]


def test_saved_config_round_trips(toy, tmp_path):
    """The ``config`` of a result, saved as JSON, is a valid --config file and gives the same config."""
    res, cfg = _run(tmp_path, "-O", "alpha=0.75", "-O", "mode=exact")
    conf = tmp_path / "saved.json"
    conf.write_text(json.dumps(cfg))
    res, again = _run(tmp_path, "--config", str(conf))
    assert res.exit_code == 0, res.output
    assert again == cfg


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["-O", "gamma=1"], ["no option 'gamma'", "alpha", "levels", "verbose", "mode", "note"]),
        (["-O", "alpha=big"], ["alpha", "number", "big"]),
        (["-O", "bits=2.5"], ["bits", "integer"]),
        (["-O", "verbose=maybe"], ["verbose", "true or false"]),
        (["-O", "mode=slow"], ["mode", "fast", "exact"]),
        (["-O", "levels=[1, x]"], ["levels", "JSON"]),
        (["-O", "alpha"], ["key=value"]),
        (["-O", "alpha=-1"], ["alpha must be >= 0"]),
        (["--quant-type", "nf4"], ["--quant-type cannot be used with --method toy"]),
    ],
)
def test_bad_options_are_one_clear_error(toy, tmp_path, args, words):
    res, cfg = _run(tmp_path, *args)
    assert isinstance(res.exception, BadInput), res.output
    for w in words:
        assert w in str(res.exception)
    assert cfg is None


def test_bad_config_files(toy, tmp_path):
    bad = {"a.toml": "alpha = = 1", "b.json": "[1, 2]", "c.yaml": "alpha: 1", "d.json": '{"levels": "x"}'}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        res, cfg = _run(tmp_path, "--config", str(tmp_path / name))
        assert isinstance(res.exception, BadInput) and cfg is None, (name, res.output)
    res, _ = _run(tmp_path, "--config", str(tmp_path / "missing.toml"))
    assert isinstance(res.exception, BadInput) and "no such file" in str(res.exception)
    (tmp_path / "new.json").write_text('{"version": 99}')
    res, _ = _run(tmp_path, "--config", str(tmp_path / "new.json"))
    assert isinstance(res.exception, BadInput) and "newer" in str(res.exception)


def test_builtin_method_takes_o_and_dry_run(tiny_llama, tmp_path):
    """-O reaches a built-in method too (rtn's group_size), and --dry-run uses it."""
    from llmq.cli.app import app

    res = CliRunner().invoke(app, ["quantize", str(tiny_llama), "-o", str(tmp_path / "o"), "-m", "rtn",
                                   "-O", "group_size=64", "--dry-run", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["config"]["group_size"] == 64


def test_gather_options_order(tmp_path):
    f = tmp_path / "c.json"
    f.write_text('{"group-size": 32, "bits": 3}')
    assert gather_options(["group_size=64", "x=1", "x=2"], f) == {
        "bits": 3,
        "group_size": "64",
        "x": ["1", "2"],
    }
