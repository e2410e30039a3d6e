"""Prefix sharing: packed [prompt | chosen | rejected] rows give the two-sequence numbers, values and gradients."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import tiny_lm

from prefcache.data.pairs import TokenizedPair
from prefcache.model.packing import block_mask, group_by_prompt, pack, sharing_problem
from prefcache.model.pairs import pair_logps

VOCAB = 301


def tiny(arch: str, attn: str = "sdpa", **extra):
    return tiny_lm(arch, VOCAB, attn=attn, **extra)


def pairs(n=5, seed=1, prompt=(1, 30), answer=(1, 12)):
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: torch.randint(1, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()  # noqa: E731
    return [TokenizedPair(f"p{i}", r(*prompt), r(*answer), r(*answer), False, False) for i in range(n)]


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa")])
def test_packed_values_equal_two_sequences(arch, attn):
    model = tiny(arch, attn).eval()
    assert sharing_problem(model) is None
    batch = pairs()
    with torch.no_grad():
        shared = pair_logps(model, batch, pad_id=0, prefix_sharing=True, chunk_size=7)
        plain = pair_logps(model, batch, pad_id=0, prefix_sharing=False)
    for field in ("chosen", "rejected", "chosen_prefix", "rejected_prefix", "chosen_tokens", "rejected_tokens"):
        torch.testing.assert_close(getattr(shared, field), getattr(plain, field), atol=1e-4, rtol=0, msg=field)
    assert torch.all(shared.chosen < 0) and torch.all(shared.rejected < 0)
    # The prompt is computed once: fewer real tokens than two sequences per pair.
    assert shared.n_tokens == plain.n_tokens - sum(len(p.prompt_ids) for p in batch)


def test_the_mask_is_applied():
    """Changing the chosen completion must not move the rejected log-probs of a packed row (nor the reverse)."""
    model = tiny("llama").eval()
    a = pairs(3)
    b = [TokenizedPair(p.id, p.prompt_ids, [7] * 9, p.rejected_ids, False, False) for p in a]
    with torch.no_grad():
        la, lb = (pair_logps(model, x, pad_id=0, prefix_sharing=True) for x in (a, b))
    torch.testing.assert_close(la.rejected, lb.rejected, atol=1e-5, rtol=0)
    assert (la.chosen - lb.chosen).abs().min() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_gradients_equal_two_sequences(arch):
    from peft import LoraConfig, get_peft_model

    batch = pairs(4, seed=3)
    grads = []
    for sharing in (True, False):
        torch.manual_seed(5)
        model = get_peft_model(tiny(arch), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        model.train()
        out = pair_logps(model, batch, pad_id=0, prefix_sharing=sharing, chunk_size=5)
        (out.chosen.sum() - 0.5 * out.rejected.sum() + 0.1 * out.chosen_prefix.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.fixture
def fresh_warnings(monkeypatch):
    """The fallback is said once per process and reason: start this test with nothing said yet."""
    import prefcache.model.packing as packing

    monkeypatch.setattr(packing, "_warned", set())


def test_a_model_that_cannot_take_the_mask_falls_back_and_says_so_once(caplog, fresh_warnings):
    model = tiny("qwen2", use_sliding_window=True, sliding_window=4).eval()
    assert "sliding-window" in sharing_problem(model)
    batch = pairs(3)
    with caplog.at_level(logging.WARNING, logger="prefcache"), torch.no_grad():
        shared = pair_logps(model, batch, pad_id=0, prefix_sharing=True)
        pair_logps(model, batch, pad_id=0, prefix_sharing=True)
        plain = pair_logps(model, batch, pad_id=0, prefix_sharing=False)
    lines = [r.getMessage() for r in caplog.records if "prefix sharing off" in r.getMessage()]
    assert len(lines) == 1 and len(lines[0].splitlines()) == 1 and "sliding-window" in lines[0], lines
    torch.testing.assert_close(shared.chosen, plain.chosen, atol=0, rtol=0)
    assert shared.n_tokens == plain.n_tokens


def test_block_mask_and_positions():
    packed = pack([([5, 6], [[7, 8], [9]]), ([5], [[4]])], pad_id=0)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 4, 0, 0, 0]]
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 2]  # the second completion restarts after the prompt
    assert packed.source[0].tolist()[2:] == [1, 2, 1]  # first tokens of completions: from the prompt's last token
    m = block_mask(packed.segments)[0, 0].int().tolist()
    assert m[4] == [1, 1, 0, 0, 1]  # the rejected token sees the prompt and itself, not the chosen tokens
    assert m[3] == [1, 1, 1, 1, 0]
    additive = block_mask(packed.segments, torch.float32)
    assert additive[0, 0, 4, 2] == torch.finfo(torch.float32).min and additive[0, 0, 4, 1] == 0
    assert packed.n_tokens == 7


def test_group_by_prompt_splits_long_groups():
    seqs = [([1, 2, 3, 4], 2), ([1, 2, 5], 2), ([1, 2, 6, 6, 6], 2), ([9, 3], 1)]
    rows = group_by_prompt(seqs, max_row=6)
    assert rows == [([1, 2], [[3, 4], [5]], ()), ([1, 2], [[6, 6, 6]], ()), ([9], [[3]], ())]


def test_group_by_prompt_keeps_prompts_with_other_images_apart():
    """The same prompt tokens with other pictures behind their image tokens are two prompts."""
    seqs = [([1, 2, 3], 2), ([1, 2, 4], 2), ([1, 2, 5], 2)]
    rows = group_by_prompt(seqs, max_row=10, tags=[("a",), ("b",), ("a",)])
    assert rows == [([1, 2], [[3], [5]], ("a",)), ([1, 2], [[4]], ("b",))]


@pytest.mark.parametrize("impl", ["flash_attention_2", "flex_attention"])
def test_flash_and_flex_attention_fall_back_to_two_sequences_with_one_line(caplog, fresh_warnings, impl):
    """FlashAttention-2 and flex-attention do not apply the packed rows' dense block mask: prefix sharing is
    turned off, said in one warning line naming the implementation, once however many batches ask."""
    from prefcache.model.packing import resolve_sharing

    model = tiny("llama")
    model.config._attn_implementation = impl  # only the name is read: neither kernel needs to be installed
    with caplog.at_level(logging.WARNING, logger="prefcache"):
        assert [resolve_sharing(model, True) for _ in range(3)] == [False] * 3
        assert resolve_sharing(tiny("llama"), True) is True  # sdpa packs, silently
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and len(lines[0].splitlines()) == 1, lines
    assert lines[0].startswith("prefix sharing off, two sequences per pair instead") and repr(impl) in lines[0]
