"""Each option declared once (a dataclass field), and the option rules of issue 20: what a saved config
replays, one range rule for every number, the same loss refusals for pairs and unpaired examples, and no
option silently ignored."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import typing

import pytest
import yaml
from click.testing import CliRunner

from prefcache.cli import COMMANDS, main
from prefcache.cli.fields import FieldOption
from prefcache.core.runconfig import to_yaml, write_config
from prefcache.data.columns import unescape
from prefcache.evaluation.config import EvalConfig, ScoreConfig
from prefcache.losses.registry import check_loss_options
from prefcache.reference.config import PrecomputeConfig
from prefcache.training.config import TrainConfig

CONFIGS = {"precompute": PrecomputeConfig, "train": TrainConfig, "eval": EvalConfig, "score": ScoreConfig}
REQUIRED = {"precompute": {"data": "d.jsonl", "out": "c"}, "train": {"data": "d.jsonl", "cache": "c", "out": "r"},
            "eval": {"checkpoints": ("ckpt",), "tasks": ("t",)},
            "score": {"checkpoints": ("ckpt",), "cache": "c", "data": "d.jsonl"}}
ARGS = {"precompute": ["--data", "d.jsonl", "--out", "c"], "train": ["--data", "d.jsonl", "--cache", "c", "--out", "r"]}


def _command(name):
    module, attr = COMMANDS[name]
    return getattr(importlib.import_module(module), attr)


def _cli_params(name, args) -> dict:
    with _command(name).make_context(name, list(args)) as ctx:
        return dict(ctx.params)


# -- declared once ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_parameter_of_a_command_is_built_from_a_field(name):
    """No command declares an option (or its default) by hand: each parameter comes from a field."""
    fields = {f.name for f in dataclasses.fields(CONFIGS[name])}
    for p in _command(name).params:
        if p.name != "config":
            assert isinstance(p, FieldOption) or (p.name in fields and p.param_type_name == "argument"), p.name


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_field_has_help(name):
    for f in dataclasses.fields(CONFIGS[name]):
        assert f.metadata.get("help"), f"{CONFIGS[name].__name__}.{f.name} has no help"


def test_help_shows_defaults_ranges_and_choices():
    out = CliRunner().invoke(main, ["train", "--help"], terminal_width=200).output
    assert "--beta FLOAT" in out and "[default: 0.1]" in out
    assert "--f-divergence [reverse_kl|forward_kl|js_divergence|alpha_divergence]" in out
    assert "--label-smoothing FLOAT" in out and "(in [0.0, 0.5])" in out
    assert "--resume / --no-resume" in out and "--progress / --no-progress" in out


# -- issue 20 item 3: the saved config replays the run ----------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_boolean_option_has_its_no_form(name):
    hints = typing.get_type_hints(CONFIGS[name])
    bools = [f.name for f in dataclasses.fields(CONFIGS[name]) if hints[f.name] in (bool, bool | None)]
    params = {p.name: p for p in _command(name).params}
    for field in bools:
        assert params[field].secondary_opts == [f"--no-{field.replace('_', '-')}"], field


def test_resume_is_not_saved_and_an_old_config_holding_it_does_not_replay_it(tmp_path):
    config = TrainConfig(data="d.jsonl", cache="c", out="r", resume=True)
    saved = yaml.safe_load(to_yaml(config))
    assert "resume" not in saved and saved["data"] == "d.jsonl"
    old = tmp_path / "config.yaml"  # as versions before this one wrote it after a resume
    old.write_text(yaml.safe_dump({**saved, "resume": True}))
    params = _cli_params("train", ["--config", str(old), "--out", "r2"])
    assert params["resume"] is False and params["out"] == "r2"
    assert _cli_params("train", ["--config", str(old), "--resume"])["resume"] is True
    assert _cli_params("train", [*ARGS["train"], "--resume", "--no-resume"])["resume"] is False


def test_a_saved_flag_is_overridden_by_its_no_form(tmp_path):
    path = write_config(TrainConfig(data="d.jsonl", cache="c", out="r", use_weighting=True), tmp_path / "c.yaml")
    assert _cli_params("train", ["--config", str(path)])["use_weighting"] is True
    assert _cli_params("train", ["--config", str(path), "--no-use-weighting"])["use_weighting"] is False
    path.write_text("data: d.jsonl\nout: c\nno_progress: true\n")  # an option's own spelling, as before
    assert _cli_params("precompute", ["--config", str(path)])["progress"] is False


# -- issue 20 item 4: templates replay byte for byte ------------------------------------------------------

TYPED = [r"Q ({title}): {prompt}\n\nA:\t\\n {{lit}}",  # the template
         r"{prompt}\n", r"{prompt}\t", r"{prompt}\\", r"{prompt}\\n", r"{prompt}\\t", r"{prompt}\\\n", r"\\\\{prompt}",
         r"C:\path {prompt}\x", "{prompt}\\", "  {prompt} ", r"{prompt}\r\n", "tab\there {prompt}", "é {prompt} ✓"]


@pytest.mark.parametrize("typed", TYPED)
@pytest.mark.parametrize("name", ["precompute", "train"])
def test_a_template_round_trips_through_config_yaml(tmp_path, name, typed):
    meant = unescape(typed)
    params = _cli_params(name, [*ARGS[name], "--prompt-template", typed, "--chosen-template",
                                       typed.replace("{prompt}", "{chosen}")])
    config = CONFIGS[name](**params)
    assert config.prompt_template == meant
    path = write_config(config, tmp_path / "config.yaml")
    again = CONFIGS[name](**_cli_params(name, ["--config", str(path)]))
    assert again.prompt_template.encode() == meant.encode()
    assert again.chosen_template.encode() == meant.replace("{prompt}", "{chosen}").encode()
    assert again == config
    assert write_config(again, tmp_path / "again" / "config.yaml").read_bytes() == path.read_bytes()


# -- issue 20 item 6: one rule for every number ------------------------------------------------------------

def _numbers(cls, kind=float):
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if kind in (hints[f.name], *typing.get_args(hints[f.name]))]


FLOATS = [(name, field) for name, cls in CONFIGS.items() for field in _numbers(cls)]


@pytest.mark.parametrize("name, field", FLOATS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_float_option_is_checked_finite_at_construction(name, field, value):
    extra = {"f_divergence": "alpha_divergence"} if field == "f_alpha" else {}
    with pytest.raises(ValueError, match=f"{field} must be .*finite.*, got {value}"):
        CONFIGS[name](**REQUIRED[name], **extra, **{field: value})
    # the rule is declared on the field, so a new float option cannot miss it
    assert next(f for f in dataclasses.fields(CONFIGS[name]) if f.name == field).metadata.get("range") is not None


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_number_option_declares_its_range(name):
    for field in _numbers(CONFIGS[name], int) + _numbers(CONFIGS[name]):
        if field != "seed":  # any integer seeds
            assert next(f for f in dataclasses.fields(CONFIGS[name]) if f.name == field).metadata["range"], field


def test_f_alpha_nan_is_refused_on_the_command_line_before_anything_is_written(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    result = CliRunner().invoke(main, ["train", "--data", str(data), "--loss", "simpo", "--out", str(tmp_path / "r"),
                                       "--f-divergence", "alpha_divergence", "--f-alpha", "nan"])
    assert result.exit_code == 1 and "f_alpha must be a finite number, got nan" in result.output
    assert not (tmp_path / "r").exists()


# -- issue 20 item 8: the same refusals for pairs and unpaired examples ----------------------------------

_WPO = r"use_weighting \(WPO\) cannot weight {loss}"
_F = "f_divergence 'forward_kl' is defined for the losses .*, not {loss}"


@pytest.mark.parametrize("loss, options, message", [
    ("aot", {"use_weighting": True}, _WPO), ("kto", {"use_weighting": True}, _WPO),
    ("apo_zero_unpaired", {"use_weighting": True}, _WPO),
    ("simpo", {"f_divergence": "forward_kl"}, _F), ("kto", {"f_divergence": "forward_kl"}, _F),
    ("apo_zero_unpaired", {"f_divergence": "forward_kl"}, _F),
])
def test_losses_and_options_that_do_not_combine_are_refused_for_pairs_and_unpaired(loss, options, message):
    with pytest.raises(ValueError, match=message.format(loss=loss)):
        TrainConfig(data="d", out="o", cache="c", loss=loss, **options)
    with pytest.raises(ValueError, match=message.format(loss=loss)):
        check_loss_options([loss], **options)


@pytest.mark.parametrize("loss, options", [("kto", {"label_smoothing": 0.1}), ("kto", {"ld_alpha": 0.5}),
                                           ("apo_zero_unpaired", {"simpo_gamma": 1.0}),
                                           ("sigmoid", {"desirable_weight": 2.0}), ("ipo", {"undesirable_weight": 0.5})])
def test_an_option_of_the_other_kind_of_loss_is_refused(loss, options):
    with pytest.raises(ValueError, match=f"{next(iter(options))}: option.* does not read"):
        TrainConfig(data="d", out="o", cache="c", loss=loss, **options)


# -- issue 20 item 9 ------------------------------------------------------------------------------------

def test_a_kl_group_of_one_is_refused():
    with pytest.raises(ValueError, match="kl_group_size must be a finite number >= 2, got 1"):
        PrecomputeConfig(data="d", out="o", unpaired=True, kl_group_size=1)
    assert PrecomputeConfig(data="d", out="o", unpaired=True, kl_group_size=2).kl_group_size == 2


# -- issue 20 item 10 -----------------------------------------------------------------------------------

@pytest.mark.parametrize("tracker", ["wandb", "trackio"])
def test_a_missing_tracker_package_is_refused_with_the_options(tmp_path, monkeypatch, tracker):
    import importlib.util
    import sys

    find_spec = importlib.util.find_spec
    monkeypatch.delitem(sys.modules, tracker, raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == tracker else find_spec(n, *a))
    with pytest.raises(ValueError, match=f"--report-to {tracker} needs the {tracker} package"):
        TrainConfig(data="d", out="o", cache="c", report_to=tracker)
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    result = CliRunner().invoke(main, ["train", "--data", str(data), "--loss", "simpo", "--out", str(tmp_path / "r"),
                                       "--report-to", tracker])
    assert result.exit_code == 1 and f"pip install 'prefcache[{tracker}]'" in result.output
    assert not (tmp_path / "r").exists()


# -- issue 20 item 11: no option silently ignored ---------------------------------------------------------

def test_f_alpha_needs_alpha_divergence():
    with pytest.raises(ValueError, match="f_alpha is the α of f_divergence alpha_divergence"):
        TrainConfig(data="d", out="o", cache="c", f_alpha=0.7)
    assert TrainConfig(data="d", out="o", cache="c", f_alpha=0.7, f_divergence="alpha_divergence").f_alpha == 0.7


def test_kl_group_size_needs_unpaired():
    with pytest.raises(ValueError, match="kl_group_size 4 applies to unpaired caches only"):
        PrecomputeConfig(data="d", out="o", kl_group_size=4)
    assert PrecomputeConfig(data="d", out="o", kl_group_size=4, unpaired=True).kl_group_size == 4


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_two_revisions_are_refused(name):
    with pytest.raises(ValueError, match="model org/m@a names revision 'a' but revision is 'b'"):
        CONFIGS[name](**REQUIRED[name], model="org/m@a", revision="b")
    assert CONFIGS[name](**REQUIRED[name], model="org/m@a", revision="a").revision == "a"
    assert CONFIGS[name](**REQUIRED[name], model="org/m", revision="b").revision == "b"


def test_merge_is_refused_on_a_full_fine_tune(tmp_path):
    from prefcache.export import export

    ckpt = tmp_path / "run" / "checkpoints" / "step-000001"
    ckpt.mkdir(parents=True)
    (ckpt / "prefcache.json").write_text(json.dumps({"finetune": "full", "step": 1}))
    with pytest.raises(ValueError, match="is a full fine-tune, a whole model with no adapter to merge"):
        export(ckpt, tmp_path / "out", merge=True)
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(main, ["export", str(ckpt), "--out", str(tmp_path / "out"), "--merge"])
    assert result.exit_code == 1 and "drop --merge" in result.output


def test_none_is_spelled_as_the_command_line_spells_it(tmp_path):
    """max_grad_norm None (no clipping) is `--max-grad-norm 0`, and `null` in a config file."""
    assert TrainConfig(**_cli_params("train", [*ARGS["train"], "--max-grad-norm", "0"])).max_grad_norm is None
    path = write_config(TrainConfig(data="d.jsonl", cache="c", out="r", max_grad_norm=None), tmp_path / "c.yaml")
    assert yaml.safe_load(path.read_text())["max_grad_norm"] is None
    assert _cli_params("train", ["--config", str(path)])["max_grad_norm"] is None
    assert _cli_params("train", ARGS["train"])["max_grad_norm"] == TrainConfig.__dataclass_fields__["max_grad_norm"].default


def test_train_config_is_its_groups_each_validating_its_own_fields():
    from prefcache.training.config import (
        EvalOptions,
        LossOptions,
        OptimizerOptions,
        PolicyOptions,
        RunOptions,
    )

    groups = (LossOptions, PolicyOptions, OptimizerOptions, EvalOptions, RunOptions)
    assert all(issubclass(TrainConfig, g) for g in groups)
    names = [f.name for g in groups for f in dataclasses.fields(g)]
    assert len(names) == len(set(names))  # each option in one group
    cfg = TrainConfig(data="d", out="o", cache="c", beta=0.2, lora_r=4, lr=1e-4, eval_every=5, seed=1)
    assert (cfg.beta, cfg.lora_r, cfg.lr, cfg.eval_every, cfg.seed) == (0.2, 4, 1e-4, 5, 1)  # flat access
    assert LossOptions(loss="ipo, sft").loss == ("ipo", "sft") and PolicyOptions(lora_r=8).lora_alpha == 16
    for group, options, message in ((LossOptions, {"loss": "kto", "use_weighting": True}, "cannot weight kto"),
                                    (PolicyOptions, {"lora_dropout": 1.0}, "lora_dropout must be"),
                                    (OptimizerOptions, {"lr": math.nan}, "lr must be positive and finite"),
                                    (EvalOptions, {"eval_cache": "c"}, "eval_cache needs eval_data"),
                                    (RunOptions, {"device": "tpu9"}, "device must be")):
        with pytest.raises(ValueError, match=message):
            group(**options)


def _readme_default(text: str):
    """A README table cell's default -> a Python value, or ... when it is prose ("the cache's", "2×r")."""
    text = text.strip()
    words = {"on": True, "off": False, "none": None}
    if text in words:
        return words[text]
    if text.startswith("`") and text.endswith("`") and not text.startswith("`--"):  # `--cache`: another option's
        return text.strip("`")
    try:
        return float(text)
    except ValueError:
        return ...


