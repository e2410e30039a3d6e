"""Vision-language models on the model side: loading, the kernel with image tensors (values and LoRA gradients
equal the naive full-logits computation), prefix sharing with the image encoded once per pair, and LoRA that
stays in the language model unless the vision tower is asked for. Two families (tests/vlm_models.py): LLaVA
(CLIP tower + projector, 64 image tokens) and Idefics3 (SigLIP tower + pixel shuffle, pixel_attention_mask)."""

from __future__ import annotations

import logging

import pytest
import torch
from vlm_models import FAMILIES, make_tiny_vlm, random_image

from prefcache.data.tokens import TokenizedPair
from prefcache.model.kernel import LogProbModule, naive_token_logprobs, token_logprobs
from prefcache.model.load import load_model, load_processor, resolve_model
from prefcache.model.pairs import pair_logps
from prefcache.model.vision import is_vision_model, processor_fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = ["What is in the picture?", "Describe the colours, please, in a few words."]
ANSWERS = [("A red cat on a mat.", "The blue dog runs away from the house fast."),
           ("Green noise.", "Noise, mostly grey and some pink dots everywhere.")]


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory, tokenizer):
    return {f: make_tiny_vlm(tmp_path_factory.mktemp(f), tokenizer, f) for f in FAMILIES}


def load(vlm_dirs, family):
    source = resolve_model(str(vlm_dirs[family]))
    model, info = load_model(source, quantize="fp32", device="cpu")
    return model, load_processor(source), info


