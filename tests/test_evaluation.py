"""prefcache.evaluation (lmeval, rewards): lm-eval on checkpoints (`eval`) and cached implicit rewards (`score`), on a tiny model.

One small LoRA run (4 steps, checkpoints at 2 and 4, eval split) is trained once for the module; the
lm-eval task is built from its held-out pairs by examples/make_lm_eval_task.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import choice_logliks, completion_logps, preference_rows, write_jsonl

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
TASK = "prefs_tiny"
BETA = 0.2  # not score's fallback 0.1: shows the run's beta is used
EVALS_SCHEMA = pa.schema([("checkpoint", pa.string()), ("step", pa.int64()), ("task", pa.string()),
                          ("metric", pa.string()), ("value", pa.float64()), ("stderr", pa.float64()),
                          ("n", pa.int64()), ("time", pa.timestamp("us", tz="UTC")), ("source", pa.string())])
EXAMPLES_SCHEMA = pa.schema(
    [("id", pa.string()), ("step", pa.int64()), ("split", pa.string()), ("checkpoint", pa.string())]
    + [(c, pa.float64()) for c in ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps",
                                   "ref_rejected_logps", "reward_chosen", "reward_rejected", "margin")]
    + [(c, pa.int32()) for c in ("prompt_tokens", "chosen_tokens", "rejected_tokens")])


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    """Train and held-out data, one cache holding both, a 4-step LoRA run, and the lm-eval task."""
    from prefcache.reference.shards import precompute
    from prefcache.training.loop import train as train_policy

    root = tmp_path_factory.mktemp("evaluate")
    train = write_jsonl(root / "train.jsonl", preference_rows(16, seed=0))
    heldout = write_jsonl(root / "heldout.jsonl", preference_rows(8, seed=1))
    cache = root / "cache"
    for data in (train, heldout):
        precompute(data=str(data), out=str(cache), model=str(tiny_model), quantize="fp32", max_length=64,
                   device="cpu", progress=False)
    run = root / "run"
    train_policy(data=str(train), cache=str(cache), out=str(run), model=str(tiny_model), max_steps=4,
                 save_every=2, batch_size=4, lr=1e-2, beta=BETA, eval_data=str(heldout), device="cpu",
                 lora_r=4, progress=False)
    task_dir = root / "task"
    _script("make_lm_eval_task").build_task(heldout, task_dir, TASK, model=str(tiny_model))
    return {"root": root, "train": train, "heldout": heldout, "cache": cache, "run": run, "task": task_dir,
            "model": tiny_model}


def _read(folder: Path, pattern: str) -> list[pa.Table]:
    return [pq.read_table(p) for p in sorted(folder.glob(pattern))]


# ----------------------------------------------------------------------------- configs and the task builder

def test_configs_validate():
    from prefcache.evaluation.config import EvalConfig, ScoreConfig

    assert EvalConfig(checkpoints="a, b", tasks="t1,t2").tasks == ("t1", "t2")
    with pytest.raises(ValueError, match="no tasks"):
        EvalConfig(checkpoints=["a"], tasks="")
    with pytest.raises(ValueError, match="limit must be positive"):
        EvalConfig(checkpoints=["a"], tasks="t", limit=0)
    with pytest.raises(ValueError, match="beta must be positive"):
        ScoreConfig(checkpoints=["a"], cache="c", data="d", beta=-1.0)
    with pytest.raises(ValueError, match="nothing to score"):
        ScoreConfig(checkpoints=[], cache="c", data="d")


def test_make_lm_eval_task(tmp_path, tiny_model, tokenizer):
    from prefcache.data.pairs import prepare_examples

    module = _script("make_lm_eval_task")
    rows = preference_rows(10, seed=3)
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    docs, spec = module.build_task(data, tmp_path / "t", "mine", model=str(tiny_model))
    out = [json.loads(line) for line in docs.read_text().splitlines()]
    examples, _ = prepare_examples(rows, tokenizer)
    assert len(out) == len(examples)
    for doc, ex in zip(out, examples, strict=True):
        # the rendered training texts (EOS appended), the gold index fixed by the id
        assert doc["prompt"] == ex.prompt and doc["choices"][doc["label"]] == ex.chosen
        assert doc["choices"][1 - doc["label"]] == ex.rejected and doc["label"] == module.gold_index(ex.id)
    assert 0 < sum(d["label"] for d in out) < len(out)  # both orders occur
    text = spec.read_text()
    assert "test: \"mine.jsonl\"" in text and "task: mine" in text and "dataset_path: json" in text
    _, spec = module.build_task(data, tmp_path / "abs", "mine", model=str(tiny_model), absolute=True)
    assert str((tmp_path / "abs" / "mine.jsonl").resolve()) in spec.read_text()


def test_include_paths_made_absolute(tmp_path):
    """Relative data_files are resolved against their YAML; !function tags and other files survive."""
    import yaml

    from prefcache.evaluation.lmeval_tasks import localise_include_paths

    src = tmp_path / "tasks"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "docs.jsonl").write_text("{}\n")
    (src / "utils.py").write_text("def f(d):\n    return d\n")
    (src / "sub" / "t.yaml").write_text("task: t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                        "    test: docs.jsonl\nprocess_docs: !function ../utils.f\n")
    (src / "plain.yaml").write_text("task: p\ndataset_path: json\ndataset_kwargs:\n  data_files: /abs/x.jsonl\n")
    (src / "cwd.yaml").write_text("task: c\ndataset_kwargs:\n  data_files: not_here.jsonl\n")
    [out] = localise_include_paths([str(src)], tmp_path / "work")
    out = Path(out)
    assert out != src
    rewritten = (out / "sub" / "t.yaml").read_text()
    assert "!function" in rewritten and "../utils.f" in rewritten
    cfg = yaml.load(rewritten.replace("!function", ""), Loader=yaml.SafeLoader)
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str(src / "sub" / "docs.jsonl")
    assert (out / "utils.py").is_symlink() and (out / "plain.yaml").is_symlink()  # nothing to change
    assert (out / "cwd.yaml").is_symlink()  # not next to its YAML: lm-eval's own (working directory) meaning
    assert localise_include_paths([str(src / "sub" / "..")], tmp_path / "w2") != [str(src)]
    untouched = tmp_path / "untouched"
    untouched.mkdir()
    shutil.copy(src / "plain.yaml", untouched)
    assert localise_include_paths([str(untouched)], tmp_path / "w3") == [str(untouched)]


# ----------------------------------------------------------------------------- eval

def test_eval_writes_contract_rows(setup, tmp_path, monkeypatch):
    from prefcache.analysis.views import connect
    from prefcache.evaluation.lmeval import evaluate

    run = setup["run"]
    monkeypatch.chdir(tmp_path)  # the task's relative data_files must not depend on the working directory
    df = evaluate(checkpoints=[str(run)], tasks=TASK, include_path=[str(setup["task"])], limit=5, device="cpu")
    tables = _read(run / "evals", "lm-eval-*.parquet")
    assert len(tables) == 3  # one file per checkpoint: base, step-000002, step-000004
    for table in tables:
        assert table.schema.remove_metadata() == EVALS_SCHEMA
    rows = pa.concat_tables(tables).to_pylist()
    assert len(rows) == len(df) == 3 * 2
    assert {(r["checkpoint"], r["step"]) for r in rows} == {("base", None), ("step-000002", 2), ("step-000004", 4)}
    for r in rows:
        assert r["task"] == TASK and r["metric"] in ("acc", "acc_norm") and r["source"] == "lm-eval"
        assert 0.0 <= r["value"] <= 1.0 and r["n"] == 5 and r["stderr"] is not None and r["time"] is not None

    # The base model evaluated again gives the same numbers.
    again = evaluate(checkpoints=["base"], run=str(run), tasks=TASK, include_path=[str(setup["task"])], limit=5,
                     device="cpu")
    first = df.filter(df["checkpoint"] == "base").sort("metric").select("metric", "value", "stderr")
    assert again.sort("metric").select("metric", "value", "stderr").equals(first)

    # The SQL layer reads the files as the `evals` view.
    with connect(runs=[run]) as db:
        compared = db.query("checkpoint_compare", task=TASK)
    assert set(compared["checkpoint"]) == {"base", "step-000002", "step-000004"}


def test_eval_unknown_task_is_a_clear_error(setup):
    from prefcache.cli import main

    result = CliRunner().invoke(main, ["eval", str(setup["run"]), "--tasks", "prefs_tiyn", "--include-path",
                                       str(setup["task"])])
    assert result.exit_code == 1
    assert "unknown lm-eval task: prefs_tiyn" in result.output and f"did you mean {TASK}" in result.output
    assert "lm-eval ls tasks" in result.output and "Traceback" not in result.output


def test_missing_checkpoint_is_a_clear_error(setup):
    from prefcache.cli import main

    missing = setup["run"] / "checkpoints" / "step-000999"
    result = CliRunner().invoke(main, ["eval", str(missing), "--tasks", TASK])
    assert result.exit_code == 1
    assert f"checkpoint not found: {missing}" in result.output and "step-000002, step-000004" in result.output
    result = CliRunner().invoke(main, ["score", "step-000999", "--run", str(setup["run"]), "--cache",
                                       str(setup["cache"]), "--data", str(setup["heldout"])])
    assert result.exit_code == 1 and "checkpoint not found: step-000999" in result.output
    result = CliRunner().invoke(main, ["score", "base", "--cache", str(setup["cache"]), "--data", str(setup["heldout"])])
    assert result.exit_code == 1 and "pass --run DIR" in result.output


# ----------------------------------------------------------------------------- score

def _hand_scores(model_dir: Path, adapter: Path | None, setup) -> dict[str, tuple[float, float]]:
    """Per id: beta * (policy - cached reference) for chosen and rejected, one unpadded pair at a time."""

    from prefcache.cache.store import read_cache
    from prefcache.data.pairs import load_dataset_pairs
    from prefcache.model.load import load_model, load_tokenizer, resolve_model

    source = resolve_model(str(model_dir))
    model, _ = load_model(source, quantize="fp32", device="cpu", adapter=adapter)
    pairs, _, _ = load_dataset_pairs(setup["heldout"], load_tokenizer(source), 64, "keep_start")
    ref = {r["id"]: r for r in read_cache(setup["cache"]).to_pylist()}
    out = {}
    for p in pairs:
        sides = []
        for completion, ref_value in ((p.chosen_ids, ref[p.id]["chosen_logps"]), (p.rejected_ids, ref[p.id]["rejected_logps"])):
            policy = completion_logps(model, p.prompt_ids, completion).sum().item()
            sides.append(BETA * (policy - ref_value))
        out[p.id] = tuple(sides)
    return out


def test_score_checkpoint_equals_hand_computation(setup):
    from prefcache.evaluation.rewards import score

    run = setup["run"]
    ckpt = run / "checkpoints" / "step-000004"
    df = score(checkpoints=[str(ckpt)], cache=str(setup["cache"]), data=str(setup["heldout"]), batch_size=3,
               device="cpu")  # beta: the run's
    [examples] = _read(run / "logs", "examples-score-step-000004-*.parquet")
    assert examples.schema.remove_metadata() == EXAMPLES_SCHEMA
    rows = examples.to_pylist()
    hand = _hand_scores(setup["model"], ckpt, setup)
    assert len(rows) == len(hand) == 8
    for r in rows:
        assert (r["split"], r["checkpoint"], r["step"]) == ("score", "step-000004", 4)
        assert r["reward_chosen"] == pytest.approx(hand[r["id"]][0], abs=1e-5)
        assert r["reward_rejected"] == pytest.approx(hand[r["id"]][1], abs=1e-5)
        assert r["margin"] == pytest.approx(r["reward_chosen"] - r["reward_rejected"], abs=1e-12)
    assert any(abs(r["margin"]) > 1e-3 for r in rows)  # the policy did move
    [evals] = _read(run / "evals", "score-step-000004-*.parquet")
    assert evals.schema.remove_metadata() == EVALS_SCHEMA
    metrics = {r["metric"]: r for r in evals.to_pylist()}
    assert set(metrics) == {"rewards_accuracies", "rewards_margins", "rewards_chosen", "rewards_rejected"}
    margins = [h[0] - h[1] for h in hand.values()]
    assert metrics["rewards_accuracies"]["value"] == pytest.approx(sum(m > 0 for m in margins) / 8, abs=1e-12)
    assert metrics["rewards_margins"]["value"] == pytest.approx(sum(margins) / 8, abs=1e-5)
    assert all(r["task"] == "preference" and r["source"] == "score" and r["n"] == 8 and r["step"] == 4
               for r in metrics.values())
    assert df.height == 4


def test_score_policy_equal_to_reference_gives_zero_rewards(setup, tmp_path):
    """The base model (it made the cache) and a full-weights copy of it: rewards 0 to 1e-5."""
    from prefcache.evaluation.rewards import score

    full = tmp_path / "copy" / "step-000007"
    shutil.copytree(setup["model"], full)
    df = score(checkpoints=["base", str(full)], run=str(setup["run"]), cache=str(setup["cache"]),
               data=str(setup["heldout"]), device="cpu")
    assert set(df["checkpoint"]) == {"base", "step-000007"}
    assert df.filter(df["checkpoint"] == "base")["step"].to_list() == [None] * 4
    for table in _read(setup["run"] / "logs", "examples-score-*.parquet"):
        rows = [r for r in table.to_pylist() if r["checkpoint"] in ("base", "step-000007")]
        for r in rows:
            assert abs(r["reward_chosen"]) < 1e-5 and abs(r["reward_rejected"]) < 1e-5
    values = df.filter(df["metric"].is_in(["rewards_margins", "rewards_chosen", "rewards_rejected"]))["value"]
    assert values.abs().max() < 1e-5


def test_score_agrees_with_the_trainers_eval_log(setup):
    from prefcache.cli import main

    run = setup["run"]
    result = CliRunner().invoke(main, ["score", str(run / "checkpoints" / "step-000004"), "--cache",
                                       str(setup["cache"]), "--data", str(setup["heldout"]), "--batch-size", "5",
                                       "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "rewards_accuracies" in result.output and "evals/" in result.output
    steps = pl.read_parquet(run / "logs" / "steps-*.parquet").filter((pl.col("split") == "eval") & (pl.col("step") == 4))
    [scored] = sorted((run / "evals").glob("score-step-000004-*.parquet"))[-1:]
    scored = {r["metric"]: r["value"] for r in pl.read_parquet(scored).iter_rows(named=True)}
    for metric in ("rewards_accuracies", "rewards_margins", "rewards_chosen", "rewards_rejected"):
        assert scored[metric] == pytest.approx(steps[metric].item(), abs=1e-5), metric
    logged = pl.read_parquet(run / "logs" / "examples-0*.parquet").filter((pl.col("split") == "eval") & (pl.col("step") == 4))
    mine = pl.read_parquet(sorted((run / "logs").glob("examples-score-step-000004-*.parquet"))[-1])
    joined = logged.join(mine, on="id", suffix="_score")
    assert joined.height == 8
    assert (joined["margin"] - joined["margin_score"]).abs().max() < 1e-5


@pytest.mark.slow
def test_two_process_score_equals_one_process(setup, tmp_path):
    """Under torchrun each rank scores its share (3 pairs of 7 and 4 here: batches of another shape), and rank 0
    writes them all in the data's order. With --fsdp the checkpoint is sharded (half the weights on a rank) and
    the forwards kept in step (rank 1 has one batch more). Bound 1e-5 on a reward: the fp32 noise of another
    batch shape, the bound score keeps against the trainer's eval log."""
    import re
    import subprocess
    import sys

    from conftest import ENV

    from prefcache.evaluation.rewards import score

    heldout = write_jsonl(tmp_path / "h.jsonl", preference_rows(8, seed=1)[:7])
    ckpt = "checkpoints/step-000004"
    common = ["--cache", str(setup["cache"]), "--data", str(heldout), "--batch-size", "2", "--device", "cpu"]
    results, held = {}, {}
    for launch in ("ddp", "fsdp", "one"):  # a run each: the results land in the checkpoint's run
        shutil.copytree(setup["run"], tmp_path / launch, ignore=shutil.ignore_patterns("evals", "examples-score-*"))
        if launch == "one":
            score(checkpoints=[str(tmp_path / launch / ckpt)], cache=str(setup["cache"]), data=str(heldout),
                  batch_size=2, device="cpu")
        else:
            res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                  "2", "-m", "prefcache", "score", str(tmp_path / launch / ckpt), *common,
                                  *(["--fsdp"] if launch == "fsdp" else [])],
                                 env=ENV, capture_output=True, text=True, timeout=900)
            assert res.returncode == 0, res.stderr[-4000:]
            assert res.stdout.count("rewards_accuracies") == 1  # rank 0 reports, once
            held[launch] = float(re.search(r"([\d.,]+) MB of weights on rank 0", res.stderr).group(1).replace(",", ""))
        [examples] = _read(tmp_path / launch / "logs", "examples-score-*.parquet")
        [evals] = _read(tmp_path / launch / "evals", "score-*.parquet")
        results[launch] = examples, evals
    assert held["fsdp"] == pytest.approx(held["ddp"] / 2, abs=0.05 + 0.01 * held["ddp"])  # printed to 0.1 MB
    one, evals_one = results["one"]
    for launch in ("ddp", "fsdp"):
        two, evals_two = results[launch]
        assert two.column("id").to_pylist() == one.column("id").to_pylist() and two.num_rows == 7
        for column in ("policy_chosen_logps", "policy_rejected_logps", "reward_chosen", "reward_rejected", "margin"):
            a, b = two.column(column).to_pylist(), one.column(column).to_pylist()
            assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5, (launch, column)
        assert evals_two.column("n").to_pylist() == [7] * 4
        for x, y in zip(evals_two.column("value").to_pylist(), evals_one.column("value").to_pylist(), strict=True):
            assert x == pytest.approx(y, abs=1e-5)


