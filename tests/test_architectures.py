"""The kernel and the step-0 invariant on the architectures users bring: Llama, Qwen2, Qwen3, Mistral,
Gemma-2 (final-logit soft-capping), Gemma-3, Phi-3 and a mixture of experts (Qwen2-MoE), tied and untied
output heads, and a 128k-token vocabulary. Tiny random configs: hidden size 32, two layers."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import preference_rows, write_jsonl
from torch.utils._python_dispatch import TorchDispatchMode

from prefcache.model.kernel import LogProbModule, naive_token_logprobs, router_aux_coef, token_logprobs

COMMON = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 256}


def arch_config(arch: str, vocab: int, tie: bool | None = None, **extra):
    import transformers as tf

    if arch == "llama":
        cfg = tf.LlamaConfig(vocab_size=vocab, **COMMON)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(vocab_size=vocab, **COMMON)
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(vocab_size=vocab, head_dim=8, **COMMON)
    elif arch == "mistral":
        cfg = tf.MistralConfig(vocab_size=vocab, **COMMON)
    elif arch == "gemma2":  # soft-capping at 0.5 squashes these logits hard: a missed cap cannot pass
        cfg = tf.Gemma2Config(vocab_size=vocab, head_dim=8, final_logit_softcapping=0.5, **COMMON)
    elif arch == "gemma3":
        cfg = tf.Gemma3TextConfig(vocab_size=vocab, head_dim=8, **COMMON)
    elif arch == "phi3":
        cfg = tf.Phi3Config(vocab_size=vocab, pad_token_id=0, **COMMON)
    elif arch == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(vocab_size=vocab, moe_intermediate_size=16, shared_expert_intermediate_size=32,
                                num_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02, **COMMON)
    else:
        raise ValueError(arch)
    if tie is not None:
        cfg.tie_word_embeddings = tie
    for key, value in extra.items():
        setattr(cfg, key, value)
    return cfg


ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "qwen2_moe"]


def build(arch: str, vocab: int = 512, tie: bool | None = None, seed: int = 0, **extra):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(arch_config(arch, vocab, tie, **extra), attn_implementation="eager")
    # Random init leaves logits near zero; spread them so the comparison has something to compare.
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 0.5)
    return model.float()


def batch(vocab: int, n: int = 3, t: int = 24, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    attention = torch.ones_like(ids)
    attention[1, t - 7 :] = 0
    completion = torch.zeros_like(ids)
    completion[:, t // 3 :] = 1
    return ids, attention, completion * attention


@pytest.mark.parametrize("arch,tie", [(a, None) for a in ARCHS] + [("llama", True), ("llama", False), ("qwen2", True)])
def test_kernel_equals_naive_values_and_gradients(arch, tie):
    model = build(arch, tie=tie)
    if tie is not None:
        assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tie
    ids, attention, completion = batch(512)
    got = token_logprobs(model, ids, attention, completion, chunk_size=7)
    want = naive_token_logprobs(model, ids, attention, completion)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert (got != 0).sum() == completion[:, 1:].sum()
    params = [p for n, p in model.named_parameters() if "embed" in n or "lm_head" in n or "layers.0." in n]
    g_got = torch.autograd.grad(got.sum(), params)
    g_want = torch.autograd.grad(naive_token_logprobs(model, ids, attention, completion).sum(), params)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_softcapping_is_applied():
    """Gemma-2's final-logit cap changes the values: the kernel agrees with the capped model, not the raw head."""
    capped = build("gemma2")
    raw = build("gemma2", final_logit_softcapping=None)
    ids, attention, completion = batch(512)
    with torch.no_grad():
        a = token_logprobs(capped, ids, attention, completion)
        b = token_logprobs(raw, ids, attention, completion)
    assert (a - b).abs().max() > 0.1


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op creates while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_memory_stays_flat_in_a_128k_vocabulary():
    """With a 128,256-token vocabulary (Llama-3's), forward and backward never make an [N, T, V] tensor:
    the largest is one chunk of logits (or the head's own [V, H] gradient), whatever N x T is."""
    vocab, chunk = 128_256, 16
    model = build("llama", vocab=vocab, num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    ids, attention, completion = batch(vocab, n=4, t=64)
    with LargestTensor() as kernel:
        token_logprobs(model, ids, attention, completion, chunk_size=chunk).sum().backward()
    model.zero_grad()
    with LargestTensor() as naive:
        naive_token_logprobs(model, ids, attention, completion).sum().backward()
    bound = max(chunk, model.config.hidden_size) * vocab
    assert kernel.largest <= bound < naive.largest
    assert naive.largest >= ids.numel() * vocab / 2  # the naive path does hold [N, T, V]: the test can tell


def save_arch(path, arch: str, tokenizer, **extra):
    model = build(arch, vocab=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("arch", ARCHS)
def test_step0_invariant_through_precompute_and_train(arch, tmp_path, tokenizer):
    """Cache made by the model, fresh LoRA on it: the step-0 eval has loss ln 2 and zero margins. For the
    mixture of experts the router's load-balancing loss is logged (aux_loss) and trained, weighted by its
    own coefficient."""
    import polars as pl

    from prefcache.reference.shards import precompute
    from prefcache.training.loop import train

    folder = save_arch(tmp_path / arch, arch, tokenizer)
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(8))
    precompute(data=str(data), out=str(tmp_path / "cache"), model=str(folder), quantize="fp32", max_length=48,
               device="cpu", progress=False)
    train(data=str(data), cache=str(tmp_path / "cache"), out=str(tmp_path / "run"), model=str(folder), max_steps=1,
          batch_size=4, lora_r=4, eval_fraction=0.5, device="cpu", progress=False)
    steps = pl.read_parquet(tmp_path / "run" / "logs" / "steps-*.parquet")
    first = steps.filter((pl.col("split") == "eval") & (pl.col("step") == 0)).row(0, named=True)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["rewards_margins"] == pytest.approx(0.0, abs=1e-5)
    aux = steps.filter(pl.col("split") == "train")["aux_loss"].to_list()
    if arch == "qwen2_moe":
        assert aux[0] is not None and aux[0] > 0
    else:
        assert aux == [None]


def test_router_aux_loss_is_the_models_own():
    """The MoE's load-balancing loss from the kernel equals what its own forward returns, and only MoE has one."""
    model = build("qwen2_moe")
    assert router_aux_coef(model) == 0.02 and router_aux_coef(build("llama")) is None
    ids, attention, completion = batch(512)
    module = LogProbModule(model, router_aux=True)
    module(ids, attention, completion)
    own = model(input_ids=ids, attention_mask=attention, output_router_logits=True).aux_loss
    torch.testing.assert_close(module.aux_loss, own)
    with torch.no_grad():
        module(ids, attention, completion)
    assert module.aux_loss is None  # scoring and eval: no auxiliary loss


def test_a_router_aux_coefficient_of_0_turns_the_router_loss_off(tmp_path, tokenizer):
    """`router_aux_loss_coef: 0` in a mixture of experts' config: no router loss is computed, trained or logged
    (the steps log's aux_loss is null, as for a dense model)."""
    import polars as pl

    from prefcache.reference.shards import precompute
    from prefcache.training.loop import train

    model = build("qwen2_moe", router_aux_loss_coef=0.0)
    assert router_aux_coef(model) is None
    module = LogProbModule(model, router_aux=True)
    module(*batch(512))
    assert module.aux_loss is None
    folder = save_arch(tmp_path / "moe", "qwen2_moe", tokenizer, router_aux_loss_coef=0.0)
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(8))
    precompute(data=str(data), out=str(tmp_path / "cache"), model=str(folder), quantize="fp32", max_length=48,
               device="cpu", progress=False)
    train(data=str(data), cache=str(tmp_path / "cache"), out=str(tmp_path / "run"), model=str(folder), max_steps=1,
          batch_size=4, lora_r=4, device="cpu", progress=False)
    steps = pl.read_parquet(tmp_path / "run" / "logs" / "steps-*.parquet")
    assert steps["aux_loss"].to_list() == [None] and steps["loss"][0] == pytest.approx(math.log(2), abs=1e-5)
