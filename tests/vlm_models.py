"""Tiny random vision-language models with real processors, for the image tests: SmolLM2's tokenizer (plus the
family's image tokens and a chat template that renders ``{"type": "image"}`` content parts), a 2-layer Llama as
the language model, and a 2-layer vision tower. Two families whose image tokens reach the language model
differently:

- ``llava``: CLIP vision tower + projector; one image is ``(size / patch)^2`` ``<image>`` tokens (64 at the
  defaults), its features scattered into those positions.
- ``idefics3`` (SmolVLM's family): SigLIP-style tower + pixel shuffle; ``image_seq_len`` ``<image>`` tokens
  between ``<fake_token_around_image>`` markers, and a ``pixel_attention_mask``.

Saved as folders that ``AutoProcessor`` and ``AutoModelForImageTextToText`` load, as a Hub snapshot would be.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

FAMILIES = ("llava", "idefics3")

# ChatML, as SmolLM2's own template, with content parts: an image part renders as the processor's placeholder.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_vlm(path: Path, tokenizer, family: str, *, image_size: int = 64, patch_size: int = 8,
                  seed: int = 0, text: dict | None = None, vision: dict | None = None) -> Path:
    """A random ``family`` VLM and its processor saved in ``path``. ``tokenizer``: SmolLM2's (copied, not changed).
    ``text`` / ``vision``: config fields over the tiny defaults (e.g. ``text={"hidden_size": 384}``: a language
    model where compute matters, for a benchmark)."""
    import copy

    from transformers import LlamaConfig

    tok = copy.deepcopy(tokenizer)
    extra = ["<image>"] if family == "llava" else ["<image>", "<fake_token_around_image>", "<global-img>"]
    tok.add_special_tokens({"additional_special_tokens": extra})
    tok.chat_template = CHAT_TEMPLATE
    image_id = tok.convert_tokens_to_ids("<image>")
    text_options = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "max_position_embeddings": 4096, **(text or {})}
    text = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, **text_options)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             **(vision or {})}
    torch.manual_seed(seed)
    if family == "llava":
        from transformers import (
            CLIPImageProcessor,
            CLIPVisionConfig,
            LlavaConfig,
            LlavaForConditionalGeneration,
            LlavaProcessor,
        )

        tower_config = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, projection_dim=32, **tower)
        model = LlavaForConditionalGeneration(LlavaConfig(vision_config=tower_config, text_config=text,
                                                          image_token_index=image_id, vision_feature_layer=-1,
                                                          vision_feature_select_strategy="default"))
        images = CLIPImageProcessor(size={"shortest_edge": image_size},
                                    crop_size={"height": image_size, "width": image_size})
        # CLIP's class token is one more feature, which the "default" strategy drops: (size / patch)^2 tokens.
        processor = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=patch_size,
                                   vision_feature_select_strategy="default", image_token="<image>",
                                   num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    elif family == "idefics3":
        from transformers import (
            Idefics3Config,
            Idefics3ForConditionalGeneration,
            Idefics3ImageProcessor,
            Idefics3Processor,
        )
        from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

        tower_config = Idefics3VisionConfig(image_size=image_size, patch_size=patch_size, **tower)
        scale = 2  # pixel shuffle: 4 patches -> 1 token
        model = Idefics3ForConditionalGeneration(Idefics3Config(vision_config=tower_config.to_dict(), text_config=text.to_dict(),
                                                                image_token_id=image_id, scale_factor=scale))
        images = Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": image_size},
                                        max_image_size={"longest_edge": image_size})
        processor = Idefics3Processor(image_processor=images, tokenizer=tok, chat_template=CHAT_TEMPLATE,
                                      image_seq_len=(image_size // patch_size) ** 2 // scale**2)
    else:
        raise ValueError(f"unknown family {family!r}: one of {FAMILIES}")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def random_image(seed: int, size: tuple[int, int] = (48, 80)):
    """A PIL RGB image of noise (height, width): its content, and so its hash, differs per seed."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def vision_rows(n: int, image_dir: Path, seed: int = 0, answer_words: tuple[int, int] = (4, 6)) -> list[dict]:
    """``n`` preference rows in TRL's vision format: a conversational prompt with an image part, one image file
    (PNG in ``image_dir``) per row in ``images``, and short conversational answers (``answer_words``: words
    after the chosen answer's first and the rejected one's)."""
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = "red blue cat dog house tree sky river bird car".split()
    rows = []
    for i in range(n):
        path = image_dir / f"img{seed}-{i}.png"
        random_image(seed * 1000 + i).save(path)
        question = "What is in the picture? " + " ".join(rng.choice(words, 3))
        rows.append({
            "images": [str(path)],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A " + " ".join(rng.choice(words, answer_words[0]))}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "The " + " ".join(rng.choice(words, answer_words[1]))}]}],
        })
    return rows
