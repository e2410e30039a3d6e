"""prefcache.data.pairs: file formats, TRL's formats and tokenisation, truncation, ids, bad rows."""

from __future__ import annotations

import csv
import hashlib
import json
import random
from pathlib import Path

import pytest
from conftest import write_jsonl

from prefcache.data.pairs import (
    BadDataError,
    BadRow,
    DataFormatError,
    Example,
    example_id,
    extract_prompt,
    load_dataset_pairs,
    load_rows,
    prepare_examples,
    tokenize_examples,
    write_bad_rows,
)
from prefcache.data.tokens import _truncate

EOS = "<|im_end|>"  # SmolLM2's EOS token (also its chat turn end)
USER = [{"role": "user", "content": "What color is the sky?"}]
BLUE = [{"role": "assistant", "content": "It is blue."}]
GREEN = [{"role": "assistant", "content": "It is green."}]


def std_rows(n: int = 12, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = "the a cat dog sat ran on under blue red quick slow house tree river sky".split()

    def text(lo, hi):
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    return [{"prompt": f"Q{i}: {text(2, 8)}", "chosen": " " + text(1, 10), "rejected": " " + text(1, 10)}
            for i in range(n)]


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def ids_by_content(rows, tokenizer) -> dict[str, tuple]:
    examples, _ = prepare_examples(rows, tokenizer)
    return {ex.id: (ex.prompt, ex.chosen, ex.rejected) for ex in examples}


# --------------------------------------------------------------------------- file formats


@pytest.mark.parametrize("fmt", ["jsonl", "json", "json_data", "json_named_jsonl", "parquet", "csv", "datasets",
                                 "datasets_dict"])
def test_load_rows_round_trips_each_format(tmp_path, fmt):
    from datasets import Dataset, DatasetDict

    rows = std_rows(5)
    path = {
        "jsonl": lambda: write_jsonl(tmp_path / "d.jsonl", rows),
        "json": lambda: (tmp_path / "d.json").write_text(json.dumps(rows)) and tmp_path / "d.json",
        "json_data": lambda: (tmp_path / "d.json").write_text(json.dumps({"data": rows})) and tmp_path / "d.json",
        "json_named_jsonl": lambda: write_jsonl(tmp_path / "d.json", rows),
        "parquet": lambda: write_parquet(tmp_path / "d.parquet", rows),
        "csv": lambda: write_csv(tmp_path / "d.csv", rows),
        "datasets": lambda: Dataset.from_list(rows).save_to_disk(tmp_path / "ds") or tmp_path / "ds",
        "datasets_dict": lambda: DatasetDict(train=Dataset.from_list(rows)).save_to_disk(tmp_path / "dd")
        or tmp_path / "dd",
    }[fmt]()
    assert load_rows(path) == rows


def test_load_rows_datasets_dict_with_several_splits(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = std_rows(4)
    DatasetDict(train=Dataset.from_list(rows[:3]), test=Dataset.from_list(rows[3:])).save_to_disk(tmp_path / "dd")
    with pytest.raises(DataFormatError, match="train, test"):
        load_rows(tmp_path / "dd")
    assert load_rows(tmp_path / "dd", split="test") == rows[3:]
    assert load_rows(tmp_path / "dd" / "train") == rows[:3]
    with pytest.raises(DataFormatError, match="'dev' is not in it"):
        load_rows(tmp_path / "dd", split="dev")


def test_load_rows_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data not found"):
        load_rows(tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("hi")
    with pytest.raises(DataFormatError, match=r"unknown data format '\.txt'"):
        load_rows(tmp_path / "d.txt")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": \n')
    with pytest.raises(DataFormatError, match="line 3: not valid JSON"):
        load_rows(tmp_path / "bad.jsonl")
    (tmp_path / "scalar.json").write_text("3")
    with pytest.raises(DataFormatError, match="expected a JSON list"):
        load_rows(tmp_path / "scalar.json")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataFormatError, match="not one written by datasets.save_to_disk"):
        load_rows(tmp_path / "folder")


# --------------------------------------------------------------------------- ids


def test_content_hash_is_sha256_of_canonical_json(tokenizer):
    row = {"prompt": "Häuser?", "chosen": " ja", "rejected": " nein"}
    canonical = '{"chosen":" ja","prompt":"Häuser?","rejected":" nein"}'
    expected = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:32]
    assert example_id(row["prompt"], row["chosen"], row["rejected"]) == expected
    (ex,), _ = prepare_examples([row], tokenizer)
    assert ex.id == expected


def test_ids_stable_under_shuffling_and_across_formats(tmp_path, tokenizer):
    rows = std_rows(20)
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    reference = ids_by_content(rows, tokenizer)
    assert len(reference) == 20
    for path in (write_jsonl(tmp_path / "s.jsonl", shuffled), write_parquet(tmp_path / "s.parquet", shuffled),
                 write_csv(tmp_path / "s.csv", shuffled)):
        assert ids_by_content(load_rows(path), tokenizer) == reference, path.suffix


def test_conversational_ids_agree_between_jsonl_and_parquet(tmp_path, tokenizer):
    # Parquet stores messages as structs: a key one message has becomes None in all the others.
    rows = [{"prompt": [{"role": "user", "content": "hi", "name": "ann"}], "chosen": BLUE, "rejected": GREEN},
            {"prompt": USER, "chosen": BLUE, "rejected": GREEN}]
    from_parquet = load_rows(write_parquet(tmp_path / "c.parquet", rows))
    assert from_parquet[1]["prompt"][0]["name"] is None
    assert ids_by_content(from_parquet, tokenizer) == ids_by_content(rows, tokenizer)


def test_id_column_is_used_and_cast_to_str(tokenizer):
    rows = [dict(r, id=i * 10) for i, r in enumerate(std_rows(3))]
    examples, _ = prepare_examples(rows, tokenizer)
    assert [ex.id for ex in examples] == ["0", "10", "20"]


def test_exact_duplicates_yield_one_example(tokenizer):
    rows = std_rows(3)
    examples, bad = prepare_examples([rows[0], rows[1], dict(rows[0]), rows[2], dict(rows[1])], tokenizer)
    assert bad == []
    assert [ex.row for ex in examples] == [0, 1, 3]
    with_ids = [dict(rows[0], id="a"), dict(rows[0], id="a")]
    examples, bad = prepare_examples(with_ids, tokenizer)
    assert len(examples) == 1 and bad == []


def test_same_id_different_content_is_a_bad_row(tokenizer):
    rows = [dict(r, id="x") for r in std_rows(2)]
    with pytest.raises(BadDataError, match="row 2 \\(id x\\): id 'x' is already used by row 1"):
        prepare_examples(rows, tokenizer)
    examples, bad = prepare_examples(rows, tokenizer, on_bad_row="skip")
    assert [ex.row for ex in examples] == [0] and bad[0].row == 1


# --------------------------------------------------------------------------- TRL formats


def test_standard_format_appends_eos_once(tokenizer):
    rows = [{"prompt": "Say hi:", "chosen": " hi" + EOS, "rejected": " bye"}]
    (ex,), _ = prepare_examples(rows, tokenizer)
    assert (ex.prompt, ex.chosen, ex.rejected) == ("Say hi:", " hi" + EOS, " bye" + EOS)
    (pair,), _ = tokenize_examples([ex], tokenizer, 64)
    assert pair.chosen_ids.count(tokenizer.eos_token_id) == 1 and pair.chosen_ids[-1] == tokenizer.eos_token_id
    assert pair.rejected_ids.count(tokenizer.eos_token_id) == 1 and pair.rejected_ids[-1] == tokenizer.eos_token_id
    assert pair.prompt_ids == tokenizer("Say hi:")["input_ids"]
    assert pair.prompt_ids + pair.chosen_ids == tokenizer("Say hi: hi" + EOS)["input_ids"]


def test_conversational_format_uses_the_chat_template(tokenizer):
    rows = [{"prompt": USER, "chosen": BLUE, "rejected": GREEN}]
    (ex,), _ = prepare_examples(rows, tokenizer)
    prompt = tokenizer.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    assert ex.conversational and ex.prompt == prompt
    assert prompt.endswith("<|im_start|>user\nWhat color is the sky?<|im_end|>\n<|im_start|>assistant\n")
    assert ex.chosen == "It is blue.<|im_end|>\n"  # the template's own turn end; no EOS added
    assert ex.rejected == "It is green.<|im_end|>\n"
    (pair,), _ = tokenize_examples([ex], tokenizer, 256)
    full = tokenizer.apply_chat_template(USER + BLUE, tokenize=True, return_dict=True)["input_ids"]
    assert pair.prompt_ids + pair.chosen_ids == full
    assert pair.prompt_ids == tokenizer.apply_chat_template(USER, add_generation_prompt=True, return_dict=True)["input_ids"]


def test_implicit_prompt_standard(tokenizer):
    rows = [{"chosen": "Q: is it? A: yes", "rejected": "Q: is it? A: no"}]
    (ex,), _ = prepare_examples(rows, tokenizer)
    assert (ex.prompt, ex.chosen, ex.rejected) == ("Q: is it? A:", " yes" + EOS, " no" + EOS)
    assert ex.id == example_id(None, rows[0]["chosen"], rows[0]["rejected"])


def test_extract_prompt_matches_trl():
    assert extract_prompt("The sky is blue.", "The sky is green.") == ("The sky is", " blue.", " green.")
    assert extract_prompt("abc", "abcdef") == ("ab", "c", "cdef")  # TRL's loop stops one short
    assert extract_prompt("xy ", "ab ") == ("", "xy ", "ab ")  # TRL would look at chosen[-1] here
    assert extract_prompt(USER + BLUE, USER + GREEN) == (USER, BLUE, GREEN)


def test_implicit_prompt_conversational(tokenizer):
    rows = [{"chosen": USER + BLUE, "rejected": USER + GREEN}]
    (ex,), _ = prepare_examples(rows, tokenizer)
    (explicit,), _ = prepare_examples([{"prompt": USER, "chosen": BLUE, "rejected": GREEN}], tokenizer)
    assert (ex.prompt, ex.chosen, ex.rejected) == (explicit.prompt, explicit.chosen, explicit.rejected)
    assert ex.id != explicit.id  # ids hash the raw fields, which differ


def test_joint_tokenisation_across_the_boundary(tokenizer):
    # " ma" + "t." tokenises jointly as " mat" "." : the prompt's last token is not a prompt token.
    ex = Example("x", 0, "The cat sat on the ma", "t." + EOS, " and" + EOS)
    assert tokenizer(ex.prompt)["input_ids"][-1] == tokenizer.convert_tokens_to_ids("Ġma")
    (pair,), _ = tokenize_examples([ex], tokenizer, 64)
    assert pair.prompt_ids == tokenizer("The cat sat on the")["input_ids"]
    assert pair.chosen_ids == tokenizer.convert_tokens_to_ids(["Ġmat", ".", EOS])
    # The prompt part is the shorter common prefix over both sides, so " ma" moves to rejected too.
    assert pair.rejected_ids == tokenizer.convert_tokens_to_ids(["Ġma", "Ġand", EOS])
    assert pair.prompt_ids + pair.chosen_ids == tokenizer(ex.prompt + ex.chosen)["input_ids"]
    assert pair.chosen_ids != tokenizer(ex.chosen)["input_ids"]  # tokenising the completion alone is not the same


# --------------------------------------------------------------------------- truncation


def counting_example(n_prompt: int, n_chosen: int, n_rejected: int) -> Example:
    """Texts of exactly the given token counts (" wN" style words are one SmolLM2 token each)."""
    words = " one two three four five six seven eight nine ten".split()
    pick = lambda n, k: "".join(f" {words[(i + k) % 10]}" for i in range(n))  # noqa: E731
    return Example("t", 0, "Count:" + pick(n_prompt - 2, 0), pick(n_chosen - 1, 3) + EOS, pick(n_rejected - 1, 6) + EOS)


def test_counting_example_lengths(tokenizer):
    ex = counting_example(12, 7, 4)
    (pair,), _ = tokenize_examples([ex], tokenizer, 1000)
    assert (len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)) == (12, 7, 4)


