"""The command line: a thin layer whose options are the options of the dataclass each command builds."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
from click.testing import CliRunner

from prefcache.cli import COMMANDS, main
from prefcache.evaluation.config import EvalConfig, ScoreConfig
from prefcache.reference.config import PrecomputeConfig
from prefcache.training.config import TrainConfig

# command -> (the dataclass it builds, the arguments its required options need)
BUILDS = {
    "precompute": (PrecomputeConfig, ["--data", "d.jsonl", "--out", "c"], {"data": "d.jsonl", "out": "c"}),
    "train": (TrainConfig, ["--data", "d.jsonl", "--cache", "c", "--out", "r"], {"data": "d.jsonl", "cache": "c", "out": "r"}),
    "eval": (EvalConfig, ["ckpt", "--tasks", "t"], {"checkpoints": ("ckpt",), "tasks": ("t",)}),
    "score": (ScoreConfig, ["ckpt", "--cache", "c", "--data", "d.jsonl"],
              {"checkpoints": ("ckpt",), "cache": "c", "data": "d.jsonl"}),
}


def _command(name):
    module, attr = COMMANDS[name]
    return getattr(importlib.import_module(module), attr)


def _cli_params(name, args) -> dict:
    """What click hands the command for ``args``: every option, defaults filled in."""
    command = _command(name)
    with command.make_context(name, list(args)) as ctx:
        return dict(ctx.params)


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_every_option_is_a_field_and_every_field_an_option(name):
    cls, _, _ = BUILDS[name]
    options = {p.name for p in _command(name).params if p.name != "config"}
    fields = {f.name for f in dataclasses.fields(cls)}
    assert options - fields == set(), f"{name}: options with no field of {cls.__name__}"
    assert fields - options == set(), f"{name}: fields of {cls.__name__} with no option"


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_the_command_line_defaults_are_the_dataclass_defaults(name):
    cls, args, required = BUILDS[name]
    params = _cli_params(name, args)
    from_cli = cls(**params)
    from_api = cls(**required)
    differ = {f.name: (getattr(from_cli, f.name), getattr(from_api, f.name)) for f in dataclasses.fields(cls)
              if getattr(from_cli, f.name) != getattr(from_api, f.name)}
    assert differ == {}, f"{name}: (command line, Python) defaults differ"


def test_chunk_size_defaults_are_declared_once_per_command():
    assert _cli_params("train", BUILDS["train"][1])["chunk_size"] == TrainConfig.chunk_size
    assert _cli_params("precompute", BUILDS["precompute"][1])["chunk_size"] == PrecomputeConfig.chunk_size
    assert _cli_params("score", BUILDS["score"][1])["chunk_size"] == ScoreConfig.chunk_size


def test_help_lists_every_command_and_each_has_an_example():
    runner = CliRunner()
    top = runner.invoke(main, ["--help"])
    assert top.exit_code == 0
    for name in COMMANDS:
        assert name in top.output
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0, result.output
        assert "Example" in result.output, f"`prefcache {name} --help` shows no example"


def test_bad_option_values_are_one_line_errors_without_a_traceback(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    result = CliRunner().invoke(main, ["train", "--data", str(data), "--loss", "simpo", "--out", str(tmp_path / "r"),
                                       "--beta", "nan"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "beta must be positive and finite, got nan" in result.output


def test_a_config_file_key_that_is_no_option_is_refused(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("data: d.jsonl\nout: c\nmax_lenght: 512\n")
    result = CliRunner().invoke(main, ["precompute", "--config", str(config)])
    assert result.exit_code == 2
    assert "unknown key 'max_lenght' for `prefcache precompute`" in result.output


def test_config_file_values_are_defaults_the_command_line_overrides(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("data: d.jsonl\nout: c\nmax_length: 512\nbatch_size: 2\n")
    params = _cli_params("precompute", ["--config", str(config), "--batch-size", "3"])
    assert (params["data"], params["max_length"], params["batch_size"]) == ("d.jsonl", 512, 3)


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["precompute", "--help"], ["export", "--help"],
                                  ["sql", "--help"], ["score", "--help"]])
def test_help_imports_no_heavy_library(args):
    import subprocess
    import sys

    heavy = ("torch", "transformers", "pyarrow", "duckdb", "polars", "numpy", "lm_eval", "peft", "bitsandbytes")
    code = (f"import sys; from prefcache.cli import main; main({args!r}, standalone_mode=False); "
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=300).stdout
    assert out.strip().splitlines()[-1] == "[]"