def test_score_refuses_a_cache_of_another_tokenisation(setup, tmp_path):
    from transformers import AutoTokenizer

    from prefcache.cli import main

    ckpt = tmp_path / "other" / "step-000001"
    shutil.copytree(setup["model"], ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(ckpt)
    result = CliRunner().invoke(main, ["score", str(ckpt), "--run", str(setup["run"]), "--cache", str(setup["cache"]),
                                       "--data", str(setup["heldout"]), "--device", "cpu"])
    assert result.exit_code == 1
    assert "checkpoint step-000001: the reference cache does not match" in result.output
    assert "chat_template_hash" in result.output and "Traceback" not in result.output


def test_a_qlora_run_is_scored_on_a_4bit_base(setup, tmp_path):
    """run.json decides the precision: a QLoRA run's base loads in 4-bit, so against the fp32 cache its
    rewards are no longer 0; --quantize fp32 gives them back."""
    from prefcache.evaluation.rewards import score
    from prefcache.training.rundir import run_settings

    run = tmp_path / "qlora-run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"config": {"model": str(setup["model"]), "finetune": "qlora", "beta": 0.5},
                                              "policy": {"quantization": "4bit"}}))
    assert run_settings(run) == {"model": str(setup["model"]), "finetune": "qlora", "beta": 0.5, "quantize": "4bit"}
    common = {"checkpoints": ["base"], "run": str(run), "cache": str(setup["cache"]), "data": str(setup["heldout"]),
              "device": "cpu"}
    four_bit = score(**common).filter(pl.col("metric") == "rewards_chosen")["value"].item()
    exact = score(**common, quantize="fp32").filter(pl.col("metric") == "rewards_chosen")["value"].item()
    assert abs(four_bit) > 1e-4 and abs(exact) < 1e-5


