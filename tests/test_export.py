"""Export: the adapter as saved, or merged into the full-precision base, with a model card."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import preference_rows, write_jsonl

from prefcache.cli import main
from prefcache.export import export
from prefcache.reference.shards import precompute
from prefcache.training.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")  # restored after the module, unlike a bare set_num_threads


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model, one_thread):
    root = tmp_path_factory.mktemp("export")
    data = write_jsonl(root / "d.jsonl", preference_rows(12))
    precompute(data=str(data), out=str(root / "cache"), model=str(tiny_model), max_length=48, quantize="fp32",
               progress=False)
    # A large learning rate: the LoRA B matrices (zero at start) must move for the merge to matter.
    train(data=str(data), cache=str(root / "cache"), model=str(tiny_model), out=str(root / "run"), max_steps=2,
          batch_size=4, lr=5e-2, warmup_steps=0, eval_fraction=0.25, progress=False)
    return {"root": root, "data": data, "run": root / "run", "ckpt": root / "run" / "checkpoints" / "step-000002",
            "model": tiny_model}


def test_adapter_export_has_adapter_tokenizer_and_card(run_dir, tmp_path):
    result = export(run_dir["ckpt"], tmp_path / "adapter")
    files = set(result["files"])
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= files
    assert "trainer_state.pt" not in files and not result["merged"]
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "library_name: peft" in card
    for needle in (str(run_dir["model"]), str(run_dir["data"]), "9 training pairs", "sigmoid, beta 0.1",
                   "| steps | 2 ", "Final train metrics (step 2)", "Final eval metrics (step 2)", "rewards_margins"):
        assert needle in card, needle
    from prefcache.export import cache_fingerprint

    assert f"`{cache_fingerprint(run_dir['root'] / 'cache')}`" in card


def test_merged_model_equals_adapter_on_base(run_dir, tmp_path, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from prefcache.data.pairs import load_dataset_pairs
    from prefcache.model.pairs import pair_logps

    out = tmp_path / "merged"
    result = CliRunner().invoke(main, ["export", str(run_dir["ckpt"]), "--out", str(out), "--merge", "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    assert not (out / "adapter_config.json").exists()
    assert "library_name: transformers" in (out / "README.md").read_text()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # a plain transformers folder
    assert merged.dtype == torch.float32
    base = AutoModelForCausalLM.from_pretrained(run_dir["model"], dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, run_dir["ckpt"]).eval()
    pairs, _, _ = load_dataset_pairs(str(run_dir["data"]), tokenizer, 48, "keep_start")
    with torch.no_grad():
        a = pair_logps(merged, pairs, pad_id=tokenizer.pad_token_id)
        b = pair_logps(with_adapter, pairs, pad_id=tokenizer.pad_token_id)
        with with_adapter.disable_adapter():
            c = pair_logps(with_adapter, pairs, pad_id=tokenizer.pad_token_id)
    assert torch.allclose(a.chosen, b.chosen, atol=1e-4, rtol=0)
    assert torch.allclose(a.rejected, b.rejected, atol=1e-4, rtol=0)
    assert (a.chosen - c.chosen).abs().max() > 1e-3  # the adapter changed something: the test can fail


def test_export_refuses_a_non_empty_out_and_defaults_to_the_base_dtype(run_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(ValueError, match="not empty"):
        export(run_dir["ckpt"], tmp_path / "taken")
    with pytest.raises(ValueError, match="not a prefcache checkpoint"):
        export(run_dir["root"], tmp_path / "nothing")
    result = export(run_dir["ckpt"], tmp_path / "bf", merge=True)
    base = json.loads((run_dir["model"] / "config.json").read_text())
    assert result["dtype"] == {"bfloat16": "bf16", "float16": "fp16"}.get(base.get("dtype") or base.get("torch_dtype"), "fp32")


def test_qlora_merges_into_the_dequantised_base_and_full_runs_export_as_models(run_dir, tmp_path, tokenizer):
    """A QLoRA adapter is merged into the full-precision base (never into 4-bit weights); a full fine-tuning
    checkpoint is a model already, cast to --dtype."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from prefcache.data.pairs import load_dataset_pairs
    from prefcache.model.pairs import pair_logps

    common = {"data": str(run_dir["data"]), "cache": str(run_dir["root"] / "cache"), "model": str(run_dir["model"]),
              "max_steps": 1, "batch_size": 4, "warmup_steps": 0, "progress": False}
    train(out=str(tmp_path / "q"), finetune="qlora", lr=5e-2, **common)
    ckpt = tmp_path / "q" / "checkpoints" / "step-000001"
    export(ckpt, tmp_path / "q-merged", merge=True, dtype="fp32")
    config = json.loads((tmp_path / "q-merged" / "config.json").read_text())
    assert "quantization_config" not in config  # a plain full-precision model
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "q-merged").eval()
    on_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run_dir["model"], dtype=torch.float32),
                                        ckpt).eval()
    pairs, _, _ = load_dataset_pairs(str(run_dir["data"]), tokenizer, 48, "keep_start")
    with torch.no_grad():
        a = pair_logps(merged, pairs, pad_id=tokenizer.pad_token_id)
        b = pair_logps(on_base, pairs, pad_id=tokenizer.pad_token_id)
    assert torch.allclose(a.chosen, b.chosen, atol=1e-4, rtol=0)

    train(out=str(tmp_path / "f"), finetune="full", lr=1e-3, **common)
    result = export(tmp_path / "f" / "checkpoints" / "step-000001", tmp_path / "f-bf16", dtype="bf16")
    assert result["merged"] and result["dtype"] == "bf16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "f-bf16").dtype == torch.bfloat16
    assert "library_name: transformers" in (tmp_path / "f-bf16" / "README.md").read_text()
