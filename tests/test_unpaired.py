"""Unpaired data (TRL's KTO format), paired data unpaired, KL completions and the unpaired cache."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
from conftest import preference_rows, write_jsonl

from prefcache.cache.lookup import UnpairedReference
from prefcache.cache.store import CacheError, read_metadata, verify
from prefcache.data.pairs import prepare_examples, tokenize_examples
from prefcache.data.unpaired import (
    kl_partners,
    kl_sequence,
    load_unpaired,
    prepare_unpaired,
    tokenize_unpaired,
)


def unpaired_rows(n=6):
    return [{"prompt": f"Question {i}:", "completion": f" answer number {i}", "label": i % 3 != 0} for i in range(n)]


def test_standard_rows_render_and_tokenise_like_pairs(tokenizer):
    examples, bad = prepare_unpaired(unpaired_rows(), tokenizer)
    assert not bad and [e.label for e in examples] == [False, True, True, False, True, True]
    assert all(e.completion.endswith(tokenizer.eos_token) for e in examples)  # EOS as text, as TRL
    items, _ = tokenize_unpaired(examples, tokenizer, 64)
    pairs, _ = tokenize_examples(prepare_examples([{"prompt": "Question 0:", "chosen": " answer number 0",
                                                    "rejected": " x"}], tokenizer)[0], tokenizer, 64)
    assert items[0].prompt_ids == pairs[0].prompt_ids and items[0].completion_ids == pairs[0].chosen_ids
    assert items[0].prompt_ids + items[0].completion_ids == tokenizer("Question 0: answer number 0" + tokenizer.eos_token)["input_ids"]


def test_conversational_rows_use_the_chat_template(tokenizer):
    rows = [{"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello"}],
             "label": True}]
    (ex,), _ = prepare_unpaired(rows, tokenizer)
    assert ex.conversational and "Hello" in ex.completion
    assert ex.prompt == tokenizer.apply_chat_template(rows[0]["prompt"], tokenize=False, add_generation_prompt=True)


def test_bad_rows_and_paired_data_on_request(tokenizer):
    rows = unpaired_rows(3) + [{"prompt": "p", "completion": " c", "label": "yes"}]
    examples, bad = prepare_unpaired(rows, tokenizer, "skip")
    assert len(examples) == 3 and "must be a boolean" in bad[0].problem
    pairs = preference_rows(3)
    with pytest.raises(ValueError, match="unpair=True"):
        prepare_unpaired(pairs, tokenizer)
    examples, _ = prepare_unpaired(pairs, tokenizer, unpair=True)
    # TRL's unpair_preference_dataset: the block's chosen completions (True), then its rejected ones (False)
    assert [e.label for e in examples] == [True] * 3 + [False] * 3
    assert [e.id.rsplit("-", 1)[1] for e in examples] == ["chosen"] * 3 + ["rejected"] * 3
    assert examples[0].completion.startswith(pairs[0]["chosen"]) and examples[3].prompt == examples[0].prompt


def test_kl_partners_rotate_within_groups_as_trl():
    # TRL: KL_completion_ids = [y_n] + [y_1 .. y_{n-1}] per batch of per_device_train_batch_size
    assert kl_partners(list("abcde"), 2) == {"a": "b", "b": "a", "c": "d", "d": "c", "e": "e"}
    assert kl_partners(list("abc"), 8) == {"a": "c", "b": "a", "c": "b"}


def test_kl_sequence_truncates_keep_start(tokenizer, tmp_path):
    items, _, _ = load_unpaired(write_jsonl(tmp_path / "u.jsonl", unpaired_rows()), tokenizer, 64)
    prompt, completion = kl_sequence(items[0], items[1], 64, "keep_start")
    assert prompt == items[0].prompt_ids and completion == items[1].completion_ids
    prompt, completion = kl_sequence(items[0], items[1], len(items[0].prompt_ids) + 2, "keep_start")
    assert completion == items[1].completion_ids[:2]


def test_unpaired_cache_holds_each_completion_and_its_kl_completion(tmp_path, tiny_model, tokenizer):
    from transformers import AutoModelForCausalLM

    from prefcache.reference.shards import precompute
    from prefcache.training.loop import train

    torch.set_num_threads(1)
    data = write_jsonl(tmp_path / "u.jsonl", unpaired_rows(6))
    result = precompute(data=str(data), out=str(tmp_path / "cache"), model=str(tiny_model), max_length=48,
                        quantize="fp32", unpaired=True, kl_group_size=3, progress=False)
    assert result["scored"] == 6 and not result["problems"]
    meta = read_metadata(tmp_path / "cache")
    assert meta["kind"] == "unpaired" and meta["kl_group_size"] == 3
    assert verify(tmp_path / "cache") == []
    table = pq.read_table(next((tmp_path / "cache").glob("part-*.parquet"))).to_pylist()
    items, _, _ = load_unpaired(data, tokenizer, 48)
    by_id = {i.id: i for i in items}
    partners = kl_partners([i.id for i in items], 3)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()

    def summed(prompt, completion):  # the textbook computation, float64 log-softmax
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logps = torch.log_softmax(model(ids).logits.double()[0, :-1], -1)
        return float(logps[torch.arange(len(prompt) - 1, ids.shape[1] - 1), ids[0, len(prompt):]].sum())

    for row in table:
        item = by_id[row["id"]]
        assert row["kl_id"] == partners[row["id"]] and row["label"] == item.label
        assert row["logps"] == pytest.approx(summed(item.prompt_ids, item.completion_ids), abs=1e-4)
        assert row["kl_logps"] == pytest.approx(summed(item.prompt_ids, by_id[row["kl_id"]].completion_ids), abs=1e-4)
    reference = UnpairedReference.from_cache(tmp_path / "cache")
    reference.require(items, "training")
    # the caches of pairs and of unpaired examples are not interchangeable
    pairs_data = write_jsonl(tmp_path / "p.jsonl", preference_rows(4))
    precompute(data=str(pairs_data), out=str(tmp_path / "pcache"), model=str(tiny_model), max_length=48,
               quantize="fp32", progress=False)
    with pytest.raises(CacheError, match="cache of pairs"):
        UnpairedReference.from_cache(tmp_path / "pcache")
    with pytest.raises(CacheError, match="other settings"):
        precompute(data=str(data), out=str(tmp_path / "pcache"), model=str(tiny_model), max_length=48,
                   quantize="fp32", unpaired=True, progress=False)
    with pytest.raises(CacheError, match="is an unpaired"):  # and the other way round
        train(data=str(pairs_data), cache=str(tmp_path / "cache"), model=str(tiny_model), out=str(tmp_path / "r2"),
              max_steps=1, progress=False)
    with pytest.raises(CacheError, match="cache of pairs"):
        train(data=str(data), cache=str(tmp_path / "pcache"), model=str(tiny_model), out=str(tmp_path / "r"),
              loss="kto", max_steps=1, progress=False)


def test_inspect_and_verify_read_an_unpaired_cache(tmp_path, tiny_model):
    from click.testing import CliRunner

    from prefcache.cli import main
    from prefcache.reference.shards import precompute

    torch.set_num_threads(1)
    data = write_jsonl(tmp_path / "u.jsonl", unpaired_rows(6))
    precompute(data=str(data), out=str(tmp_path / "cache"), model=str(tiny_model), max_length=48, quantize="fp32",
               unpaired=True, progress=False)
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert "kl_logps" in result.output and "6 rows" in result.output
    result = runner.invoke(main, ["verify", str(tmp_path / "cache"), "--data", str(data)])
    assert result.exit_code == 0 and "covers all 6 ids" in result.output, result.output
    write_jsonl(tmp_path / "more.jsonl", unpaired_rows(7))
    result = runner.invoke(main, ["verify", str(tmp_path / "cache"), "--data", str(tmp_path / "more.jsonl")])
    assert result.exit_code != 0 and "1 of 7 ids" in result.output, result.output


def test_column_mappings_are_refused_for_unpaired_data(tmp_path, tiny_model):
    from prefcache.reference.shards import precompute

    data = write_jsonl(tmp_path / "u.jsonl", unpaired_rows(4))
    with pytest.raises(ValueError, match="not supported for unpaired data"):
        precompute(data=str(data), out=str(tmp_path / "cache"), model=str(tiny_model), unpaired=True,
                   columns="prompt=question", progress=False)


def test_two_process_unpaired_precompute_equals_one_process(tmp_path, tiny_model):
    import os
    import subprocess
    import sys

    import polars as pl

    from prefcache.reference.shards import precompute

    torch.set_num_threads(1)
    data = write_jsonl(tmp_path / "u.jsonl", unpaired_rows(10))
    common = ["--data", str(data), "--model", str(tiny_model), "--max-length", "48", "--quantize", "fp32",
              "--unpaired", "--kl-group-size", "4", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          "29549", "-m", "prefcache", "precompute", *common, "--out", str(tmp_path / "ddp")],
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    assert {p.name.split("-")[1] for p in (tmp_path / "ddp").glob("part-*.parquet")} == {"r000", "r001"}
    assert verify(tmp_path / "ddp") == []
    precompute(data=str(data), out=str(tmp_path / "one"), model=str(tiny_model), max_length=48, quantize="fp32",
               unpaired=True, kl_group_size=4, progress=False)
    a, b = (pl.read_parquet(f"{tmp_path}/{d}/part-*.parquet").sort("id") for d in ("ddp", "one"))
    assert a["id"].to_list() == b["id"].to_list() and a["kl_id"].to_list() == b["kl_id"].to_list()
    torch.testing.assert_close(a["logps"].to_torch(), b["logps"].to_torch(), rtol=0, atol=1e-5)
    torch.testing.assert_close(a["kl_logps"].to_torch(), b["kl_logps"].to_torch(), rtol=0, atol=1e-5)
