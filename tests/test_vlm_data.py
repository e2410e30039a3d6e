"""Vision preference data (prefcache.data.images, .vision, .vision_pairs): images read from paths, bytes and datasets
features into content hashes, pairs tokenised with a real processor as TRL 1.16's vision collator does, bad images
as bad rows with their lines, for both tiny families (tests/vlm_models.py)."""

from __future__ import annotations

import json
import shutil
from itertools import takewhile
from pathlib import Path

import pytest
from vlm_models import FAMILIES, make_tiny_vlm, random_image, vision_rows

from prefcache.data.badrows import BadDataError
from prefcache.data.columns import RowMapping
from prefcache.data.images import ImageRef, image_refs
from prefcache.data.validate import example_id
from prefcache.data.vision import prepare_vision_examples, vision_id
from prefcache.data.vision_pairs import iter_vision_pair_blocks, tokenize_vision_examples

# Image tokens one 64x64 image becomes (tests/vlm_models.py): LLaVA (64 / 8)^2 = 64 <image> tokens; Idefics3 the
# pixel shuffle's (64 / 8)^2 / 2^2 = 16 <image> tokens, between <fake_token_around_image> and <global-img> markers.
IMAGE_TOKENS = {"llava": 64, "idefics3": 16}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory, tokenizer):
    from transformers import AutoProcessor

    folder = make_tiny_vlm(tmp_path_factory.mktemp(request.param) / "vlm", tokenizer, request.param)
    return request.param, AutoProcessor.from_pretrained(folder)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_pairs(path, processor, max_length=512, truncation="keep_start", **kwargs):
    blocks = list(iter_vision_pair_blocks(path, processor, max_length, truncation, "skip", **kwargs))
    return [p for pairs, _ in blocks for p in pairs], [b for _, bad in blocks for b in bad]


def trl_ids(row: dict, processor) -> tuple[list[int], list[int], list[int]]:
    """TRL 1.16's DataCollatorForVisionPreference on one conversational row, step by step: the image parts filled
    with the PIL images (prepare_multimodal_messages), the three renderings and their common prefix
    (data_utils.apply_chat_template), the processor on prompt + images and on each completion alone, all with
    add_special_tokens=False."""
    from PIL import Image

    images = [Image.open(p) for p in row["images"]]
    filled = iter(images)
    prompt = [{**m, "content": [{**c, "image": next(filled)} if c["type"] == "image" else c for c in m["content"]]}
              for m in row["prompt"]]
    prompt_text = processor.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = {k: processor.apply_chat_template(prompt + row[k], tokenize=False) for k in ("chosen", "rejected")}
    for text in full.values():
        prompt_text = "".join(x for x, _ in takewhile(lambda x: x[0] == x[1], zip(prompt_text, text, strict=False)))
    prompt_ids = processor(images=[images], text=[prompt_text], add_special_tokens=False)["input_ids"][0]
    chosen, rejected = (processor(text=[full[k][len(prompt_text):]], add_special_tokens=False)["input_ids"][0]
                        for k in ("chosen", "rejected"))
    return list(prompt_ids), list(chosen), list(rejected)


def test_prompt_ids_hold_each_images_tokens(family, tmp_path):
    name, processor = family
    rows = vision_rows(3, tmp_path / "img")
    two = tmp_path / "second.png"
    random_image(99).save(two)
    rows[2]["images"].append(str(two))
    rows[2]["prompt"][0]["content"].insert(1, {"type": "image"})
    pairs, bad = read_pairs(write_jsonl(tmp_path / "d.jsonl", rows), processor)
    assert not bad
    assert [p.prompt_ids.count(processor.image_token_id) for p in pairs] == [IMAGE_TOKENS[name]] * 2 + [2 * IMAGE_TOKENS[name]]
    assert [len(p.images) for p in pairs] == [1, 1, 2]
    assert all(processor.image_token_id not in p.chosen_ids + p.rejected_ids for p in pairs)


def test_ids_are_trls(family, tmp_path):
    _, processor = family
    rows = vision_rows(4, tmp_path / "img")
    pairs, bad = read_pairs(write_jsonl(tmp_path / "d.jsonl", rows), processor)
    assert not bad and len(pairs) == 4
    for row, pair in zip(rows, pairs, strict=True):
        assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == trl_ids(row, processor)
        assert processor.tokenizer.decode(pair.chosen_ids).endswith("<|im_end|>\n")  # the template closes the turn


