"""The precompute pass: values, resume, extension, refusal, crash safety, CLI, data parallel."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import polars as pl
import pytest
import torch
from click.testing import CliRunner
from conftest import ENV, completion_logps, preference_rows, write_jsonl

from prefcache.cache.store import CacheError, read_cache, read_metadata, shard_metadata, shard_paths
from prefcache.cli import main
from prefcache.reference.shards import precompute, verify_cache


def run(data, out, model, **kw):
    kw.setdefault("max_length", 64)
    kw.setdefault("quantize", "fp32")
    kw.setdefault("progress", False)
    return precompute(data=str(data), out=str(out), model=str(model), **kw)


def frame(cache):
    return pl.from_arrow(read_cache(cache)).sort("id")


def test_values_equal_a_naive_full_logits_computation(tmp_path, prefs_file, tiny_model, tokenizer):
    from transformers import AutoModelForCausalLM

    from prefcache.data.pairs import load_dataset_pairs

    result = run(prefs_file, tmp_path / "c", tiny_model, batch_size=3, per_token=True)
    assert result["scored"] == 24 and result["problems"] == []
    got = {r["id"]: r for r in frame(tmp_path / "c").iter_rows(named=True)}
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    pairs, _, _ = load_dataset_pairs(str(prefs_file), tokenizer, 64, "keep_start")
    for p in pairs:
        for side in ("chosen", "rejected"):
            completion = getattr(p, f"{side}_ids")
            naive = completion_logps(model, p.prompt_ids, completion).float()
            assert got[p.id][f"{side}_logps"] == pytest.approx(naive.sum().item(), abs=1e-4)
            assert got[p.id][f"{side}_tokens"] == len(completion)
            torch.testing.assert_close(torch.tensor(got[p.id][f"{side}_token_logps"]), naive, atol=1e-5, rtol=0)
        assert got[p.id]["prompt_tokens"] == len(p.prompt_ids)
        shared = min(len(p.chosen_ids), len(p.rejected_ids))
        assert got[p.id]["chosen_logps_prefix"] == pytest.approx(sum(got[p.id]["chosen_token_logps"][:shared]), abs=1e-4)


def test_metadata_records_what_made_the_cache(tmp_path, prefs_file, tiny_model):
    run(prefs_file, tmp_path / "c", tiny_model)
    meta = read_metadata(tmp_path / "c")
    for key in ("model_name", "model_fingerprint", "tokenizer_fingerprint", "chat_template_hash", "max_length",
                "truncation", "quantization", "dtype", "prefcache_version", "schema_version", "created_at"):
        assert meta[key] is not None, key
    assert meta["max_length"] == 64 and meta["quantization"] == "fp32" and meta["truncation"] == "keep_start"
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["metadata"]["model_fingerprint"] == meta["model_fingerprint"]


def test_rerun_scores_nothing_and_added_rows_score_only_new_ones(tmp_path, tiny_model):
    rows = preference_rows(30)
    data = write_jsonl(tmp_path / "d.jsonl", rows[:20])
    first = run(data, tmp_path / "c", tiny_model, shard_size=8)
    assert first["scored"] == 20 and len(shard_paths(tmp_path / "c")) == 3
    assert run(data, tmp_path / "c", tiny_model)["scored"] == 0
    write_jsonl(data, list(reversed(rows)))  # 10 new rows, and the old ones in another order
    third = run(data, tmp_path / "c", tiny_model)
    assert third["scored"] == 10 and third["cached_before"] == 20
    df = frame(tmp_path / "c")
    assert df.height == 30 and df["id"].n_unique() == 30
    fresh = run(data, tmp_path / "fresh", tiny_model)
    assert fresh["scored"] == 30
    fresh_df = frame(tmp_path / "fresh")
    assert fresh_df["id"].to_list() == df["id"].to_list()
    assert (fresh_df["chosen_logps"] - df["chosen_logps"]).abs().max() < 1e-5


def test_extending_with_other_settings_is_refused(tmp_path, prefs_file, tiny_model, tokenizer):
    from conftest import make_tiny_model

    run(prefs_file, tmp_path / "c", tiny_model)
    with pytest.raises(CacheError, match=r"max_length: cache has 64, asked for 32"):
        run(prefs_file, tmp_path / "c", tiny_model, max_length=32)
    with pytest.raises(CacheError, match="model_fingerprint"):
        run(prefs_file, tmp_path / "c", make_tiny_model(tmp_path / "other", tokenizer, seed=1))
    with pytest.raises(CacheError, match="quantization: cache has 'fp32', asked for 'bf16'"):
        run(prefs_file, tmp_path / "c", tiny_model, quantize="bf16")
    assert frame(tmp_path / "c").height == 24  # nothing lost, nothing added


@pytest.mark.parametrize("sharing", [False, True])
def test_identical_sequences_are_scored_once(tmp_path, tiny_model, monkeypatch, sharing):
    import prefcache.model.packing as packing
    import prefcache.reference.scoring as pre

    rows = [{"prompt": "Same prompt", "chosen": " same answer", "rejected": f" other {i}"} for i in range(5)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    seen, packed = [], []
    real, real_pack = pre.score_sequences, packing.pack
    monkeypatch.setattr(pre, "score_sequences", lambda m, seqs, **kw: seen.append(len(seqs)) or real(m, seqs, **kw))
    monkeypatch.setattr(packing, "pack", lambda rows, pad: packed.append(rows) or real_pack(rows, pad))
    run(data, tmp_path / "c", tiny_model, prefix_sharing=sharing)
    if sharing:  # one packed row: the prompt once, then its 6 distinct completions
        assert seen == [] and len(packed) == 1 and len(packed[0]) == 1 and len(packed[0][0][1]) == 6
    else:
        assert seen == [6] and packed == []  # 5 distinct rejected + 1 shared chosen
    assert frame(tmp_path / "c")["chosen_logps"].n_unique() == 1
    assert read_metadata(tmp_path / "c")["prefix_sharing"] is sharing


def test_shared_and_unshared_caches_agree(tmp_path, prefs_file, tiny_model):
    """Packed rows give each completion the log-probs of its own prompt + completion sequence."""
    run(prefs_file, tmp_path / "shared", tiny_model, batch_size=5, per_token=True)
    run(prefs_file, tmp_path / "plain", tiny_model, batch_size=3, per_token=True, prefix_sharing=False)
    a, b = frame(tmp_path / "shared"), frame(tmp_path / "plain")
    assert a["id"].to_list() == b["id"].to_list() and a.height == 24
    for col in ("chosen_logps", "rejected_logps", "chosen_logps_prefix", "rejected_logps_prefix"):
        assert (a[col] - b[col]).abs().max() <= 1e-4, col
    assert read_metadata(tmp_path / "shared")["prefix_sharing"] is True
    # Extending keeps the path the cache was made with, whatever the flag says now.
    more = write_jsonl(tmp_path / "more.jsonl", preference_rows(30))
    run(more, tmp_path / "plain", tiny_model, per_token=True)
    assert {m["prefix_sharing"] for m in map(shard_metadata, shard_paths(tmp_path / "plain"))} == {False}


def test_bad_rows_fail_by_default_and_are_reported_when_skipped(tmp_path, tiny_model):
    rows = preference_rows(4) + [{"prompt": "p", "chosen": "", "rejected": "r"}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(ValueError, match="line 5"):
        run(data, tmp_path / "c", tiny_model)
    result = run(data, tmp_path / "c", tiny_model, on_bad_row="skip")
    assert result["scored"] == 4 and result["bad_rows"] == 1
    report = [json.loads(line) for line in (tmp_path / "c" / "bad_rows.jsonl").read_text().splitlines()]
    assert report[0]["row"] == 4
    assert verify_cache(str(tmp_path / "c"), str(data))["problems"] == []


CRASHER = textwrap.dedent("""
    import os, sys
    import prefcache.cache.store as cache
    real = cache.CacheWriter.write
    calls = []
    def write(self, columns):
        calls.append(1)
        if len(calls) == 3:  # die mid-write of the third shard, leaving a half temp file behind
            open(self.dir / f".tmp-r000-crash.parquet", "wb").write(b"PAR1 half")
            os._exit(137)
        return real(self, columns)
    cache.CacheWriter.write = write
    from prefcache.reference.shards import precompute
    precompute(data=sys.argv[1], out=sys.argv[2], model=sys.argv[3], max_length=64, quantize="fp32",
               shard_size=5, progress=False)