def prompts(processor, family, n=2, seed=0):
    """(prompt ids per row, with the image tokens; the processor's image tensors of the n prompts)."""
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                          "text": q}]}],
                                           add_generation_prompt=True) for q in QUESTIONS[:n]]
    images = [random_image(seed + i, size=(48 + 16 * i, 80 - 8 * i)) for i in range(n)]
    out = processor(images=[[im] for im in images] if family == "idefics3" else images, text=texts,
                    return_tensors="pt", padding=True)
    ids = [row[mask.bool()].tolist() for row, mask in zip(out["input_ids"], out["attention_mask"], strict=True)]
    return ids, {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask")}


def vlm_pairs(processor, family, n=2, seed=0):
    ids, vision = prompts(processor, family, n, seed)
    tok = processor.tokenizer
    enc = lambda text: tok(text + "<|im_end|>", add_special_tokens=False)["input_ids"]  # noqa: E731
    pairs = [TokenizedPair(f"p{i}", ids[i], enc(ANSWERS[i][0]), enc(ANSWERS[i][1]), False, False) for i in range(n)]
    return pairs, vision


def batch(processor, family):
    """[2, T] right-padded prompt + answer rows (different lengths), their completion masks and image tensors."""
    pairs, vision = vlm_pairs(processor, family)
    seqs = [p.prompt_ids + p.chosen_ids for p in pairs]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), processor.tokenizer.pad_token_id)
    attention, completion = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (p, s) in enumerate(zip(pairs, seqs, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        attention[i, : len(s)] = 1
        completion[i, len(p.prompt_ids) : len(s)] = 1
    assert attention[:, -1].tolist().count(0) == 1  # one row padded on the right
    return ids, attention, completion, vision


def full_logits_reference(model, ids, attention, completion, vision):
    """The naive computation spelled out: ``model(**inputs).logits`` -> log_softmax -> gather (fp32)."""
    logits = model(input_ids=ids, attention_mask=attention, **vision).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(lp * completion[:, 1:], (1, 0))


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_as_a_vision_language_model_with_its_processor(vlm_dirs, family):
    model, processor, info = load(vlm_dirs, family)
    assert is_vision_model(model.config) and info["vision"] and info["quantization"] == "fp32"
    assert type(model).__name__.endswith("ForConditionalGeneration") and not model.training
    assert processor.tokenizer.pad_token_id is not None
    digest, settings = processor_fingerprint(processor)
    assert len(digest) == 16 and processor_fingerprint(load_processor(resolve_model(str(vlm_dirs[family]))))[0] == digest
    assert settings["processor.image_token"] == "<image>" and settings["image_mean"]
    assert ("processor.image_seq_len" in settings) == (family == "idefics3")
    assert ("processor.patch_size" in settings) == (family == "llava")
    processor.image_processor.image_mean = [0.4, 0.4, 0.4]  # other pixels: another fingerprint
    assert processor_fingerprint(processor)[0] != digest


def test_a_text_model_is_not_a_vision_model(tiny_model):
    from transformers import AutoConfig

    assert not is_vision_model(AutoConfig.from_pretrained(tiny_model))


@pytest.mark.parametrize("family", FAMILIES)
def test_4bit_keeps_the_vision_tower_and_projector_unquantized(vlm_dirs, family):
    model, _ = load_model(resolve_model(str(vlm_dirs[family])), quantize="4bit", device="cpu")
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if type(m).__name__ in ("Linear", "Linear4bit")}
    language = model.get_decoder()
    inside = {name for name, m in model.named_modules() if any(m is x for x in language.modules())}
    assert {k for n, k in kinds.items() if n in inside} == {"Linear4bit"}
    assert {k for n, k in kinds.items() if n not in inside} == {"Linear"}  # tower, projector, output head


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunk", [3, 4096])
def test_values_match_the_full_logits_computation(vlm_dirs, family, chunk):
    model, processor, _ = load(vlm_dirs, family)
    ids, attention, completion, vision = batch(processor, family)
    with torch.no_grad():
        fast = token_logprobs(model, ids, attention, completion, chunk_size=chunk, vision=vision)
        naive = naive_token_logprobs(model, ids, attention, completion, vision=vision)
        spelled = full_logits_reference(model, ids, attention, completion, vision)
        module = LogProbModule(model, chunk_size=chunk)(ids, attention, completion, vision=vision)
        text_only = token_logprobs(model, ids, attention, completion, chunk_size=chunk)
    # fp32 noise: the chunked head and the full-logits path sum in different orders: measured <= 9.6e-7 per token
    # (one ulp at ~10 nats), and 0 on the summed sequences here.
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast, spelled, atol=1e-5, rtol=0)
    assert torch.equal(module, fast)
    assert torch.all(fast[completion == 0] == 0) and torch.all(fast[completion == 1] < 0)
    # The images matter: the same rows without their features give other numbers.
    assert (text_only - fast).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_gradients_match_the_full_logits_computation(vlm_dirs, family):
    from peft import LoraConfig, get_peft_model

    from prefcache.model.vision import lora_exclude

    grads = []
    for fn in (lambda m, *a: token_logprobs(m, *a[:3], chunk_size=5, vision=a[3]),
               lambda m, *a: naive_token_logprobs(m, *a[:3], vision=a[3])):
        model, processor, _ = load(vlm_dirs, family)
        ids, attention, completion, vision = batch(processor, family)
        torch.manual_seed(7)
        config = LoraConfig(r=4, target_modules="all-linear", exclude_modules=lora_exclude(model),
                            init_lora_weights=False)  # B != 0: gradients reach A too
        model = get_peft_model(model, config)
        weights = torch.tensor([1.0, -0.5])  # a loss that weighs the rows differently
        (fn(model, ids, attention, completion, vision).sum(-1) * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0] and all(".language_model." in n or ".text_model." in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def encoded_images(model) -> list[int]:
    """Images the vision tower encodes, one entry per call (a forward hook on the tower)."""
    tower = getattr(model.model, "vision_tower", None) or model.model.vision_model
    calls: list[int] = []

    def hook(module, args, kwargs, out):
        calls.append(kwargs.get("pixel_values", args[0] if args else None).shape[0])

    tower.register_forward_hook(hook, with_kwargs=True)
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_sharing_equals_two_sequences_and_encodes_each_image_once(vlm_dirs, family):
    from prefcache.model.packing import sharing_problem

    model, processor, _ = load(vlm_dirs, family)
    assert sharing_problem(model) is None  # the backbone hands the block mask and positions to its language model
    pairs, vision = vlm_pairs(processor, family)
    calls = encoded_images(model)
    with torch.no_grad():
        shared = pair_logps(model, pairs, pad_id=processor.tokenizer.pad_token_id, prefix_sharing=True,
                            chunk_size=7, vision=vision)
        assert sum(calls) == len(pairs)  # one packed row per pair: its image once
        plain = pair_logps(model, pairs, pad_id=processor.tokenizer.pad_token_id, prefix_sharing=False,
                           vision=vision)
        assert sum(calls) == 3 * len(pairs)  # two sequences per pair: twice
    # Two attention layouts sum fp32 in different orders: measured <= 1.6e-5 nats on sums of ~-120 nats (a few
    # ulps of the sum); 1e-4 is the bound text packing is held to.
    for field in ("chosen", "rejected", "chosen_prefix", "rejected_prefix", "chosen_tokens", "rejected_tokens"):
        torch.testing.assert_close(getattr(shared, field), getattr(plain, field), atol=1e-4, rtol=0, msg=field)
    assert shared.n_tokens == plain.n_tokens - sum(len(p.prompt_ids) for p in pairs)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_sharing_gradients_equal_two_sequences(vlm_dirs, family):
    from peft import LoraConfig, get_peft_model

    from prefcache.model.vision import lora_exclude

    grads = []
    for sharing in (True, False):
        model, processor, _ = load(vlm_dirs, family)
        pairs, vision = vlm_pairs(processor, family)
        torch.manual_seed(5)
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", exclude_modules=lora_exclude(model),
                                                 init_lora_weights=False))
        model.train()
        out = pair_logps(model, pairs, pad_id=processor.tokenizer.pad_token_id, prefix_sharing=sharing, chunk_size=5,
                         vision=vision)
        (out.chosen.sum() - 0.5 * out.rejected.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def tiny_qwen2_vl(tokenizer):
    """A random Qwen2-VL (multimodal rotary positions: 3D, from ``image_grid_thw``) and two pairs with an image each.
    Built from its configs and its image processor, the image tokens expanded as its processor does
    (``image_grid_thw.prod() / merge_size²`` of them): the full processor also wants a video processor (torchvision)."""
    import copy

    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

    tok = copy.deepcopy(tokenizer)
    special = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok.add_special_tokens({"additional_special_tokens": special})
    start, end, pad, video = tok.convert_tokens_to_ids(special)
    torch.manual_seed(0)
    text = {"vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "bos_token_id": None, "eos_token_id": None,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}}
    vision_cfg = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 4, "mlp_ratio": 2, "patch_size": 8,
                  "spatial_merge_size": 2, "temporal_patch_size": 2}
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(
        text_config=text, vision_config=vision_cfg, image_token_id=pad, video_token_id=video,
        vision_start_token_id=start, vision_end_token_id=end)).eval()
    images = Qwen2VLImageProcessor(patch_size=8, merge_size=2, temporal_patch_size=2,
                                   size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64})
    vision = dict(images(images=[random_image(1), random_image(2, (64, 64))], return_tensors="pt"))
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    pairs = []
    for i, n in enumerate((vision["image_grid_thw"].prod(-1) // 4).tolist()):
        prompt = enc("<|im_start|>user\n<|vision_start|>") + [pad] * n + enc(f"<|vision_end|>{QUESTIONS[i]}<|im_end|>\n"
                                                                              "<|im_start|>assistant\n")
        pairs.append(TokenizedPair(f"q{i}", prompt, enc(ANSWERS[i][0]), enc(ANSWERS[i][1]), False, False))
    width = max(len(p.prompt_ids) for p in pairs)  # the processor's per-token modality ids of the (padded) prompts
    vision["mm_token_type_ids"] = torch.tensor([[int(t == pad) for t in p.prompt_ids] + [0] * (width - len(p.prompt_ids))
                                                for p in pairs])
    return model, pairs, vision, tok.pad_token_id


def test_multimodal_rotary_positions_fall_back_to_two_sequences_with_one_line(tokenizer, caplog, monkeypatch):
    import prefcache.model.packing as packing
    from prefcache.model.pairs import pair_tensors
    from prefcache.model.vision import repeat_vision

    monkeypatch.setattr(packing, "_warned", set())
    model, pairs, vision, pad_id = tiny_qwen2_vl(tokenizer)
    assert "multimodal rotary positions" in packing.sharing_problem(model)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="prefcache"):
        out = pair_logps(model, pairs, pad_id=pad_id, prefix_sharing=True, chunk_size=7, vision=vision)
        pair_logps(model, pairs, pad_id=pad_id, prefix_sharing=True, vision=vision)
        ids, attention, completion = pair_tensors(pairs, pad_id)
        both = repeat_vision(vision, 2)
        naive = naive_token_logprobs(model, ids, attention, completion, vision=both).sum(-1)
        both["mm_token_type_ids"] = (ids == model.config.image_token_id).long()
        spelled = full_logits_reference(model, ids, attention, completion, both).sum(-1)
    lines = [r for r in caplog.records if "prefix sharing off" in r.getMessage()]
    assert len(lines) == 1 and "multimodal rotary positions" in lines[0].getMessage()
    torch.testing.assert_close(torch.cat([out.chosen, out.rejected]), naive, atol=1e-5, rtol=0)
    torch.testing.assert_close(naive, spelled, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_trains_the_language_model_only_unless_the_vision_tower_is_asked_for(vlm_dirs, family):
    from prefcache.model.policy import load_policy
    from prefcache.model.vision import vision_modules

    source = resolve_model(str(vlm_dirs[family]))
    language = "model.language_model." if family == "llava" else "model.text_model."
    outside = tuple(f"base_model.model.{n}." for n in vision_modules(load_model(source, quantize="fp32")[0]))
    assert len(outside) == 2  # the vision tower and the projector
    torch.manual_seed(0)
    model, info = load_policy(source, device="cpu")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and f"base_model.model.{language}" in n for n in trainable)
    assert not info["train_vision"]
    # peft's "all-linear" alone would also take the tower's and the projector's linear layers: now both trained.
    model, info = load_policy(source, device="cpu", train_vision=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in trainable) and info["train_vision"]
    for part in outside:
        assert any(n.startswith(part) for n in trainable), part
    assert any(language in n for n in trainable)
    # Named targets stay in the language model too (CLIP's tower has q_proj layers of its own).
    model, _ = load_policy(source, device="cpu", lora_target="q_proj,v_proj")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(language in n for n in trainable)


def test_full_finetuning_freezes_the_vision_tower_by_default(vlm_dirs, tiny_model):
    from prefcache.model.load import ModelError
    from prefcache.model.policy import load_policy
    from prefcache.model.vision import vision_modules

    source = resolve_model(str(vlm_dirs["llava"]))
    model, _ = load_policy(source, finetune="full", device="cpu")
    outside = vision_modules(model)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(tuple(outside)) for n in frozen)
    model, _ = load_policy(source, finetune="full", device="cpu", train_vision=True)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ModelError, match="vision-language"):
        load_policy(resolve_model(str(tiny_model)), device="cpu", train_vision=True)