def test_keep_start_keeps_the_first_max_length_tokens(tokenizer):
    ex = counting_example(12, 10, 4)
    (full,), _ = tokenize_examples([ex], tokenizer, 1000)
    (pair,), _ = tokenize_examples([ex], tokenizer, 16)
    assert pair.prompt_ids == full.prompt_ids
    assert pair.chosen_ids == full.chosen_ids[:4] and pair.chosen_truncated  # lost its tail, EOS included
    assert pair.rejected_ids == full.rejected_ids and not pair.rejected_truncated  # 12 + 4 = 16 fits
    (exact,), _ = tokenize_examples([ex], tokenizer, 22)
    assert exact.chosen_ids == full.chosen_ids and not exact.chosen_truncated


def test_keep_start_prompt_that_fills_max_length_is_a_bad_row(tokenizer):
    ex = counting_example(12, 3, 3)
    with pytest.raises(BadDataError, match="row 1 \\(id t\\): the prompt alone has 12 tokens, max_length is 12"):
        tokenize_examples([ex], tokenizer, 12)
    pairs, bad = tokenize_examples([ex], tokenizer, 12, on_bad_row="skip")
    assert pairs == [] and bad == [BadRow(0, "t", "the prompt alone has 12 tokens, max_length is 12: "
                                                "no room for a completion")]
    (pair,), _ = tokenize_examples([ex], tokenizer, 13)  # one completion token fits
    assert len(pair.chosen_ids) == 1


