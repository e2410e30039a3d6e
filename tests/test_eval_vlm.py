"""``prefcache eval`` on vision-language checkpoints: lm-eval's multimodal backend (hf-multimodal), handed the
loaded model and the checkpoint's processor. A tiny random LLaVA (tests/vlm_models.py) as the base model, a run
with one LoRA checkpoint saved beside its processor, and two local tasks: an image task scored by generation
(exact match against the model's own greedy answer, worked out here with transformers alone) and a text
multiple-choice task (log-likelihoods worked out by hand, as in test_evaluation.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import choice_logliks, write_jsonl
from test_evaluation import _script  # examples/ scripts, loaded as the evaluation tests load them
from vlm_models import FAMILIES, make_tiny_vlm, random_image

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread")

MAX_GEN = 4
# One length for every prompt (the digit is one token): lm-eval pads a batch on the left, and the hand
# computation runs each prompt alone; equal lengths keep the two the same computation.
QUESTIONS = [f"<image>Describe picture {i}." for i in range(4)]
TEXT_DOCS = [("Question: what colour is the sky?", [" blue", " it is a bright and clear blue today", " red sky"]),
             ("Question 2: the cat sat on", [" the mat under the tree by the river", " a dog", " the house"]),
             ("Tell me: which is quick?", [" the quick red fox", " slow", " a river that runs under the blue sky"])]
# An image task is run by generation; the same YAML with multiple_choice is refused (see check_image_tasks).
IMAGE_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: vlm_describe.jsonl
test_split: test
output_type: {output_type}
doc_to_image: !function utils.doc_to_image
doc_to_text: question
doc_to_target: {target}
{extra}generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: {max_gen}
metric_list:
  - metric: {metric}
    aggregation: mean
    higher_is_better: true
"""
UTILS = "from PIL import Image\n\n\ndef doc_to_image(doc):\n    return [Image.open(p).convert('RGB') for p in doc['images']]\n"


@pytest.fixture(scope="module")
def vlm(tmp_path_factory, tokenizer) -> Path:
    return make_tiny_vlm(tmp_path_factory.mktemp("llava"), tokenizer, "llava")


def _models(vlm: Path, adapter: Path | None = None):
    """(model, processor) by transformers and peft alone, not through prefcache."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(vlm, dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    return model, AutoProcessor.from_pretrained(adapter or vlm)


def _greedy(model, processor, image_paths: list[str]) -> list[str]:
    """Each prompt's greedy answer, alone: ``MAX_GEN`` new tokens, decoded without special tokens and cut at the
    first newline, as lm-eval's generate_until does. Each step's top two logits are 1e-4 apart: lm-eval runs
    batches of two, and a row's logits alone and in a batch of two differ by 0 here (measured, both families),
    by fp32 summation order (~1e-6) on another CPU; so lm-eval's batches pick the same tokens."""
    import torch
    from PIL import Image

    answers = []
    for question, path in zip(QUESTIONS, image_paths, strict=True):
        image = Image.open(path).convert("RGB")
        nested = type(processor).__name__ != "LlavaProcessor"  # Idefics3 takes a list of images per text
        inputs = processor(text=[question], images=[[image]] if nested else [image], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_GEN, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=processor.tokenizer.pad_token_id)
        for scores in out.scores:
            top = scores[0].float().topk(2).values
            assert top[0] - top[1] > 1e-4, ("a near tie: choose another seed", float(top[0] - top[1]), question)
        new = out.sequences[0, inputs["input_ids"].shape[1]:]
        answers.append(processor.tokenizer.decode(new, skip_special_tokens=True).split("\n")[0])
    return answers


def _picks(model, tokenizer) -> list[int]:
    """Per text document, the choice with the highest summed log-likelihood after its prompt (nats)."""
    picks = []
    for prompt, choices in TEXT_DOCS:
        lls = choice_logliks(model, tokenizer, prompt, choices)
        assert sorted(lls)[-1] - sorted(lls)[-2] > 1e-3  # clear of float noise
        picks.append(max(range(len(lls)), key=lls.__getitem__))
    return picks


def _vlm_run(root: Path, vlm: Path) -> Path:
    """A run of the VLM: run.json naming it, and one LoRA checkpoint (random, non-zero: it changes the answers)
    saved with the processor beside it, as a VLM run saves it."""
    import torch
    from peft import LoraConfig, get_peft_model

    from prefcache.model.vision import lora_exclude

    model, processor = _models(vlm)
    torch.manual_seed(1)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                            exclude_modules=lora_exclude(model)))
    ckpt = root / "run" / "checkpoints" / "step-000002"
    peft.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    (ckpt / "prefcache.json").write_text(json.dumps({"step": 2}))
    (root / "run" / "run.json").write_text(json.dumps({"config": {"model": str(vlm), "quantize": "fp32"}}))
    return ckpt


