"""``prefcache train`` and ``prefcache score`` on vision-language models, through the real precompute: a fresh LoRA
policy on the model that made the cache starts at zero rewards and ln 2; training moves LoRA weights in the
language model only (and in the vision tower with train_vision); a cache made with another processor, or a text
cache, is refused naming the difference; score keeps image references (sha256, path) that SQL joins to the examples.
Two families (tests/vlm_models.py): LLaVA and Idefics3."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil

import polars as pl
import pytest
from conftest import adapter, examples, steps, write_jsonl
from vlm_models import FAMILIES, make_tiny_vlm, vision_rows

import prefcache
from prefcache.cache.store import CacheError
from prefcache.core import schemas

pytestmark = pytest.mark.usefixtures("one_thread")

# A policy equal to the cache's reference gives margin 0 and loss ln 2, to fp32 rounding of batches made up
# differently (precompute's shards against the trainer's micro-batches): measured, the largest per-pair step-0
# margin was 6.7e-7 (LLaVA) and 4.8e-7 (Idefics3), the mean 2.6e-7 / 2.4e-8. 1e-5, the text step-0 test's
# bound, is 15x that, and 4000x below what 2 steps at lr 1e-2 move the margins here (0.06-0.11).
STEP0_TOL = 1e-5


@pytest.fixture(scope="module")
def vlm(tmp_path_factory, tokenizer):
    """Per family: the tiny VLM, 8 vision pairs (one PNG each) and their fp32 cache from ``prefcache.precompute``."""
    out = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(family)
        model = make_tiny_vlm(root / "model", tokenizer, family)
        data = write_jsonl(root / "d.jsonl", vision_rows(8, root / "images"))
        prefcache.precompute(data=str(data), out=str(root / "cache"), model=str(model), quantize="fp32",
                             device="cpu", progress=False)
        out[family] = {"root": root, "model": model, "data": data, "cache": root / "cache"}
    return out


def train(setup, out, **options):
    return prefcache.train(**{"data": str(setup["data"]), "cache": str(setup["cache"]), "model": str(setup["model"]),
                              "out": str(out), "max_steps": 2, "batch_size": 4, "lora_r": 4, "lr": 1e-2,
                              "warmup_steps": 0, "device": "cpu", "progress": False, **options})


def lora_changes(ckpt) -> dict[str, bool]:
    """Each LoRA B matrix of a checkpoint (they start at 0): whether training moved it."""
    return {name: bool(w.abs().max() > 0) for name, w in adapter(ckpt).items() if "lora_B" in name}


def in_vision(name: str) -> bool:
    return any(part in name for part in ("vision_tower", "vision_model", "multi_modal_projector", "connector"))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_step0_is_the_reference_and_lora_trains_the_language_model(vlm, family, tmp_path):
    setup = vlm[family]
    result = train(setup, tmp_path / "run", eval_fraction=0.25)
    first = steps(tmp_path / "run").filter((pl.col("split") == "eval") & (pl.col("step") == 0)).row(0, named=True)
    assert first["loss"] == pytest.approx(math.log(2), abs=STEP0_TOL)
    assert first["rewards_margins"] == pytest.approx(0.0, abs=STEP0_TOL)
    assert abs(result["step0_margin"]) < STEP0_TOL
    step1 = examples(tmp_path / "run").filter((pl.col("split") == "train") & (pl.col("step") == 1))
    assert step1.height == 4 and step1["margin"].abs().max() < STEP0_TOL  # every step-0 pair, not a mean
    assert result["eval"]["rewards_margins"] > 0  # lr 1e-2 for 2 steps: the policy moved
    moved = lora_changes(result["final_checkpoint"])
    assert moved and not [n for n in moved if in_vision(n)]  # no LoRA outside the language model
    assert all(moved.values())

    vision = train(setup, tmp_path / "vision", train_vision=True)
    moved = lora_changes(vision["final_checkpoint"])
    assert [n for n in moved if in_vision(n)] and all(moved.values())  # the tower's LoRA trains too


@pytest.mark.slow
def test_qlora_on_a_4bit_reference_starts_at_the_reference(vlm, tmp_path):
    """QLoRA: the language model in NF4 (the vision tower, projector and head not), its cache from the same 4-bit
    load: step 0 is the reference as in fp32, and the LoRA trains."""
    setup = dict(vlm["llava"], cache=tmp_path / "cache4")
    prefcache.precompute(data=str(setup["data"]), out=str(setup["cache"]), model=str(setup["model"]), quantize="4bit",
                         device="cpu", progress=False)
    result = train(setup, tmp_path / "run", finetune="qlora")
    step1 = examples(tmp_path / "run").filter((pl.col("split") == "train") & (pl.col("step") == 1))
    assert step1.height == 4 and step1["margin"].abs().max() < STEP0_TOL
    moved = lora_changes(result["final_checkpoint"])
    assert moved and all(moved.values()) and not [n for n in moved if in_vision(n)]


def test_a_cache_of_another_processor_or_a_text_cache_is_refused(vlm, tmp_path, tiny_model):
    from prefcache.model.load import load_processor, resolve_model

    setup = vlm["llava"]
    other = shutil.copytree(setup["model"], tmp_path / "bigger")
    processor = load_processor(resolve_model(str(other)))
    processor.image_processor.crop_size = {"height": 96, "width": 96}  # another image size
    processor.save_pretrained(other)
    with pytest.raises(CacheError, match=r"processor crop_size: cache has \{'height': 64, 'width': 64\}"):
        train({**setup, "model": other}, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()

    text_data = write_jsonl(tmp_path / "text.jsonl", [{"prompt": "Hi", "chosen": "Hello.", "rejected": "Go."}])
    prefcache.precompute(data=str(text_data), out=str(tmp_path / "text-cache"), model=str(tiny_model),
                         quantize="fp32", device="cpu", progress=False)
    with pytest.raises(CacheError, match="the cache was made with a text model"):
        train({**setup, "cache": tmp_path / "text-cache"}, tmp_path / "run2")


def test_what_a_vlm_run_does_not_support_is_refused_in_one_line(vlm, tmp_path, tiny_model):
    setup = vlm["llava"]
    for options, said in [({"loss": "kto"}, "unpaired (KTO-style) training of a vision-language model"),
                          ({"fsdp": True}, "--fsdp: sharded training of a vision-language model")]:
        with pytest.raises(ValueError, match=re.escape(said)) as refused:
            train(setup, tmp_path / "run", **options)
        assert "\n" not in str(refused.value)
    with pytest.raises(ValueError, match="--train-vision: .* is a text model"):
        train({**setup, "model": tiny_model}, tmp_path / "run", train_vision=True)


def test_a_text_model_refuses_data_with_images(vlm, tmp_path, tiny_model):
    """Its text path would render the texts and drop the pictures: refused where rows are validated, so precompute
    and train say the same."""
    from prefcache.data.formats import DataFormatError

    said = f"the data has images but {tiny_model} is a text model"
    with pytest.raises(DataFormatError, match=said):
        prefcache.precompute(data=str(vlm["llava"]["data"]), out=str(tmp_path / "cache"), model=str(tiny_model),
                             quantize="fp32", device="cpu", progress=False)
    with pytest.raises(DataFormatError, match=said):
        train({**vlm["llava"], "model": tiny_model}, tmp_path / "run", cache=None, loss="simpo")


@pytest.mark.slow
def test_score_keeps_image_references_that_sql_joins(vlm, tmp_path):
    setup = vlm["llava"]
    run = tmp_path / "run"
    result = train(setup, run, eval_fraction=0.25)
    evals = prefcache.score(checkpoints=[result["final_checkpoint"]], cache=str(setup["cache"]),
                            data=str(setup["data"]), device="cpu", base=True)
    margins = evals.filter(pl.col("metric") == "rewards_margins")
    assert margins["checkpoint"].to_list() == ["base", "step-000002"] and margins["value"][1] > 0
    scored = pl.read_parquet(run / "logs" / "examples-score-*.parquet")
    assert scored.columns == schemas.EXAMPLES.names and scored.height == 16  # the text schema, unchanged
    # The base model made the cache: with its images, each pair's margin is 0.
    assert scored.filter(pl.col("checkpoint") == "base")["margin"].abs().max() < STEP0_TOL
    # The run's last eval and score of its last checkpoint: one code path, the same numbers.
    last = examples(run).filter((pl.col("split") == "eval") & (pl.col("step") == 2)).sort("id")
    same = scored.filter((pl.col("checkpoint") == "step-000002") & pl.col("id").is_in(last["id"].to_list()))
    assert same.sort("id")["margin"].to_list() == pytest.approx(last["margin"].to_list(), abs=1e-5)

    files = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in (setup["root"] / "images").glob("*.png")}
    with prefcache.connect(runs=[run]) as a:
        images = a.sql("SELECT id, position, sha256, path FROM example_images ORDER BY id")
        assert images.height == 8 and images["position"].to_list() == [0] * 8  # train's and score's rows, once
        assert {r["path"]: r["sha256"] for r in images.to_dicts()} == files
        joined = a.sql("SELECT e.id, i.sha256 FROM examples e JOIN example_images i USING (run, id) "
                       "WHERE e.split = 'score'")
        assert joined.height == 16 and set(joined["sha256"]) == set(files.values())


@pytest.mark.slow
def test_an_interrupted_vlm_run_resumes_to_the_uninterrupted_weights(vlm, tmp_path, monkeypatch):
    """--resume of a vision-language run: the processor and the image store are found again, and the weights reach
    those of a run never stopped."""
    import torch
    from conftest import adapter

    import prefcache.training.loop as loop

    setup, opts = vlm["idefics3"], {"max_steps": 4, "batch_size": 2, "save_every": 2, "flush_every": 1}
    train(setup, tmp_path / "whole", **opts)
    real = loop.after_step

    def crash(run, evaluate=None):
        real(run, evaluate)
        if run.step == 3:  # one logged step past the step-2 checkpoint
            raise RuntimeError("killed")

    monkeypatch.setattr(loop, "after_step", crash)
    with pytest.raises(RuntimeError, match="killed"):
        train(setup, tmp_path / "run", **opts)
    monkeypatch.setattr(loop, "after_step", real)
    train(setup, tmp_path / "run", resume=True, **opts)
    a, b = (adapter(tmp_path / r / "checkpoints" / "step-000004") for r in ("run", "whole"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-8)
    assert (tmp_path / "run" / "checkpoints" / "step-000004" / "processor_config.json").exists()
    run_info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_info["resumed_from"].endswith("step-000002")  # resumed, not trained again from the start