def test_truncate_rule_by_hand():
    prompt, chosen, rejected = list(range(20)), list(range(100, 110)), list(range(200, 205))
    # keep_end: the prompt loses just enough of its head for the longer completion (10) to fit in 25.
    assert _truncate(prompt, chosen, rejected, 25, "keep_end") == (prompt[5:], chosen, rejected)
    # A completion too long for that: the prompt keeps half the window, the completions lose their tails.
    assert _truncate(prompt, list(range(100, 140)), rejected, 25, "keep_end") == (
        prompt[8:], list(range(100, 113)), rejected)
    # A short prompt is never cut below its own length.
    assert _truncate(prompt[:3], list(range(100, 140)), rejected, 25, "keep_end") == (
        prompt[:3], list(range(100, 122)), rejected)
    # keep_start: the prompt stays whole.
    assert _truncate(prompt, chosen, rejected, 25, "keep_start") == (prompt, chosen[:5], rejected)
    # Nothing to cut.
    assert _truncate(prompt, chosen, rejected, 30, "keep_end") == (prompt, chosen, rejected)


def test_keep_end_cuts_the_prompt_head(tokenizer):
    ex = counting_example(20, 10, 5)
    (full,), _ = tokenize_examples([ex], tokenizer, 1000)
    (pair,), _ = tokenize_examples([ex], tokenizer, 25, truncation="keep_end")
    assert pair.prompt_ids == full.prompt_ids[5:]
    assert pair.chosen_ids == full.chosen_ids and pair.rejected_ids == full.rejected_ids
    assert pair.chosen_truncated and not pair.rejected_truncated  # 30 > 25; 25 fits
    assert len(pair.prompt_ids) + len(pair.chosen_ids) == 25
    # A prompt longer than max_length is cut, not refused, under keep_end.
    (long_prompt,), bad = tokenize_examples([counting_example(40, 3, 3)], tokenizer, 16, truncation="keep_end")
    assert bad == [] and len(long_prompt.prompt_ids) == 13 and len(long_prompt.chosen_ids) == 3