def test_the_readme_options_table_says_the_declared_defaults():
    """The README's `prefcache train` table restates defaults: it must say the ones the fields declare."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("`prefcache train` / `prefcache.TrainConfig`:", 1)[1].split("\n\n", 2)[1]
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    checked = 0
    for row in table.splitlines()[2:]:
        cells = row.split(" | ")
        options = [o.strip("`| ").split("/")[0].removeprefix("--").replace("-", "_") for o in cells[0].split(", ")]
        values = cells[1].replace(" / ", ", ").split(", ")
        if len(values) != len(options):
            continue
        for option, text in zip(options, values, strict=True):
            said = _readme_default(text)
            if said is ... or option not in defaults:
                continue
            declared = defaults[option]
            if isinstance(declared, tuple):  # ("sigmoid",) is `sigmoid`; () is `none`
                declared = ",".join(declared) or "none"
            assert said == declared, f"README: --{option} {text}, the field: {declared}"
            checked += 1
    assert checked >= 20


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_a_sharded_reference_pass_refuses_a_quantized_reference(bits):
    with pytest.raises(ValueError, match=rf"^--fsdp with --quantize {bits} is not supported: FSDP shards float"):
        PrecomputeConfig(data="d", out="o", fsdp=True, quantize=bits)
    assert PrecomputeConfig(data="d", out="o", fsdp=True, quantize="bf16").fsdp


def test_fsdp_without_torchrun_says_it_runs_unsharded(tmp_path, tiny_model, capsys):
    """One process has nothing to shard across: the pass runs as without --fsdp, and says so in one line."""
    from conftest import preference_rows, write_jsonl

    from prefcache.reference.shards import precompute

    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(2))
    result = precompute(data=str(data), out=str(tmp_path / "c"), model=str(tiny_model), quantize="fp32",
                        max_length=64, progress=False, fsdp=True)
    notes = [line for line in capsys.readouterr().err.splitlines() if "--fsdp" in line]
    assert notes == ["prefcache precompute: note: --fsdp with one process runs unsharded (launch with torchrun "
                     "--nproc-per-node N to shard)"]
    assert result["scored"] == 2 and result["problems"] == []