""")


def test_killed_run_resumes_to_exactly_the_uninterrupted_result(tmp_path, tiny_model, one_thread):
    """Bit-equal, as the README's fault-injection figures say: the resumed pass reads the same blocks, sorts the
    pending pairs the same stable way and cuts the same shards, so each shard is scored in the same batches as in
    one go, and the same kernels on the same thread count (one, in both processes) give the same bits."""
    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(23))
    crashed = subprocess.run([sys.executable, "-c", CRASHER, str(data), str(tmp_path / "c"), str(tiny_model)],
                             env=ENV, capture_output=True, text=True, timeout=600)
    assert crashed.returncode == 137, crashed.stderr
    assert len(shard_paths(tmp_path / "c")) == 2
    resumed = run(data, tmp_path / "c", tiny_model, shard_size=5)
    assert resumed["cached_before"] == 10 and resumed["scored"] == 13 and resumed["problems"] == []
    assert not list((tmp_path / "c").glob(".tmp-*"))
    run(data, tmp_path / "whole", tiny_model, shard_size=5)
    a, b = frame(tmp_path / "c"), frame(tmp_path / "whole")
    assert a["id"].to_list() == b["id"].to_list() and a.height == 23
    assert a.equals(b)  # every column, the log-probs included, bit for bit


def test_cli_precompute_inspect_verify(tmp_path, prefs_file, tiny_model):
    runner = CliRunner()
    out = tmp_path / "c"
    res = runner.invoke(main, ["precompute", "--data", str(prefs_file), "--out", str(out), "--model", str(tiny_model),
                               "--max-length", "64", "--quantize", "fp32", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "24 pairs scored" in res.output
    res = runner.invoke(main, ["inspect", str(out)])
    assert res.exit_code == 0 and "24 rows" in res.output and "model_fingerprint" in res.output
    res = runner.invoke(main, ["verify", str(out), "--data", str(prefs_file)])
    assert res.exit_code == 0 and "OK" in res.output, res.output
    more = write_jsonl(tmp_path / "more.jsonl", preference_rows(30))
    res = runner.invoke(main, ["verify", str(out), "--data", str(more)])
    assert res.exit_code == 1 and "6 of 30 ids" in res.output
    res = runner.invoke(main, ["precompute", "--data", str(tmp_path / "missing.jsonl"), "--out", str(out),
                               "--model", str(tiny_model)])
    assert res.exit_code == 1 and "Error:" in res.output and "Traceback" not in res.output


def test_help_is_fast_and_imports_no_torch():
    code = "import sys; from prefcache.cli import main; main(['--help'], standalone_mode=False); " \
           "print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=300).stdout
    assert out.strip().endswith("False False")
    for cmd in ("precompute", "inspect", "verify"):
        code = f"import sys; from prefcache.cli import main; main(['{cmd}', '--help'], standalone_mode=False); print('torch' in sys.modules)"
        assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=300).stdout.strip().endswith("False")


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_process_precompute_gives_the_one_process_cache(tmp_path, tiny_model, fsdp):
    """Two ranks, each scoring the ids that hash to it, write the cache one process writes: the same ids, values
    and metadata but the world size. With --fsdp the model is sharded too, so every forward is a collective of
    both ranks, and the rank with fewer pairs (7 of 20 here) keeps the other company to the end.

    Bound: 1e-5 nats per summed sequence (the issue's); measured 1.9e-6 (fp32 sums of another batch shape)."""
    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(20))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",  # a free port
           "-m", "prefcache", "precompute", "--data", str(data), "--out", str(tmp_path / "c"), "--model", str(tiny_model),
           "--max-length", "64", "--quantize", "fp32", "--no-progress", *(["--fsdp"] if fsdp else [])]
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    names = {p.name[:9] for p in shard_paths(tmp_path / "c")}
    assert names == {"part-r000", "part-r001"}
    single = run(data, tmp_path / "single", tiny_model)
    held = float(re.search(r"reference weights on rank 0: ([\d.,]+) MB", res.stdout).group(1).replace(",", ""))
    whole = single["reference_mb_per_rank"]
    # Sharded, a rank holds half of each layer and of the root (to a row of rounding), not the whole model
    # (printed to 0.1 MB: 6.1 of 12.3 MB here).
    assert held == pytest.approx(whole / 2 if fsdp else whole, abs=0.05 + 0.01 * whole)
    a, b = frame(tmp_path / "c"), frame(tmp_path / "single")
    assert a["id"].to_list() == b["id"].to_list() and single["scored"] == 20
    for side in ("chosen_logps", "rejected_logps", "chosen_logps_prefix", "rejected_logps_prefix"):
        assert (a[side] - b[side]).abs().max() < 1e-5, side
    assert verify_cache(str(tmp_path / "c"), str(data))["problems"] == []
    informational = {"world_size", "created_at"}
    two, one = read_metadata(tmp_path / "c"), read_metadata(tmp_path / "single")
    assert (two["world_size"], one["world_size"]) == (2, 1)
    assert {k: v for k, v in two.items() if k not in informational} == \
        {k: v for k, v in one.items() if k not in informational}