# --------------------------------------------------------------------------- bad rows


BAD_ROWS = [
    ({"chosen": " a", "rejected": " b"}, "missing field 'prompt'"),
    ({"prompt": None, "chosen": " a", "rejected": " b"}, "null field 'prompt'"),
    ({"prompt": "p", "chosen": 3, "rejected": " b"}, "'chosen' must be a string or a list"),
    ({"prompt": "p", "chosen": "", "rejected": " b"}, "empty completion 'chosen'"),
    ({"prompt": USER, "chosen": ["hi"], "rejected": GREEN}, "'chosen' message 0 is a str"),
    ({"prompt": USER, "chosen": [{"role": "assistant"}], "rejected": GREEN}, "'content' must be a string, got missing"),
    ({"prompt": USER, "chosen": [{"role": "assistant", "content": [{"type": "text"}]}], "rejected": GREEN},
     "'content' must be a string, got a list"),
    ({"prompt": [], "chosen": BLUE, "rejected": GREEN}, "'prompt' is an empty message list"),
    ({"prompt": "p", "chosen": BLUE, "rejected": GREEN}, "fields mix plain strings and message lists"),
    (["p", "a", "b"], "a row must be an object"),
]


@pytest.mark.parametrize("row,problem", BAD_ROWS, ids=[p for _, p in BAD_ROWS])
def test_bad_rows_fail_or_skip(tokenizer, row, problem):
    rows = [std_rows(1)[0], row]
    with pytest.raises(BadDataError, match="1 bad row in the data:\n  row 2") as err:
        prepare_examples(rows, tokenizer)
    assert problem in str(err.value)
    examples, bad = prepare_examples(rows, tokenizer, on_bad_row="skip")
    assert [ex.row for ex in examples] == [0]
    assert len(bad) == 1 and bad[0].row == 1 and problem in bad[0].problem


