"""Loading the policy: LoRA defaults, QLoRA on NF4, full fine-tuning, starting adapters, GGUF sources."""

from __future__ import annotations

import pytest
import torch

from prefcache.model.load import ModelError, resolve_model
from prefcache.model.policy import load_policy


def logits(model, ids):
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids).logits
    model.train(was)
    return out


@pytest.fixture
def ids():
    return torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))


def test_lora_defaults_all_linear_r16_alpha32_no_dropout_and_equal_to_base(tiny_model, ids):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model, info = load_policy(resolve_model(str(tiny_model)), device="cpu")
    cfg = model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (16, 32, 0.0)
    targets = {name.rsplit(".", 1)[-1] for name in cfg.target_modules}  # peft expands "all-linear" to full names
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # no lm_head
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert info["trainable_params"] == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert model.training and info["quantization"] == "fp32" and info["lora"]["alpha"] == 32
    # LoRA's B starts at zero: the fresh policy is its base model, to the bit
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert torch.equal(logits(model, ids), logits(base, ids))


def test_lora_options_and_gradient_checkpointing(tiny_model):
    model, info = load_policy(resolve_model(str(tiny_model)), device="cpu", lora_r=4, lora_alpha=4, lora_dropout=0.1,
                              lora_target="q_proj,v_proj", gradient_checkpointing=True)
    cfg = model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, set(cfg.target_modules)) == (4, 4, 0.1, {"q_proj", "v_proj"})
    base = model.get_base_model()
    checkpointing = [m.gradient_checkpointing for m in base.modules() if hasattr(m, "gradient_checkpointing")]
    assert checkpointing and all(checkpointing) and base.training  # transformers checkpoints only in train mode
    assert info["gradient_checkpointing"] is True


def test_full_finetune_trains_every_weight_in_fp32(tiny_model):
    model, info = load_policy(resolve_model(str(tiny_model)), finetune="full", device="cpu")
    assert not hasattr(model, "peft_config")
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    assert info["trainable_params"] == info["total_params"] and model.training


def test_qlora_base_is_4bit_nf4_with_trainable_lora(tiny_model):
    import bitsandbytes as bnb

    model, info = load_policy(resolve_model(str(tiny_model)), finetune="qlora", device="cpu")
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, bnb.nn.Linear4bit) and q.base_layer.weight.quant_type == "nf4"
    assert info["quantization"] == "4bit"
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_a_shardable_qlora_base_stores_the_same_4bit_bytes_in_the_compute_dtype(tiny_model, ids):
    """For --fsdp the packed NF4 weights are held as fp32 tensors on CPU (the compute dtype; FSDP shards float
    tensors): the same bytes as the uint8 ones, so the same outputs, bit for bit. A bf16 gather (CUDA
    --bf16) of those fp32 bytes would cast them, destroying them: shard() refuses before any process group."""
    from prefcache.model.kernel import LogProbModule
    from prefcache.model.sharding import shard

    def load(shardable):
        torch.manual_seed(0)
        return load_policy(resolve_model(str(tiny_model)), finetune="qlora", device="cpu", shardable=shardable)[0]

    plain, shardable = load(False), load(True)
    weight = lambda m: m.get_base_model().model.layers[0].mlp.down_proj.base_layer.weight  # noqa: E731
    assert weight(plain).dtype == torch.uint8 and weight(shardable).dtype == torch.float32
    assert torch.equal(weight(shardable).view(torch.uint8).flatten(), weight(plain).flatten())
    assert torch.equal(logits(shardable, ids), logits(plain, ids))
    with pytest.raises(ValueError, match=r"4-bit weights stored as \['torch.float32'\] cannot be gathered in torch.bfloat16"):
        shard(LogProbModule(shardable), shardable, "cuda", bf16=True)


def _first_layer_lora_grads(model, ids) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids).logits.float().pow(2).mean().backward()
    layer = model.get_base_model().model.layers[0]
    return [p.grad.clone() for n, p in layer.named_parameters() if "lora_A" in n]


def test_qlora_gradients_are_the_same_after_an_eval_pass(tiny_model, ids):
    """An eval-mode no-grad forward must not change how a 4-bit layer trains (bitsandbytes' CPU repacking
    would route later forwards through a kernel without backward: no gradient through the base matmuls)."""
    torch.manual_seed(0)
    model, _ = load_policy(resolve_model(str(tiny_model)), finetune="qlora", device="cpu")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # non-zero B: every layer's gradient flows back through the layers above
    before = _first_layer_lora_grads(model, ids)
    logits(model, ids)  # the trainer's step-0 eval
    after = _first_layer_lora_grads(model, ids)
    assert before and all(b.abs().sum() > 0 for b in before)
    for b, a in zip(before, after, strict=True):
        torch.testing.assert_close(a, b)


def _trained_adapter(tiny_model, path):
    torch.manual_seed(1)
    model, _ = load_policy(resolve_model(str(tiny_model)), device="cpu", lora_r=4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # as if trained: the adapter now changes the outputs
    model.save_pretrained(path)
    return model


def test_a_starting_adapter_is_loaded_trainable(tiny_model, tmp_path, ids):
    sft = _trained_adapter(tiny_model, tmp_path / "sft")
    model, info = load_policy(resolve_model(str(tiny_model)), device="cpu", adapter=tmp_path / "sft")
    assert info["adapter"] == str(tmp_path / "sft") and "lora" not in info
    assert model.peft_config["default"].r == 4
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    torch.testing.assert_close(logits(model, ids), logits(sft, ids))


def test_full_finetune_merges_a_starting_adapter(tiny_model, tmp_path, ids):
    sft = _trained_adapter(tiny_model, tmp_path / "sft")
    model, _ = load_policy(resolve_model(str(tiny_model)), finetune="full", device="cpu", adapter=tmp_path / "sft")
    assert not hasattr(model, "peft_config") and all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(logits(model, ids), logits(sft, ids), rtol=1e-4, atol=1e-5)


def test_bad_adapter_folder_is_refused(tiny_model, tmp_path):
    with pytest.raises(ModelError, match="not a PEFT adapter folder"):
        load_policy(resolve_model(str(tiny_model)), device="cpu", adapter=tmp_path)


@pytest.mark.slow
def test_the_embedded_gguf_default_loads_as_a_lora_policy(smol_dir):
    from prefcache.model.load import default_model

    model, info = load_policy(default_model(), device="cpu")
    assert info["model_name"].startswith("SmolLM2-135M-Instruct") and info["quantization"] == "fp32"
    assert 0 < info["trainable_params"] < info["total_params"] / 10
