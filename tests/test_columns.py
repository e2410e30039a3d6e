"""prefcache.data.columns: other people's column names and prompt templates, recorded in the cache and checked."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from conftest import write_jsonl

from prefcache.cache.compat import check_cache_mapping
from prefcache.data.columns import RowMapping, parse_columns, unescape

STACK = [  # the stack-exchange paired data of the DPO / Llama-2 walk-through
    {"qid": 7, "question": "How do I sort a list?", "response_j": "Use sorted().", "response_k": "You can't."},
    {"qid": 8, "question": "What is 2+2?", "response_j": "4", "response_k": "5"},
]
SE_COLUMNS = "id=qid,prompt=question,chosen=response_j,rejected=response_k"
SE_TEMPLATE = "Question: {prompt}\n\nAnswer: "


def test_stack_exchange_rows_are_mapped_and_rendered(tmp_path, tokenizer):
    from prefcache.data.pairs import example_id, load_dataset_pairs

    data = write_jsonl(tmp_path / "se.jsonl", STACK)
    mapping = RowMapping(SE_COLUMNS, prompt_template=SE_TEMPLATE)
    pairs, bad, examples = load_dataset_pairs(data, tokenizer, 64, mapping=mapping)
    assert not bad and [e.id for e in examples] == ["7", "8"]
    assert examples[0].prompt == "Question: How do I sort a list?\n\nAnswer: "
    assert examples[0].chosen == "Use sorted()." + tokenizer.eos_token
    assert pairs[0].prompt_ids + pairs[0].chosen_ids == tokenizer(examples[0].prompt + examples[0].chosen)["input_ids"]
    # Without an id column the id is the content hash of the rendered pair (so another template = other ids).
    _, _, derived = load_dataset_pairs(data, tokenizer, 64, mapping=RowMapping(SE_COLUMNS.partition(",")[2],
                                                                                 prompt_template=SE_TEMPLATE))
    assert derived[1].id == example_id("Question: What is 2+2?\n\nAnswer: ", "4", "5")
    chosen = RowMapping(SE_COLUMNS, chosen_template=" {chosen}", rejected_template=" {rejected}")
    _, _, ex = load_dataset_pairs(data, tokenizer, 64, mapping=chosen)
    assert ex[1].prompt == "What is 2+2?" and ex[1].chosen == " 4" + tokenizer.eos_token


def test_bad_mappings_are_one_clear_line(tmp_path, tokenizer):
    from prefcache.data.formats import DataFormatError
    from prefcache.data.pairs import load_dataset_pairs
    from prefcache.reference.config import PrecomputeConfig

    with pytest.raises(ValueError, match="--columns: unknown column 'question'; map id, prompt, chosen, rejected"):
        parse_columns("question=prompt")
    with pytest.raises(ValueError, match=r"--prompt-template must contain \{prompt\}"):
        PrecomputeConfig(data="d", out="o", prompt_template="Question: {question}")
    with pytest.raises(ValueError, match="TARGET=COLUMN"):
        PrecomputeConfig(data="d", out="o", columns="prompt")
    data = write_jsonl(tmp_path / "se.jsonl", STACK)
    with pytest.raises(DataFormatError, match="--columns maps chosen to 'response_a', which is not a column of .*"
                                              "it has qid, question, response_j, response_k"):
        load_dataset_pairs(data, tokenizer, 64, mapping=RowMapping("prompt=question,chosen=response_a,rejected=response_k"))
    with pytest.raises(DataFormatError, match=r"--prompt-template names \{title\}, which is not a column"):
        load_dataset_pairs(data, tokenizer, 64, mapping=RowMapping(SE_COLUMNS, prompt_template="{title}: {prompt}"))


def test_bad_mappings_on_the_command_line_are_one_line(tmp_path, tiny_model):
    from prefcache.cli import main

    data = write_jsonl(tmp_path / "se.jsonl", STACK)
    base = ["precompute", "--data", str(data), "--out", str(tmp_path / "c"), "--model", str(tiny_model), "--no-progress"]
    for extra, message in ((["--prompt-template", "Q: {question}"], "--prompt-template must contain {prompt}"),
                           (["--columns", "query=question"], "--columns: unknown column 'query'"),
                           (["--columns", "prompt=title,chosen=response_j,rejected=response_k"],
                            "--columns maps prompt to 'title', which is not a column")):
        res = CliRunner().invoke(main, base + extra)
        assert res.exit_code == 1 and res.output.startswith("Error: ") and message in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1, res.output


def test_missing_completions_list_only_the_columns_the_data_has(tmp_path, tiny_model):
    """The mapped names (prompt, id) are not columns of the data: the list shows the data's own."""
    from prefcache.cli import main

    data = write_jsonl(tmp_path / "se.jsonl", STACK)
    res = CliRunner().invoke(main, ["precompute", "--data", str(data), "--out", str(tmp_path / "c"), "--model",
                                    str(tiny_model), "--no-progress", "--columns", "id=qid,prompt=question"])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1, res.output
    assert "no 'chosen' or 'rejected' column" in lines[0]
    assert "found columns ['qid', 'question', 'response_j', 'response_k']; map them with --columns" in lines[0]