def test_conversational_row_without_chat_template_is_bad(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", None)
    _, bad = prepare_examples([{"prompt": USER, "chosen": BLUE, "rejected": GREEN}], tokenizer, on_bad_row="skip")
    assert bad[0].problem == "conversational row, but the tokenizer has no chat template"


def test_prompts_with_no_tokens_are_bad(tokenizer):
    # An empty prompt (SmolLM2 adds no BOS) and one that merges entirely into the completion's first token.
    examples = [Example("e", 0, "", " a" + EOS, " b" + EOS), Example("m", 1, "ma", "t" + EOS, "ths" + EOS)]
    pairs, bad = tokenize_examples(examples, tokenizer, 32, on_bad_row="skip")
    assert pairs == [] and [b.id for b in bad] == ["e", "m"]
    assert all("the prompt has no tokens of its own" in b.problem for b in bad)


def test_missing_id_in_an_id_column_is_bad(tokenizer):
    rows = [dict(r, id=i) for i, r in enumerate(std_rows(2))]
    rows[1]["id"] = None
    _, bad = prepare_examples(rows, tokenizer, on_bad_row="skip")
    assert bad == [BadRow(1, None, "'id' is missing or null (the file has an id column, so every row needs one)")]


def test_fail_lists_ten_bad_rows_and_the_count(tokenizer):
    rows = [{"prompt": "p", "chosen": "", "rejected": " b"}] * 15
    with pytest.raises(BadDataError) as err:
        prepare_examples(rows, tokenizer)
    message = str(err.value)
    assert message.startswith("15 bad rows in the data:") and "row 10" in message and "row 11" not in message
    assert "... and 5 more" in message and "on_bad_row='skip'" in message
    assert len(err.value.bad_rows) == 15


def test_no_preference_columns_is_a_format_error(tokenizer):
    with pytest.raises(DataFormatError, match="no 'chosen' or 'rejected' column"):
        prepare_examples([{"question": "q", "answer": "a"}], tokenizer, on_bad_row="skip")


def test_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="on_bad_row"):
        prepare_examples([], tokenizer, on_bad_row="ignore")
    with pytest.raises(ValueError, match="truncation"):
        tokenize_examples([], tokenizer, 16, truncation="middle")
    with pytest.raises(ValueError, match="max_length"):
        tokenize_examples([], tokenizer, 1)


def test_write_bad_rows(tmp_path):
    bad = [BadRow(3, None, "missing field 'prompt'"), BadRow(7, "x", "naïve problem")]
    write_bad_rows(tmp_path / "out" / "bad_rows.jsonl", bad)
    lines = (tmp_path / "out" / "bad_rows.jsonl").read_text(encoding="utf-8").splitlines()
    assert [BadRow(**json.loads(line)) for line in lines] == bad


# --------------------------------------------------------------------------- end to end