@pytest.mark.slow
def test_smollm2_4bit_nf4_end_to_end(tmp_path):
    """The embedded default in 4-bit NF4 on CPU: a real model, real chat data, values near full precision."""
    rows = [
        {"prompt": [{"role": "user", "content": "What is the capital of France?"}],
         "chosen": [{"role": "assistant", "content": "The capital of France is Paris."}],
         "rejected": [{"role": "assistant", "content": "France is a country in Europe with many cities."}]},
        {"prompt": [{"role": "user", "content": "What is 2 + 2?"}],
         "chosen": [{"role": "assistant", "content": "2 + 2 = 4."}],
         "rejected": [{"role": "assistant", "content": "2 + 2 = 5."}]},
        {"prompt": [{"role": "user", "content": "The opposite of hot is"}],
         "chosen": [{"role": "assistant", "content": "cold."}],
         "rejected": [{"role": "assistant", "content": "banana."}]},
    ]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    q = precompute(data=str(data), out=str(tmp_path / "q4"), quantize="4bit", max_length=128, progress=False)
    f = precompute(data=str(data), out=str(tmp_path / "f32"), quantize="fp32", max_length=128, progress=False)
    assert q["problems"] == [] and f["problems"] == []
    meta = read_metadata(tmp_path / "q4")
    assert meta["quantization"] == "4bit" and meta["model_name"].startswith("SmolLM2-135M-Instruct")
    a, b = frame(tmp_path / "q4"), frame(tmp_path / "f32")
    assert a["id"].to_list() == b["id"].to_list()
    # A real instruct model prefers the right answers, in 4-bit as in fp32.
    assert (b["chosen_logps"] / b["chosen_tokens"] > b["rejected_logps"] / b["rejected_tokens"]).all()
    assert (a["chosen_logps"] / a["chosen_tokens"] > a["rejected_logps"] / a["rejected_tokens"]).all()
    # NF4 moves the values a little, not a lot: within 15% of the fp32 reference.
    rel = ((a["chosen_logps"] - b["chosen_logps"]).abs() / b["chosen_logps"].abs()).max()
    assert 0 < rel < 0.15