def test_eval_a_plain_model_folder_without_a_run(setup, tmp_path, monkeypatch):
    """`eval MODEL_DIR --out DIR` and `eval base --model MODEL_DIR --out DIR`: no run folder is needed; the
    results land in DIR/evals/ (created), and the same model gives the same numbers either way."""
    from prefcache.cli import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "new" / "evals-out"
    common = ["--tasks", TASK, "--include-path", str(setup["task"]), "--limit", "5", "--out", str(out), "--device", "cpu"]
    res = CliRunner().invoke(main, ["eval", str(setup["model"]), "--no-base", *common])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["eval", "base", "--model", str(setup["model"]), *common])
    assert res.exit_code == 0, res.output
    rows = pa.concat_tables(_read(out / "evals", "lm-eval-*.parquet")).to_pylist()
    by = {(r["checkpoint"], r["metric"]): r["value"] for r in rows}
    assert {c for c, _ in by} == {setup["model"].name, "base"} and all(r["step"] is None for r in rows)
    assert by[(setup["model"].name, "acc")] == by[("base", "acc")]


# ----------------------------------------------------------------------------- lm-eval's numbers, by hand

HAND_DOCS = [  # 4 documents, 3 choices of varied lengths each: acc (summed) and acc_norm (per character) differ
    ("Question: what colour is the sky?", [" blue", " it is a bright and clear blue today", " red sky"]),
    ("Question 2: the cat sat on", [" the mat under the tree by the river", " a dog", " the house"]),
    ("Tell me: which is quick?", [" the quick red fox", " slow", " a river that runs under the blue sky"]),
    ("Question 4: where did the dog run", [" home", " to the house on the hill", " under"]),
]


