"""Vision-language models (LLaVA, Idefics3/SmolVLM, Qwen2-VL, ...): what they need beyond a causal LM.

The processor expands each image placeholder of a prompt into image tokens in ``input_ids`` and returns the
image tensors (``pixel_values``, and per family ``pixel_attention_mask``, ``image_sizes``, ``image_grid_thw``):
prefcache calls those the ``vision`` dict and hands it to the model beside ``input_ids``. The model's
multimodal backbone (``lm.model``) runs the vision tower, writes the image features into the image-token
positions and runs the language model; ``lm.get_decoder()`` is the text-only language model, which takes no
pixels. Image tokens are prompt tokens, so the completion log-probs are computed as for text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import re

# What decides the pixels and the image tokens a processor makes (the rest of its settings does not).
IMAGE_SETTINGS = ("size", "crop_size", "max_image_size", "patch_size", "temporal_patch_size", "merge_size",
                  "min_pixels", "max_pixels", "resample", "image_mean", "image_std", "rescale_factor", "do_resize",
                  "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb", "do_pad", "do_image_splitting")
PROCESSOR_SETTINGS = ("image_seq_len", "image_seq_length", "num_image_tokens", "patch_size",
                      "num_additional_image_tokens", "vision_feature_select_strategy", "image_token",
                      "fake_image_token", "global_image_tag", "boi_token", "eoi_token", "image_token_id")


def is_vision_model(config) -> bool:
    """Whether a transformers config is a vision-language model: it has a ``vision_config``, or its model type
    has an image-text-to-text class and no causal-LM one (so ``AutoModelForCausalLM`` would refuse it)."""
    if getattr(config, "vision_config", None) is not None:
        return True
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", None)
    return kind in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def is_vision_source(source) -> bool:
    """Whether a :class:`~prefcache.model.load.ModelSource` is a vision-language model (a GGUF file never is):
    its config only is read, so a run can pick its data path before any weights load."""
    if source.gguf_file:
        return False
    from transformers import AutoConfig

    return is_vision_model(AutoConfig.from_pretrained(source.path))


def model_class(folder, quantized: bool = False) -> tuple[type, bool, dict]:
    """(the transformers auto class that loads the model in ``folder``, whether it is a vision-language model,
    the ``BitsAndBytesConfig`` arguments a ``quantized`` (4/8-bit) load of it adds: for a vision-language model
    the modules it keeps unquantized, see :func:`quantization_skips`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(folder)
    if not is_vision_model(config):
        return AutoModelForCausalLM, False, {}
    return AutoModelForImageTextToText, True, {"llm_int8_skip_modules": quantization_skips(config)} if quantized else {}


def load_processor(source):
    """The ``AutoProcessor`` (image processor + tokenizer) of a vision-language model's
    :class:`~prefcache.model.load.ModelSource` (a folder: GGUF files hold no vision model), its tokenizer given a
    pad token as :func:`prefcache.model.load.load_tokenizer` does."""
    from transformers import AutoProcessor

    if source.gguf_file:
        raise ValueError(f"{source.name}: a GGUF file has no image processor")
    processor = AutoProcessor.from_pretrained(source.path)
    if processor.tokenizer.pad_token_id is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token  # padding is masked out; any id works
    return processor


def _plain(value):
    """A processor setting as JSON: enums (PIL resampling) as their int, tuples as lists, dicts sorted, a
    ``SizeDict`` as the dict of its set fields."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {k: v for k, v in dataclasses.asdict(value).items() if v is not None}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        return str(value)


def processor_settings(processor) -> dict:
    """The settings of ``processor`` that decide pixels and image tokens (see ``IMAGE_SETTINGS`` and
    ``PROCESSOR_SETTINGS``), those it has, as plain JSON values; ``image_processor`` is its class (the
    PIL and torchvision implementations resize differently)."""
    images = getattr(processor, "image_processor", None)
    out = {"processor": type(processor).__name__}
    if images is not None:
        out["image_processor"] = type(images).__name__
        out.update({k: _plain(getattr(images, k)) for k in IMAGE_SETTINGS if getattr(images, k, None) is not None})
    for key in PROCESSOR_SETTINGS:
        value = getattr(processor, key, None)
        if value is not None:
            out[f"processor.{key}"] = _plain(value)
    return out


def processor_fingerprint(processor) -> tuple[str, dict]:
    """(16-hex sha256 of the settings, the settings) of a processor, for a cache's metadata: two processors
    with the same fingerprint turn the same image and text into the same tokens and pixels. The tokenizer
    has its own fingerprint (:func:`prefcache.model.load.tokenizer_fingerprint`)."""
    settings = processor_settings(processor)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return digest, settings


def processor_record(processor) -> dict:
    """What a cache's metadata and a data store's key record of a vision-language model's processor: its
    fingerprint and settings; {} for a text model (``processor`` None)."""
    if processor is None:
        return {}
    digest, settings = processor_fingerprint(processor)
    return {"processor_fingerprint": digest, "processor_settings": settings}


def vision_backbone(lm):
    """The multimodal backbone of a transformers vision-language model (``lm.model``: vision tower, projector,
    image features merged into the image-token positions, language model) -> [N, T, H] hidden states; None
    when ``lm`` has none that takes ``pixel_values``."""
    backbone = getattr(lm, "base_model", None)
    if backbone is None or backbone is lm:
        return None
    if "pixel_values" not in inspect.signature(backbone.forward).parameters:
        return None
    return backbone


def _module_name(model, module) -> str | None:
    return next((name for name, m in model.named_modules() if m is module), None)


def language_model_name(model) -> str | None:
    """The full module name of a vision-language model's language model (``model.language_model``,
    ``model.text_model``), the name PEFT matches against; None when ``model`` is not a vision-language model."""
    if not is_vision_model(getattr(model, "config", None)) or not hasattr(model, "get_decoder"):
        return None
    return _module_name(model, model.get_decoder())


def lora_exclude(model, train_vision: bool = False) -> str | None:
    """PEFT ``exclude_modules`` for LoRA on a vision-language model: a regex matching every module outside the
    language model, so "all-linear" (which would also take every linear layer of the vision tower and the
    projector) and named targets (CLIP's tower has its own ``q_proj``) stay in the language model. None: nothing
    to exclude (a text model, or ``train_vision``: LoRA on the tower's and the projector's linear layers too)."""
    name = None if train_vision else language_model_name(model)
    return None if name is None else rf"(?!{re.escape(name)}\.).*"


def vision_modules(model) -> list[str]:
    """Full module names of a vision-language model's parts outside its language model: the vision tower and the
    projector (``model.vision_tower``, ``model.multi_modal_projector``; ``model.vision_model``, ``model.connector``;
    Qwen2-VL's ``model.visual``); [] for a text model."""
    backbone = vision_backbone(model) if is_vision_model(getattr(model, "config", None)) else None
    if backbone is None:
        return []
    decoder = model.get_decoder()
    return sorted(n for n in (_module_name(model, c) for c in backbone.children() if c is not decoder) if n)


def quantization_skips(config) -> list[str]:
    """Modules a 4/8-bit load of a vision-language model keeps unquantized (bitsandbytes'
    ``llm_int8_skip_modules``): the vision tower and projector (small next to the language model, and most
    sensitive to rounding) and the output head, which transformers skips by default but not once a skip list
    is given. Names come from the model built on the meta device (no weights, no memory)."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    head = model.get_output_embeddings()
    return sorted(vision_modules(model) + ([_module_name(model, head)] if head is not None else []))


TOKEN_TYPES = ("mm_token_type_ids", "token_type_ids")  # per-token tensors: 1 on image tokens, 2 on video tokens


def fit_vision(vision: dict | None, input_ids, lm) -> dict | None:
    """``vision`` for the rows ``input_ids`` [N, T]: the per-token modality ids a processor returns beside its
    ``input_ids`` (``mm_token_type_ids``, Qwen2-VL's rotary positions need them) cover the prompt it saw; for
    rows that go on with a completion (or repeat the prompt), they are made again from ``input_ids`` and the
    model's image and video token ids, as the processor makes them. Other tensors are per image: kept."""
    if not vision or not any(k in vision and vision[k].shape != input_ids.shape for k in TOKEN_TYPES):
        return vision
    cfg = lm.config
    image = getattr(cfg, "image_token_id", None) or getattr(cfg, "image_token_index", None)
    video = getattr(cfg, "video_token_id", None)
    types = (input_ids == image).long() if image is not None else input_ids.new_zeros(input_ids.shape)
    if video is not None:
        types = types.masked_fill(input_ids == video, 2)
    return {**vision, **{k: types for k in TOKEN_TYPES if k in vision}}


def repeat_vision(vision: dict | None, n: int) -> dict | None:
    """The vision tensors of a batch of B rows for the same rows repeated ``n`` times ([chosen rows..., rejected
    rows...]): every processor tensor lists its images row by row along dim 0 (LLaVA's ``pixel_values`` one
    image after another, Idefics3's [B, images, ...], Qwen2-VL's flattened patches and ``image_grid_thw``), so
    concatenating ``n`` copies keeps each image with its row."""
    if vision is None:
        return None
    import torch

    return {k: torch.cat([v] * n) if isinstance(v, torch.Tensor) else v for k, v in vision.items()}


def vision_inputs(images: list, processor, device=None) -> dict | None:
    """The image tensors of a batch of rows, as the model takes them beside ``input_ids``: ``images[i]`` is the
    :class:`~prefcache.data.images.ImageRef` tuple of row i's prompt (decoded here), in the order its image tokens
    stand. The processor's image processor makes them as the processor did when it expanded the placeholders
    (the same call, so the same pixels): ``pixel_values`` and per family ``pixel_attention_mask``,
    ``image_sizes``, ``image_grid_thw``. A nested list per row, which every family's image processor takes (a
    row without images is padded, and the model drops the padding), on ``device``. None when no row has an image."""
    if not any(images):
        return None
    from prefcache.data.images import open_images

    out = processor.image_processor(images=[open_images(row) for row in images], return_tensors="pt")
    return {k: v if device is None else v.to(device) for k, v in out.items() if hasattr(v, "shape")}
