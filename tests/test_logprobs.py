"""The chunked kernel equals the naive full-logits computation, in values and in gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_lm

from prefcache.model.kernel import LogProbModule, naive_token_logprobs, token_logprobs


def batch(vocab=301, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 24), generator=g)
    attention = torch.ones_like(ids)
    attention[1, 17:] = 0  # right padding
    attention[2, 9:] = 0
    completion = torch.zeros_like(ids)
    completion[0, 10:] = 1
    completion[1, 5:] = 1
    completion[2, 3:] = 1
    return ids, attention, completion * attention


def float64_reference(model, ids, attention, completion):
    """Log-probs from float64 logits: the ground truth both fp32 paths are judged against."""
    logits = model(input_ids=ids, attention_mask=attention).logits.double()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(lp * completion[:, 1:], (1, 0))


@pytest.mark.parametrize("chunk", [1, 5, 64, 4096])
def test_values_match_naive(chunk):
    model = tiny_lm()
    ids, attention, completion = batch()
    with torch.no_grad():
        fast = token_logprobs(model, ids, attention, completion, chunk_size=chunk)
        naive = naive_token_logprobs(model, ids, attention, completion)
        exact = float64_reference(model, ids, attention, completion)
    assert fast.dtype == torch.float32 and fast.shape == ids.shape
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.double(), exact, atol=1e-5, rtol=0)
    # Only completion positions carry values, and every one of them is a log-prob (< 0).
    assert torch.all(fast[completion == 0] == 0)
    assert torch.all(fast[completion == 1] < 0)
    torch.testing.assert_close(fast.sum(-1), naive.sum(-1), atol=1e-5, rtol=0)


def test_gradients_match_naive():
    ids, attention, completion = batch()
    grads = []
    for fn in (lambda m: token_logprobs(m, ids, attention, completion, chunk_size=7),
               lambda m: naive_token_logprobs(m, ids, attention, completion)):
        model = tiny_lm()
        weights = torch.linspace(-1, 1, ids.shape[0])  # a loss that weighs sequences differently
        (fn(model).sum(-1) * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_checkpointed_chunks_keep_gradients_exact():
    ids, attention, completion = batch()
    out = []
    for ckpt in (True, False):
        model = tiny_lm()
        token_logprobs(model, ids, attention, completion, chunk_size=4, checkpoint=ckpt).sum().backward()
        out.append(model.lm_head.weight.grad.clone())
    torch.testing.assert_close(out[0], out[1])


def test_peft_wrapped_model_uses_the_adapter():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_lm(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids, attention, completion = batch()
    with torch.no_grad():
        fast = token_logprobs(model, ids, attention, completion)
        naive = naive_token_logprobs(model, ids, attention, completion)
        with model.disable_adapter():
            base = token_logprobs(model, ids, attention, completion)
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=0)
    assert (fast - base).abs().max() > 1e-4  # the adapter changed the values: it was really applied


def test_module_wrapper_matches_function():
    model = tiny_lm()
    ids, attention, completion = batch()
    with torch.no_grad():
        torch.testing.assert_close(LogProbModule(model)(ids, attention, completion),
                                   token_logprobs(model, ids, attention, completion))


def test_no_completion_tokens_gives_zeros():
    model = tiny_lm()
    ids, attention, _ = batch()
    with torch.no_grad():
        out = token_logprobs(model, ids, attention, torch.zeros_like(ids))
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("chunk", [5, 4096])
def test_log_sum_sq_probs_for_wpo(chunk):
    """with_sq: log Σ_v p(v)² per completion position (float64 ground truth), no gradient, and the
    log-probs and their gradients unchanged."""
    model = tiny_lm()
    ids, attention, completion = batch()
    logits = model(input_ids=ids, attention_mask=attention).logits.double()
    exact = torch.logsumexp(2 * torch.log_softmax(logits[:, :-1], -1), -1)
    exact = torch.nn.functional.pad(exact * completion[:, 1:], (1, 0)).detach()
    logps, sq = token_logprobs(model, ids, attention, completion, chunk_size=chunk, with_sq=True)
    torch.testing.assert_close(sq.double(), exact, atol=1e-5, rtol=0)
    assert not sq.requires_grad and torch.all(sq[completion == 0] == 0)
    assert torch.all(sq[completion == 1] <= 0)  # Σ p² <= 1
    naive_logps, naive_sq = naive_token_logprobs(model, ids, attention, completion, with_sq=True)
    torch.testing.assert_close(sq, naive_sq, atol=1e-5, rtol=0)
    logps.sum().backward()
    with_sq_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    token_logprobs(model, ids, attention, completion, chunk_size=chunk).sum().backward()
    torch.testing.assert_close(with_sq_grad, model.lm_head.weight.grad)


@pytest.mark.gpu
def test_cuda_values_and_gradients_match_cpu():
    ids, attention, completion = batch()
    cpu = token_logprobs(tiny_lm(), ids, attention, completion, chunk_size=5)
    model = tiny_lm().cuda()  # the same seed: the same weights
    args = [t.cuda() for t in (ids, attention, completion)]
    gpu = token_logprobs(model, *args, chunk_size=5)
    torch.testing.assert_close(gpu.detach().cpu(), cpu.detach(), atol=1e-4, rtol=0)
    gpu.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):  # the trainer's bf16 path
        mixed = token_logprobs(model, *args, chunk_size=5)
    assert mixed.dtype == torch.float32  # each head chunk is upcast before the log-softmax
    assert torch.all(mixed[args[2] == 1] < 0)
    torch.testing.assert_close(mixed.cpu(), cpu.detach(), atol=0.15, rtol=0)


def test_pair_sums_by_hand():
    from prefcache.model.kernel import pair_sums

    # pair 0: chosen tokens at 1..3, rejected at 2..3; pair 1: chosen at 0, rejected at 0..2
    tok_c = torch.tensor([[9.0, -1.0, -2.0, -3.0], [-0.5, 9.0, 9.0, 9.0]], dtype=torch.float64)
    tok_r = torch.tensor([[9.0, 9.0, -4.0, -5.0], [-1.5, -2.5, -3.5, 9.0]], dtype=torch.float64)
    mask_c = torch.tensor([[0, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    mask_r = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    (tc, tr), (pc, pr), (nc, nr) = pair_sums((tok_c, mask_c), (tok_r, mask_r))
    assert tc.tolist() == [-6.0, -0.5] and tr.tolist() == [-9.0, -7.5]
    assert pc.tolist() == [-3.0, -0.5] and pr.tolist() == [-9.0, -1.5]  # the first min(n_c, n_r) tokens
    assert nc.tolist() == [3, 1] and nr.tolist() == [2, 3]
    assert tc.dtype == torch.float64


def test_collate():
    import torch

    from prefcache.model.kernel import collate

    input_ids, attention, completion = collate([[5, 6, 7, 8], [9, 10]], [2, 1], pad_id=0)
    assert torch.equal(input_ids, torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]]))
    assert torch.equal(attention, torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    assert torch.equal(completion, torch.tensor([[0, 0, 1, 1], [0, 1, 0, 0]]))
    assert input_ids.dtype == torch.long
    with pytest.raises(ValueError, match="completion start 3 outside 0..2"):
        collate([[1, 2]], [3], pad_id=0)
