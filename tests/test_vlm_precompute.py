"""``prefcache precompute`` on vision-language models: the cache of vision pairs equals the naive full-logits
computation with the images, packed and unpacked agree, ids cover the images, the cache records the processor
(and refuses another one, or a text model's cache, naming what differs), and ``verify`` checks the images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_jsonl
from vlm_models import FAMILIES, make_tiny_vlm, random_image, vision_rows

from prefcache.cache.store import CacheError, read_cache, read_metadata
from prefcache.data.vision_pairs import iter_vision_tokenized_blocks
from prefcache.model.load import load_model, load_processor, resolve_model
from prefcache.reference.shards import precompute, verify_cache

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory, tokenizer):
    return {f: make_tiny_vlm(tmp_path_factory.mktemp(f), tokenizer, f) for f in FAMILIES}


@pytest.fixture
def data(tmp_path):
    """Six vision pairs, and a seventh with the first one's texts and another picture."""
    rows = vision_rows(6, tmp_path / "images")
    other = tmp_path / "images" / "other.png"
    random_image(99).save(other)
    rows.append({**rows[0], "images": [str(other)]})
    return write_jsonl(tmp_path / "vision.jsonl", rows)


def run(data, out, model, **options):
    return precompute(data=str(data), out=str(out), model=str(model), quantize="fp32", progress=False,
                      batch_size=3, **options)


def naive_logps(model_dir, data, max_length=1024) -> dict[str, tuple[float, float]]:
    """id -> (chosen, rejected) summed log-probs from ``model(**processor(text, images)).logits`` spelled out: the
    full processor call on the rendered prompt, one sequence at a time, fp32."""
    source = resolve_model(str(model_dir))
    processor = load_processor(source)
    model, _ = load_model(source, quantize="fp32", device="cpu")
    out = {}
    for pairs, _, examples in iter_vision_tokenized_blocks(data, processor, max_length):
        for pair, ex in zip(pairs, examples, strict=True):
            images = [r.open() for r in ex.images]
            inputs = processor(text=[ex.prompt], images=[images], add_special_tokens=not ex.conversational,
                               return_tensors="pt")
            assert inputs["input_ids"][0].tolist() == pair.prompt_ids
            pixels = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
            sums = []
            for completion in (pair.chosen_ids, pair.rejected_ids):
                ids = torch.tensor([pair.prompt_ids + completion])
                with torch.no_grad():
                    logits = model(input_ids=ids, **pixels).logits.float()
                lp = torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
                sums.append(float(lp[len(pair.prompt_ids) - 1 :].sum()))
            out[pair.id] = tuple(sums)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_the_cache_equals_the_naive_computation_packed_or_not(vlm_dirs, data, tmp_path, family):
    shared = run(data, tmp_path / "shared", vlm_dirs[family])
    run(data, tmp_path / "plain", vlm_dirs[family], prefix_sharing=False)
    assert shared["scored"] == 7 and not shared["problems"]
    packed = read_cache(tmp_path / "shared").to_pandas().set_index("id")
    plain = read_cache(tmp_path / "plain").to_pandas().set_index("id")
    assert read_metadata(tmp_path / "shared")["prefix_sharing"] is True
    naive = naive_logps(vlm_dirs[family], data)
    assert set(packed.index) == set(plain.index) == set(naive)
    for side, k in (("chosen_logps", 0), ("rejected_logps", 1)):
        want = np.array([naive[i][k] for i in packed.index])
        assert np.abs(packed[side].to_numpy() - want).max() <= 1e-4  # the bound, per summed sequence
        assert np.abs(plain.loc[packed.index, side].to_numpy() - want).max() <= 1e-4
    # The seventh pair: the first one's texts and tokens with another picture: another id, other values.
    same_text = packed.groupby(["prompt_tokens", "chosen_tokens", "rejected_tokens"]).filter(lambda g: len(g) > 1)
    assert len(same_text) >= 2 and same_text["chosen_logps"].nunique() == len(same_text)