def _choice_logliks(model_dir: Path) -> list[list[float]]:
    """Per document, per choice: log p(choice | prompt), summed over the choice's tokens, in nats. The
    choice follows the prompt with no delimiter, as in the task; the prompt's tokens are its own."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for prompt, choices in HAND_DOCS:
            out.append(choice_logliks(model, tok, prompt, choices))
    return out


def test_eval_acc_equals_a_hand_computation_and_task_names_may_be_globs(tmp_path, tiny_model):
    """Two local 4-document tasks whose labels make acc 3/4 and 1/4 by hand (the choice with the highest
    summed log-likelihood is the model's answer; for acc_norm, per character of the choice), run through
    the glob ``hand4_*``; a third task that the glob does not match is not run."""
    import statistics

    from prefcache.evaluation.lmeval import evaluate

    lls = _choice_logliks(tiny_model)
    picks = [max(range(3), key=ll.__getitem__) for ll in lls]
    norm_picks = [max(range(3), key=lambda i, d=d: lls[d][i] / len(HAND_DOCS[d][1][i])) for d in range(4)]
    for d, ll in enumerate(lls):  # each answer is clear of float noise
        assert sorted(ll)[-1] - sorted(ll)[-2] > 1e-3
        norms = sorted(v / len(c) for v, c in zip(ll, HAND_DOCS[d][1], strict=True))
        assert norms[-1] - norms[-2] > 1e-4
    labels = {"hand4_a": [picks[0], picks[1], picks[2], (picks[3] + 1) % 3],  # acc 3/4
              "hand4_b": [picks[0], (picks[1] + 1) % 3, (picks[2] + 1) % 3, (picks[3] + 1) % 3],  # acc 1/4
              "other4": picks}
    folder = tmp_path / "tasks"
    folder.mkdir()
    for name, gold in labels.items():
        docs = [{"prompt": p, "choices": c, "label": g} for (p, c), g in zip(HAND_DOCS, gold, strict=True)]
        write_jsonl(folder / f"{name}.jsonl", docs)
        (folder / f"{name}.yaml").write_text(_script("make_lm_eval_task").YAML.format(
            source="hand", n=4, task=name, data_file=json.dumps(f"{name}.jsonl")))

    df = evaluate(checkpoints=["base"], model=str(tiny_model), out=str(tmp_path / "out"), tasks="hand4_*",
                  include_path=[str(folder)], device="cpu")
    got = {(r["task"], r["metric"]): r for r in df.iter_rows(named=True)}
    assert {task for task, _ in got} == {"hand4_a", "hand4_b"}
    for task in ("hand4_a", "hand4_b"):
        for metric, predicted in (("acc", picks), ("acc_norm", norm_picks)):
            hits = [float(p == g) for p, g in zip(predicted, labels[task], strict=True)]
            row = got[(task, metric)]
            assert row["n"] == 4 and row["value"] == sum(hits) / 4, (task, metric, row)
            assert row["stderr"] == pytest.approx(statistics.stdev(hits) / 2, abs=1e-12), (task, metric)
    assert got[("hand4_a", "acc")]["value"] == 0.75 and got[("hand4_b", "acc")]["value"] == 0.25