def test_public_api_names_stay_functions_after_every_module_is_imported():
    import prefcache
    import prefcache.evaluation.lmeval
    import prefcache.evaluation.rewards
    import prefcache.reference.shards
    import prefcache.training.loop  # noqa: F401 - importing a submodule must not rebind a public name

    for name in ("precompute", "verify_cache", "train", "evaluate", "score", "inspect_cache", "read_cache"):
        assert callable(getattr(prefcache, name)) and not isinstance(getattr(prefcache, name), type(prefcache)), name


def test_data_read_in_blocks_gives_the_same_cache(tmp_path, prefs_file, tiny_model, monkeypatch):
    """Precompute reads the data block by block (bounded memory); the cache is the one a single read makes, and a
    bad row in a later block is reported with its own line."""
    import prefcache.data.pairs

    run(prefs_file, tmp_path / "one", tiny_model)
    starts = []  # the first row of every block the data was read in
    real = prefcache.data.pairs.iter_row_blocks

    def spy(*args, **kw):
        for start, rows in real(*args, **kw):
            starts.append(start)
            yield start, rows

    monkeypatch.setattr(prefcache.data.pairs, "iter_row_blocks", spy)
    monkeypatch.setattr(prefcache.data.pairs, "BLOCK_ROWS", 5)  # with shard_size 2: blocks of 4 rows
    result = run(prefs_file, tmp_path / "blocks", tiny_model, shard_size=2)
    assert starts == [0, 4, 8, 12, 16, 20] and result["data_blocks"] == 6
    assert result["pairs_in_data"] == 24 and result["scored"] == 24 and not result["problems"]
    assert len(shard_paths(tmp_path / "blocks")) >= 12
    a, b = frame(tmp_path / "one"), frame(tmp_path / "blocks")
    assert a["id"].to_list() == b["id"].to_list()
    for c in ("chosen_logps", "rejected_logps", "prompt_tokens", "chosen_tokens"):
        assert a[c].to_list() == pytest.approx(b[c].to_list(), abs=1e-5)

    rows = preference_rows(24)
    rows[17] = {"prompt": "p", "chosen": "", "rejected": "r"}  # line 18, in the fifth block
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match="line 18"):  # refused when its block is read: blocks 1-4 are kept
        run(data, tmp_path / "bad", tiny_model, shard_size=2)
    result = run(data, tmp_path / "bad", tiny_model, shard_size=2, on_bad_row="skip")
    assert result["cached_before"] == 16 and result["scored"] == 7 and result["bad_rows"] == 1
    assert result["pairs_in_data"] == 23 and not result["problems"]
    report = [json.loads(line) for line in (tmp_path / "bad" / "bad_rows.jsonl").read_text().splitlines()]
    assert [(r["row"], r["line"]) for r in report] == [(17, 18)]


@pytest.mark.gpu
def test_a_cuda_cache_equals_the_cpu_cache(tmp_path, prefs_file, tiny_model):
    run(prefs_file, tmp_path / "cpu", tiny_model)
    run(prefs_file, tmp_path / "cuda", tiny_model, device="cuda")
    cpu, gpu = frame(tmp_path / "cpu"), frame(tmp_path / "cuda")
    assert cpu["id"].to_list() == gpu["id"].to_list()
    for col in ("chosen_logps", "rejected_logps", "chosen_logps_prefix", "rejected_logps_prefix"):
        assert (cpu[col] - gpu[col]).abs().max() < 1e-3, col


def test_data_of_bad_rows_only_is_refused_and_the_rows_listed(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b"}, {"prompt": "c", "rejected": "d"}])
    with pytest.raises(ValueError, match=r"all 2 rows of .* are bad rows \(listed in .*bad_rows.jsonl\): nothing"):
        run(data, tmp_path / "cache", tiny_model, on_bad_row="skip")
    assert len((tmp_path / "cache" / "bad_rows.jsonl").read_text().splitlines()) == 2
    assert not shard_paths(tmp_path / "cache")