def test_load_dataset_pairs(tmp_path, tokenizer):
    rows = std_rows(6)
    rows.insert(2, {"prompt": "p", "chosen": None, "rejected": " b"})
    rows.insert(4, {"prompt": "Count:" + " one" * 40, "chosen": " a", "rejected": " b"})  # prompt too long
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(BadDataError, match=f"2 bad rows in {path}:\n  line 3 .*\n  line 5 .*the prompt alone"):
        load_dataset_pairs(path, tokenizer, 32)
    pairs, bad, examples = load_dataset_pairs(path, tokenizer, 32, on_bad_row="skip")
    assert [b.row for b in bad] == [2, 4]
    assert [p.id for p in pairs] == [ex.id for ex in examples] and len(pairs) == 6
    assert all(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= 32 for p in pairs)
    firsts, _, _ = load_dataset_pairs(path, tokenizer, 32, on_bad_row="skip", max_rows=2)
    assert [p.id for p in firsts] == [p.id for p in pairs[:2]]
    picked, _, _ = load_dataset_pairs(path, tokenizer, 32, on_bad_row="skip", ids={pairs[3].id, "nope"})
    assert picked == [pairs[3]]


def test_tokenising_ten_thousand_rows_is_one_batched_call(tokenizer):
    """What makes 10,000 rows take seconds: one batched tokenizer call (the fast tokenizer encodes the batch in
    Rust), not a call per row. Counted, not timed, so a loaded machine cannot fail it."""
    rows = std_rows(10_000, seed=2)
    calls = []

    class Counting:  # the tokenizer, with its calls and their batch sizes counted
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, texts, **kw):
            calls.append(len(texts))
            return tokenizer(texts, **kw)

    examples, _ = prepare_examples(rows, Counting())
    pairs, _ = tokenize_examples(examples, Counting(), 64)
    assert len(pairs) == len({ex.id for ex in examples}) > 9_000
    assert calls == [3 * len(examples)]  # prompt, prompt + chosen, prompt + rejected of every row at once


def test_pair_blocks_equal_the_whole_data_read_at_once(tmp_path, tokenizer):
    """Read in blocks (bounded memory), the pairs, ids, bad rows and row numbers are those of one read."""
    from conftest import preference_rows

    from prefcache.data.pairs import iter_pair_blocks, load_dataset_pairs

    rows = preference_rows(23)
    rows[15] = dict(rows[2])  # an exact duplicate in a later block: dropped
    rows[20] = {**rows[4], "chosen": rows[4]["chosen"]}  # duplicate again
    rows[9] = {"prompt": "p", "chosen": None, "rejected": "r"}  # a bad row in the second block
    for suffix in ("jsonl", "parquet"):
        path = tmp_path / f"d.{suffix}"
        if suffix == "jsonl":
            write_jsonl(path, rows)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), path)
        whole, bad, _ = load_dataset_pairs(path, tokenizer, 32, on_bad_row="skip")
        blocks = list(iter_pair_blocks(path, tokenizer, 32, on_bad_row="skip", block_rows=5))
        assert len(blocks) == 5
        assert [p for b, _ in blocks for p in b] == whole and len(whole) == 20
        assert [r for _, b in blocks for r in b] == bad and [b.row for b in bad] == [9]
        with pytest.raises(BadDataError, match="line 10" if suffix == "jsonl" else "row 10"):  # counted from 1
            list(iter_pair_blocks(path, tokenizer, 32, block_rows=5))
    # An id column reused for other content in a later block is a bad row, as in one read.
    with_ids = [{"id": i % 6, **r} for i, r in enumerate(preference_rows(8, seed=1))]
    write_jsonl(tmp_path / "ids.jsonl", with_ids)
    _, bad, _ = load_dataset_pairs(tmp_path / "ids.jsonl", tokenizer, 32, on_bad_row="skip")
    blocks = list(iter_pair_blocks(tmp_path / "ids.jsonl", tokenizer, 32, on_bad_row="skip", block_rows=3))
    assert [b.row for _, bb in blocks for b in bb] == [b.row for b in bad] == [6, 7]