def test_the_cache_records_the_processor_and_refuses_another(vlm_dirs, data, tmp_path):
    model = vlm_dirs["llava"]
    run(data, tmp_path / "cache", model)
    meta = read_metadata(tmp_path / "cache")
    assert len(meta["processor_fingerprint"]) == 16 and meta["processor_settings"]["processor"] == "LlavaProcessor"
    other = tmp_path / "other-model"
    shutil.copytree(model, other)
    config = other / "processor_config.json"
    if not config.exists() or "image_processor" not in json.loads(config.read_text()):
        config = other / "preprocessor_config.json"
    settings = json.loads(config.read_text())
    images = settings.get("image_processor", settings)
    images["image_mean"] = [0.5, 0.5, 0.5]  # other pixels, the same image tokens
    config.write_text(json.dumps(settings))
    with pytest.raises(CacheError, match=r"processor image_mean: cache has \[0\.48"):
        run(data, tmp_path / "cache", other)


def test_a_text_cache_never_matches_a_vision_run(vlm_dirs, data, tiny_model, tmp_path):
    text = write_jsonl(tmp_path / "text.jsonl", [{"prompt": "Hi", "chosen": " yes", "rejected": " no"}])
    precompute(data=str(text), out=str(tmp_path / "cache"), model=str(tiny_model), progress=False)
    with pytest.raises(CacheError, match="made with a text model"):
        run(data, tmp_path / "cache", vlm_dirs["llava"])


def test_verify_checks_the_images(vlm_dirs, data, tmp_path):
    cache = tmp_path / "cache"
    run(data, cache, vlm_dirs["idefics3"])
    assert verify_cache(str(cache), str(data))["problems"] == []
    lines = data.read_text().splitlines()
    random_image(1234).save(json.loads(lines[2])["images"][0])  # another picture under the same file name
    Path(json.loads(lines[4])["images"][0]).unlink()
    problems = verify_cache(str(cache), str(data))["problems"]
    assert any("line 5" in p and "no such image file" in p for p in problems), problems
    # The changed picture makes line 3 another pair (its id covers the image): one the cache does not hold.
    assert any(p.startswith("1 of 6 ids of the data are not cached") for p in problems), problems


def test_4bit_reference_and_refusals(vlm_dirs, data, tmp_path):
    four = precompute(data=str(data), out=str(tmp_path / "q"), model=str(vlm_dirs["llava"]), quantize="4bit",
                      progress=False)
    assert four["scored"] == 7 and read_metadata(tmp_path / "q")["quantization"] == "4bit"
    assert np.isfinite(pq.read_table(next((tmp_path / "q").glob("part-*.parquet")))["chosen_logps"].to_numpy()).all()
    with pytest.raises(ValueError, match="unpaired"):
        run(data, tmp_path / "u", vlm_dirs["llava"], unpaired=True)
    with pytest.raises(ValueError, match="fsdp"):
        run(data, tmp_path / "f", vlm_dirs["llava"], fsdp=True)


def test_a_text_cache_keeps_its_identity():
    """The processor key is absent from a text cache's identity, so text caches and resumed runs are as they were."""
    import hashlib

    from prefcache.cache.store import COMPAT_KEYS, identity

    meta = {"model_fingerprint": "m", "tokenizer_fingerprint": "t", "max_length": 64}
    before = [k for k in COMPAT_KEYS if k != "processor_fingerprint"]
    digest = hashlib.sha256(json.dumps({k: meta.get(k) for k in before}, sort_keys=True).encode()).hexdigest()[:16]
    assert identity(meta) == digest != identity(meta | {"processor_fingerprint": "p"})


def test_a_hub_vision_model_id_offline(vlm_dirs, data, tmp_path, monkeypatch):
    """A VLM named by its Hub id: the processor and the model come from the cached snapshot, through
    transformers' own loading (AutoProcessor, AutoModelForImageTextToText), offline."""
    from test_hub import COMMIT, lay_out

    lay_out(tmp_path / "hub", "org/tiny-vlm", vlm_dirs["idefics3"])
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = precompute(data=str(data), out=str(tmp_path / "cache"), model="org/tiny-vlm", quantize="fp32",
                     progress=False)
    meta = read_metadata(tmp_path / "cache")
    assert out["scored"] == 7 and meta["model_id"] == "org/tiny-vlm" and meta["model_revision"] == COMMIT
    assert meta["processor_settings"]["processor"] == "Idefics3Processor"
