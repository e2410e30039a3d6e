"""prefcache.core.runconfig and --config: options from YAML files, flags winning, every run saving its own."""

from __future__ import annotations

import yaml
from click.testing import CliRunner
from conftest import write_jsonl

STACK = [{"question": f"What is {i}+{i}?", "response_j": f" {2 * i}", "response_k": f" {2 * i + 1}"} for i in range(6)]


def test_precompute_and_train_from_yaml_and_their_saved_configs_rerun(tmp_path, tiny_model):
    from prefcache.cache.store import read_metadata
    from prefcache.cli import main

    data = write_jsonl(tmp_path / "se.jsonl", STACK)
    (tmp_path / "pre.yaml").write_text(
        f"data: {data}\nout: {tmp_path / 'cache'}\nmodel: {tiny_model}\nmax-length: 48\nquantize: fp32\n"
        "device: cpu\nprogress: false\n"
        "columns: {prompt: question, chosen: response_j, rejected: response_k}\n"
        'prompt_template: "Question: {prompt}\\n\\nAnswer: "\n')
    runner = CliRunner()
    res = runner.invoke(main, ["precompute", "--config", str(tmp_path / "pre.yaml"), "--max-length", "64"])
    assert res.exit_code == 0, res.output
    meta = read_metadata(tmp_path / "cache")
    assert meta["max_length"] == 64  # the flag wins over the file
    assert meta["data_mapping"]["prompt_template"] == "Question: {prompt}\n\nAnswer: "
    saved = yaml.safe_load((tmp_path / "cache" / "config.yaml").read_text())
    assert saved["max_length"] == 64 and saved["columns"] == "prompt=question,chosen=response_j,rejected=response_k"
    # The saved config reruns the same cache: nothing left to score.
    res = runner.invoke(main, ["precompute", "--config", str(tmp_path / "cache" / "config.yaml")])
    assert res.exit_code == 0 and "0 pairs scored, 6 already cached" in res.output, res.output
    # Any command takes --config; keys may be the option's spelling (`json` for --json).
    (tmp_path / "inspect.yaml").write_text(f"cache: {tmp_path / 'cache'}\njson: true\n")
    res = runner.invoke(main, ["inspect", "--config", str(tmp_path / "inspect.yaml")])
    assert res.exit_code == 0 and '"rows": 6' in res.output, res.output

    res = runner.invoke(main, ["train", "--data", str(data), "--cache", str(tmp_path / "cache"), "--out",
                               str(tmp_path / "run1"), "--model", str(tiny_model), "--max-steps", "1", "--lora-r", "2",
                               "--device", "cpu", "--no-progress", "--max-grad-norm", "0",
                               "--columns", saved["columns"], "--prompt-template", saved["prompt_template"]])
    assert res.exit_code == 0, res.output
    first = yaml.safe_load((tmp_path / "run1" / "config.yaml").read_text())
    assert first["max_grad_norm"] is None and first["loss"] == ["sigmoid"] and first["progress"] is False
    res = runner.invoke(main, ["train", "--config", str(tmp_path / "run1" / "config.yaml"), "--out", str(tmp_path / "run2")])
    assert res.exit_code == 0, res.output
    again = yaml.safe_load((tmp_path / "run2" / "config.yaml").read_text())
    assert again == {**first, "out": str(tmp_path / "run2")}


def test_bad_config_files_are_one_clear_line(tmp_path):
    from prefcache.cli import main

    (tmp_path / "typo.yaml").write_text("data: x.jsonl\nout: c\nmax_lenght: 5\n")
    res = CliRunner().invoke(main, ["precompute", "--config", str(tmp_path / "typo.yaml")])
    assert res.exit_code == 2 and "unknown key 'max_lenght' for `prefcache precompute`" in res.output
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    res = CliRunner().invoke(main, ["train", "--config", str(tmp_path / "list.yaml")])
    assert res.exit_code == 2 and "expected a mapping of option names" in res.output


def test_every_option_of_a_config_class_is_a_command_line_option():
    """A saved config.yaml can only be read back if each dataclass field is an option of its command."""
    from dataclasses import fields

    from prefcache.cli import main
    from prefcache.evaluation.config import EvalConfig, ScoreConfig
    from prefcache.reference.config import PrecomputeConfig
    from prefcache.training.config import TrainConfig

    for name, cls in (("precompute", PrecomputeConfig), ("train", TrainConfig), ("eval", EvalConfig),
                      ("score", ScoreConfig)):
        params = {p.name for p in main.get_command(None, name).params}
        missing = [f.name for f in fields(cls) if f.name not in params]
        assert not missing, f"{name}: {missing}"