make_lm_eval_task = _script("make_lm_eval_task")


def _tasks(folder: Path, images: list[str], targets: list[str], labels: list[int], output_type="generate_until"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "utils.py").write_text(UTILS)
    write_jsonl(folder / "vlm_describe.jsonl", [{"question": q, "images": [p], "answer": t, "label": 0}
                                                for q, p, t in zip(QUESTIONS, images, targets, strict=True)])
    mc = output_type == "multiple_choice"
    (folder / "vlm_describe.yaml").write_text(IMAGE_YAML.format(
        task="vlm_describe", output_type=output_type, target="label" if mc else "answer", max_gen=MAX_GEN,
        extra='doc_to_choice: ["a", "b"]\n' if mc else "", metric="acc" if mc else "exact_match"))
    write_jsonl(folder / "vlm_text.jsonl", [{"prompt": p, "choices": c, "label": g}
                                            for (p, c), g in zip(TEXT_DOCS, labels, strict=True)])
    (folder / "vlm_text.yaml").write_text(make_lm_eval_task.YAML.format(  # the text task users build
        source="TEXT_DOCS", n=len(TEXT_DOCS), task="vlm_text", data_file="vlm_text.jsonl"))
    return folder


def _images(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(len(QUESTIONS)):
        random_image(i, size=(48 + 8 * i, 80 - 8 * i)).save(folder / f"img{i}.png")
        paths.append(str(folder / f"img{i}.png"))
    return paths


@pytest.mark.parametrize("family", FAMILIES)
def test_vlm_checkpoints_run_image_and_text_tasks_through_hf_multimodal(tmp_path, tokenizer, family, monkeypatch):
    """Base model and LoRA checkpoint of a VLM run: the image task's exact match and the text task's acc are
    what the hand computation says for each model, and every image reached the model through hf-multimodal
    (the text backend refuses a task with images outright)."""
    import torch
    from lm_eval.models.hf_vlms import HFMultimodalLM

    from prefcache.evaluation.lmeval import evaluate

    vlm = make_tiny_vlm(tmp_path / family, tokenizer, family)
    ckpt = _vlm_run(tmp_path, vlm)
    images = _images(tmp_path / "images")
    base_model, processor = _models(vlm)
    lora_model, _ = _models(vlm, ckpt)
    answers = {"base": _greedy(base_model, processor, images), ckpt.name: _greedy(lora_model, processor, images)}
    picks = {"base": _picks(base_model, processor.tokenizer), ckpt.name: _picks(lora_model, processor.tokenizer)}
    assert answers["base"] != answers[ckpt.name]  # the adapter is seen in the answers
    del base_model, lora_model
    # Two docs answered as the base model answers, one as the checkpoint does, one as neither.
    targets = [answers["base"][0], answers["base"][1], answers[ckpt.name][2], "no model says this"]
    labels = [picks["base"][0], (picks["base"][1] + 1) % 3, picks["base"][2]]
    tasks = _tasks(tmp_path / "tasks", images, targets, labels)

    seen = []
    generate = HFMultimodalLM._model_multimodal_generate

    def spy(self, inputs, *args, **kwargs):
        seen.append(inputs["pixel_values"].shape)
        return generate(self, inputs, *args, **kwargs)

    monkeypatch.setattr(HFMultimodalLM, "_model_multimodal_generate", spy)
    df = evaluate(checkpoints=[str(ckpt)], tasks="vlm_describe,vlm_text", include_path=[str(tasks)], device="cpu",
                  batch_size=2)
    got = {(r["checkpoint"], r["task"], r["metric"]): r for r in df.iter_rows(named=True)}
    assert {k[:2] for k in got} == {(c, t) for c in ("base", ckpt.name) for t in ("vlm_describe", "vlm_text")}
    for name in ("base", ckpt.name):
        hits = [float(a == t) for a, t in zip(answers[name], targets, strict=True)]
        row = got[(name, "vlm_describe", "exact_match")]
        assert row["n"] == 4 and row["value"] == sum(hits) / 4, (name, answers[name], targets)
        acc = [float(p == g) for p, g in zip(picks[name], labels, strict=True)]
        assert got[(name, "vlm_text", "acc")]["value"] == pytest.approx(sum(acc) / 3, abs=1e-12), name
    assert got[("base", "vlm_describe", "exact_match")]["value"] >= 0.5  # its own two answers at least
    # 4 images per model in batches of 2 (LLaVA's [images, 3, H, W], Idefics3's [rows, images, 3, H, W]), each
    # resized by the processor to the tower's 64x64
    assert [(s[0], s[-3:]) for s in seen] == [(2, torch.Size([3, 64, 64]))] * 4
    assert len(list((tmp_path / "run" / "evals").glob("lm-eval-*.parquet"))) == 2


def test_checkpoint_processor_is_the_checkpoints_own_else_the_base_models(tmp_path, vlm):
    """Saved beside the checkpoint: that processor. Only a tokenizer saved: the base model's processor with the
    checkpoint's tokenizer. Nothing: the base model's. No processor and no base model known: an error that says so."""
    from transformers import AutoProcessor

    from prefcache.evaluation.checkpoints import EvalError, checkpoint_processor
    from prefcache.model.load import resolve_model
    from prefcache.training.rundir import Checkpoint

    source = resolve_model(str(vlm))
    base = len(AutoProcessor.from_pretrained(vlm).tokenizer)
    own = AutoProcessor.from_pretrained(vlm)
    own.tokenizer.add_tokens(["<marker-a>", "<marker-b>"])  # what tells the checkpoint's from the base's
    with_processor, with_tokenizer, bare = (tmp_path / n for n in ("processor", "tokenizer", "bare"))
    own.save_pretrained(with_processor)
    own.tokenizer.save_pretrained(with_tokenizer)
    bare.mkdir()
    ckpt = lambda path: Checkpoint(path.name, 1, path, "adapter")  # noqa: E731

    assert len(checkpoint_processor(ckpt(with_processor), source).tokenizer) == base + 2
    from_base = checkpoint_processor(ckpt(with_tokenizer), source)
    assert len(from_base.tokenizer) == base + 2 and from_base.image_token == "<image>"
    assert len(checkpoint_processor(ckpt(bare), source).tokenizer) == base
    assert len(checkpoint_processor(Checkpoint("base", None, None, "base"), source).tokenizer) == base
    (bare / "config.json").write_text((vlm / "config.json").read_text())  # full weights: their own config
    with pytest.raises(EvalError, match="saved without its processor"):
        checkpoint_processor(Checkpoint("step-000001", 1, bare, "full"), None)


def _no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("prefcache.evaluation.lmeval.load_checkpoint", refuse)


@pytest.mark.parametrize("kind, refusal", [
    ("multiple_choice", r"vlm_describe: image tasks scored by log-likelihood \(multiple_choice\).*generation only"),
    ("audio", r"vlm_describe: audio tasks are not supported"),
], ids=["multiple_choice", "audio"])
def test_image_tasks_hf_multimodal_cannot_run_are_refused_before_any_model_loads(tmp_path, vlm, monkeypatch, kind,
                                                                                  refusal):
    """lm-eval's hf-multimodal raises NotImplementedError on loglikelihood requests with images, and reads no
    audio: a multiple-choice image task, or an audio task, is refused up front, in words that name the limitation."""
    from prefcache.evaluation.lmeval import evaluate
    from prefcache.evaluation.lmeval_tasks import TaskError

    images = _images(tmp_path / "images")
    tasks = _tasks(tmp_path / "tasks", images, ["x"] * 4, [0, 0, 0],
                   output_type="multiple_choice" if kind == "multiple_choice" else "generate_until")
    if kind == "audio":
        spec = tasks / "vlm_describe.yaml"
        spec.write_text(spec.read_text().replace("doc_to_image:", "doc_to_audio:"))
    _no_loading(monkeypatch)
    with pytest.raises(TaskError, match=refusal):
        evaluate(checkpoints=["base"], model=str(vlm), out=str(tmp_path / "out"), tasks="vlm_describe,vlm_text",
                 include_path=[str(tasks)], device="cpu")


def test_image_tasks_on_a_text_model_are_refused_before_any_model_loads(tmp_path, tiny_model, vlm, monkeypatch):
    """A task with images on a text checkpoint: refused, naming the task and the checkpoint; the same text model
    on the text task alone is not refused (it reaches the model loading)."""
    from prefcache.evaluation.checkpoints import EvalError
    from prefcache.evaluation.lmeval import evaluate

    images = _images(tmp_path / "images")
    tasks = _tasks(tmp_path / "tasks", images, ["x"] * 4, [0, 0, 0])
    _no_loading(monkeypatch)
    with pytest.raises(EvalError, match="vlm_describe: tasks with images need a vision-language model, and base is "
                                        "a text model"):
        evaluate(checkpoints=["base"], model=str(tiny_model), out=str(tmp_path / "out"),
                 tasks="vlm_describe,vlm_text", include_path=[str(tasks)], device="cpu")
    with pytest.raises(AssertionError, match="a model was loaded"):
        evaluate(checkpoints=["base"], model=str(tiny_model), out=str(tmp_path / "out"), tasks="vlm_text",
                 include_path=[str(tasks)], device="cpu")