def test_string_contents_get_their_image_part_before_the_text_as_trl_does(family, tmp_path):
    _, processor = family
    row = vision_rows(1, tmp_path / "img")[0]
    structured = {**row, "prompt": [{"role": "user", "content": [{"type": "image"},
                                                                 {"type": "text", "text": "What is it?"}]}]}
    plain = {**row, "prompt": [{"role": "user", "content": "What is it?"}],
             "chosen": [{"role": "assistant", "content": "A cat."}], "rejected": [{"role": "assistant", "content": "A dog."}]}
    structured["chosen"] = [{"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]
    structured["rejected"] = [{"role": "assistant", "content": [{"type": "text", "text": "A dog."}]}]
    (a,), _ = read_pairs(write_jsonl(tmp_path / "a.jsonl", [plain]), processor)
    (b,), _ = read_pairs(write_jsonl(tmp_path / "b.jsonl", [structured]), processor)
    assert (a.prompt_ids, a.chosen_ids, a.rejected_ids) == (b.prompt_ids, b.chosen_ids, b.rejected_ids)
    assert (a.prompt_ids, a.chosen_ids, a.rejected_ids) == trl_ids(structured, processor)


def test_standard_rows_take_the_processors_placeholder_and_the_text_paths_eos(family, tmp_path):
    name, processor = family
    path = tmp_path / "cat.png"
    random_image(1).save(path)
    row = {"images": [str(path)], "prompt": "<image>What is it?", "chosen": " A cat.", "rejected": " A dog."}
    (pair,), bad = read_pairs(write_jsonl(tmp_path / "d.jsonl", [row]), processor)
    assert not bad
    tok = processor.tokenizer
    # The prompt through the processor with the tokenizer's defaults, the completion alone, EOS appended as text.
    expected = processor(images=[[random_image(1)]], text=["<image>What is it?"])["input_ids"][0]
    assert pair.prompt_ids == list(expected)
    assert pair.prompt_ids.count(processor.image_token_id) == IMAGE_TOKENS[name]
    assert pair.chosen_ids == tok(" A cat." + tok.eos_token, add_special_tokens=False)["input_ids"]


def test_ids_cover_the_images(family, tmp_path):
    _, processor = family
    rows = vision_rows(2, tmp_path / "img")
    other = {**rows[0], "images": rows[1]["images"]}  # the same texts, another picture
    copy = tmp_path / "copy.png"
    shutil.copy(rows[0]["images"][0], copy)
    same = {**rows[0], "images": [str(copy)]}  # the same picture in another file
    examples, bad = prepare_vision_examples([rows[0], other, same], processor)
    assert not bad
    assert len(examples) == 2  # `same` is an exact duplicate of the first row: one example, one id
    assert examples[0].id != examples[1].id
    text = {k: rows[0][k] for k in ("prompt", "chosen", "rejected")}
    assert vision_id(**text, images=()) == example_id(**text)  # no images: the text path's id
    assert examples[0].id == vision_id(**text, images=image_refs(rows[0]["images"]))
    assert examples[0].id != example_id(**text)


def test_bad_images_are_bad_rows_with_their_lines(family, tmp_path):
    _, processor = family
    rows = vision_rows(5, tmp_path / "img")
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png at all")
    rows[1]["images"] = [str(tmp_path / "img" / "gone.png")]
    rows[2]["images"] = ["img/broken.png"]  # relative to the data file's folder
    rows[3]["prompt"][0]["content"].insert(0, {"type": "image"})  # two placeholders, one image
    rows[4]["images"] = []
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    pairs, bad = read_pairs(data, processor)
    assert len(pairs) == 1
    assert [b.line for b in bad] == [2, 3, 4, 5]
    assert "no such image file" in bad[0].problem and "gone.png" in bad[0].problem
    assert "image 0" in bad[1].problem and "cannot be read as an image" in bad[1].problem
    assert "the prompt has 2 image placeholders but the row has 1 image" in bad[2].problem
    assert "the prompt has 1 image placeholder but the row has 0 images" in bad[3].problem
    with pytest.raises(BadDataError, match="line 2.*no such image file"):
        list(iter_vision_pair_blocks(data, processor, 512))


def test_columns_map_images(family, tmp_path):
    _, processor = family
    rows = vision_rows(3, tmp_path / "img")
    theirs = [{"pics": r["images"], "question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in rows]
    mapping = RowMapping(columns="images=pics,prompt=question,chosen=good,rejected=bad")
    mapped, bad = read_pairs(write_jsonl(tmp_path / "theirs.jsonl", theirs), processor, mapping=mapping)
    ours, _ = read_pairs(write_jsonl(tmp_path / "ours.jsonl", rows), processor)
    assert not bad
    assert mapped == ours and all(p.images for p in mapped)


def test_jsonl_paths_parquet_bytes_and_a_datasets_folder_give_the_same_pairs(family, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, processor = family
    rows = vision_rows(5, tmp_path / "data" / "img")
    rows.append(dict(rows[1]))  # an exact duplicate, in another block (block_rows=2): dropped
    relative = [{**r, "images": [str(Path(p).relative_to(tmp_path / "data")) for p in r["images"]]} for r in rows]
    jsonl, _ = read_pairs(write_jsonl(tmp_path / "data" / "d.jsonl", relative), processor, block_rows=2)
    with_bytes = [{**r, "images": [Path(p).read_bytes() for p in r["images"]]} for r in rows]
    pq.write_table(pa.Table.from_pylist(with_bytes), tmp_path / "d.parquet")
    parquet, _ = read_pairs(tmp_path / "d.parquet", processor, block_rows=2)
    features = datasets.Dataset.from_list(rows).cast_column("images", datasets.List(datasets.Image()))
    features.save_to_disk(str(tmp_path / "ds"))
    folder, _ = read_pairs(tmp_path / "ds", processor, block_rows=2)
    assert len(jsonl) == 5
    assert [p.id for p in parquet] == [p.id for p in folder] == [p.id for p in jsonl]
    assert [p.prompt_ids for p in parquet] == [p.prompt_ids for p in folder] == [p.prompt_ids for p in jsonl]
    assert all(r.path for p in jsonl for r in p.images) and not any(r.path for p in parquet for r in p.images)
    picture = jsonl[0].images[0].open()
    assert picture.mode == "RGB" and picture.tobytes() == parquet[0].images[0].open().tobytes()


def test_image_tokens_are_never_cut(family, tmp_path):
    name, processor = family
    row = vision_rows(1, tmp_path / "img")[0]
    row["prompt"] = [{"role": "system", "content": "Look closely. " * 20}] + row["prompt"]
    (full,), _ = read_pairs(write_jsonl(tmp_path / "d.jsonl", [row]), processor)
    p = len(full.prompt_ids)
    # keep_start: a prompt that fills max_length is a bad row, as in the text path.
    pairs, bad = read_pairs(tmp_path / "d.jsonl", processor, max_length=p)
    assert not pairs and "no room for a completion (image tokens are never cut)" in bad[0].problem
    # keep_end: the system text's head may go, as long as every image token stays.
    room = p + max(len(full.chosen_ids), len(full.rejected_ids)) - 40
    (cut,), bad = read_pairs(tmp_path / "d.jsonl", processor, max_length=room, truncation="keep_end")
    assert not bad and cut.prompt_ids == full.prompt_ids[-len(cut.prompt_ids):] and len(cut.prompt_ids) < p
    assert cut.prompt_ids.count(processor.image_token_id) == IMAGE_TOKENS[name]
    # ...and a cut that would reach them is a bad row.
    pairs, bad = read_pairs(tmp_path / "d.jsonl", processor, max_length=IMAGE_TOKENS[name] + 8, truncation="keep_end")
    assert not pairs and "into its image tokens" in bad[0].problem


def test_image_refs_hash_encoded_bytes_and_pil_pixels(tmp_path):
    path = tmp_path / "a.png"
    random_image(3).save(path)
    data = path.read_bytes()
    by_path, by_bytes, by_dict = image_refs([str(path), data, {"bytes": None, "path": str(path)}])
    assert by_path.sha256 == by_bytes.sha256 == by_dict.sha256 and by_bytes.path is None
    from_pil, = image_refs([random_image(3)])  # no file behind it: mode, size and pixels
    assert from_pil.sha256 != by_path.sha256 and from_pil.open().tobytes() == by_path.open().tobytes()
    assert image_refs([random_image(3)]) == (from_pil,) and image_refs([random_image(4)]) != (from_pil,)
    assert isinstance(from_pil, ImageRef) and image_refs(None) == ()


def test_tokenize_refuses_bad_options(family, tmp_path):
    _, processor = family
    examples, _ = prepare_vision_examples(vision_rows(1, tmp_path / "img"), processor)
    with pytest.raises(ValueError, match="truncation must be one of"):
        tokenize_vision_examples(examples, processor, 64, "keep_middle")