def test_unescape_and_records():
    assert unescape(r"Question: {prompt}\n\nAnswer:\t\\n") == "Question: {prompt}\n\nAnswer:\t\\n"
    assert RowMapping().record() is None and not RowMapping()
    assert RowMapping("prompt=question", prompt_template="Q: {prompt}").record() == {
        "columns": {"prompt": "question"}, "prompt_template": "Q: {prompt}", "chosen_template": None,
        "rejected_template": None}
    from prefcache.cache.store import CacheError

    check_cache_mapping({}, RowMapping())  # a cache made before mappings existed: no mapping
    with pytest.raises(CacheError, match="data mapping None"):
        check_cache_mapping({}, RowMapping("prompt=question"))


def test_cache_records_the_mapping_and_the_trainer_refuses_another(tmp_path, tiny_model):
    from prefcache.cache.store import CacheError, read_metadata
    from prefcache.cli import main
    from prefcache.training.loop import train

    data = write_jsonl(tmp_path / "se.jsonl", STACK * 2)
    cache = tmp_path / "cache"
    res = CliRunner().invoke(main, ["precompute", "--data", str(data), "--out", str(cache), "--model", str(tiny_model),
                                    "--columns", SE_COLUMNS, "--prompt-template", r"Question: {prompt}\n\nAnswer: ",
                                    "--max-length", "64", "--quantize", "fp32", "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert read_metadata(cache)["data_mapping"]["prompt_template"] == SE_TEMPLATE  # \n typed = a newline
    common = {"data": str(data), "cache": str(cache), "model": str(tiny_model), "max_steps": 1, "device": "cpu",
              "lora_r": 2, "progress": False}
    with pytest.raises(CacheError, match="was made with data mapping"):
        train(out=str(tmp_path / "run0"), columns=SE_COLUMNS, prompt_template="Q: {prompt}\nA: ", **common)
    summary = train(out=str(tmp_path / "run1"), columns=SE_COLUMNS, prompt_template=SE_TEMPLATE, **common)
    assert summary["steps"] == 1


def test_a_text_prompt_beside_full_conversations_is_implicit_as_in_trl(tokenizer):
    """HuggingFaceH4/ultrafeedback_binarized: a text `prompt` and chosen/rejected conversations that repeat it
    as their first message. TRL's maybe_extract_prompt takes the conversations' common prefix; so does prefcache."""
    from prefcache.data.pairs import prepare_examples

    user = {"role": "user", "content": "What colour is the sky?"}
    row = {"prompt": user["content"], "chosen": [user, {"role": "assistant", "content": "Blue."}],
           "rejected": [user, {"role": "assistant", "content": "Green."}]}
    (ex,), bad = prepare_examples([row], tokenizer)
    assert not bad and ex.conversational
    assert ex.prompt == tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    assert ex.chosen.startswith("Blue.")
