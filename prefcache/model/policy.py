"""Load the policy to train: a local HF folder, a GGUF file or the embedded default, fine-tuned
in full, with LoRA, or with QLoRA (LoRA on a 4-bit NF4 base).

Only the policy is loaded: the reference model's log-probs come from the cache. LoRA's B matrix
starts at zero, so a fresh LoRA policy *is* its base model at step 0 (rewards start at exactly 0).
"""

from __future__ import annotations

import os
from pathlib import Path

from prefcache.core.hub import resolve_adapter
from prefcache.model.load import ModelError, ModelSource, load_model, resolve_device, resolve_quantization
from prefcache.model.vision import lora_exclude, vision_modules


def lora_alpha_of(r: int, alpha: float | None = None) -> float:
    """LoRA's alpha: the given one, else 2 x r (the scale alpha / r = 2, as in the QLoRA recipe)."""
    return alpha if alpha is not None else 2.0 * r


FINETUNES = ("auto", "lora", "qlora", "full")




def lora_config(r: int = 16, alpha: float | None = None, dropout: float = 0.0, target: str = "all-linear"):
    """peft.LoraConfig for causal LMs. ``target``: "all-linear" (every linear layer but the output
    head, QLoRA's recipe) or comma-separated module names such as "q_proj,v_proj"."""
    from peft import LoraConfig

    modules = target if target == "all-linear" else [m.strip() for m in target.split(",") if m.strip()]
    return LoraConfig(r=r, lora_alpha=lora_alpha_of(r, alpha), lora_dropout=dropout,
                      target_modules=modules, bias="none", task_type="CAUSAL_LM")


def base_precision(finetune: str, device: str) -> str:
    """Weights the base is loaded in: 4bit for qlora; fp32 master weights for full fine-tuning (bf16
    autocast does the GPU speed-up); for lora the frozen base in bf16 on a GPU, fp32 on CPU."""
    if finetune == "qlora":
        return "4bit"
    if finetune == "full":
        return "fp32"
    return resolve_quantization("auto", device)


def load_policy(
    source: ModelSource,
    *,
    finetune: str = "lora",
    device: str = "auto",
    adapter: str | os.PathLike | None = None,
    lora_r: int = 16,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    lora_target: str = "all-linear",
    gradient_checkpointing: bool = False,
    shardable: bool = False,
    train_vision: bool = False,
):
    """The trainable policy, in train mode, and a dict describing it.

    finetune: "lora" / "qlora": a new LoRA adapter (``lora_*``), or ``adapter`` (a PEFT folder: a
    starting SFT adapter, or a checkpoint being resumed) made trainable. "full": every weight trains
    (fp32 master weights); an ``adapter`` is merged into them first. ``source`` may itself be a full
    fine-tuning checkpoint (an HF folder).
    gradient_checkpointing: recompute each decoder layer in backward. transformers applies it only in
    train mode, which this function leaves the model in.
    shardable: the policy will be sharded with FSDP (``train --fsdp``): a qlora base is loaded in the form FSDP
    can shard (:func:`~prefcache.model.load.load_model`'s ``shardable``); nothing changes for lora or full.
    train_vision: a vision-language model's vision tower and projector train too (LoRA on their linear layers,
    or their weights under "full"); by default they stay frozen and only the language model trains.
    The caller seeds torch first: LoRA's A matrices are random.
    """
    device = resolve_device(device)
    if finetune not in ("lora", "qlora", "full"):
        raise ModelError(f"finetune must be lora, qlora or full, got {finetune!r}")
    adapter = resolve_adapter(adapter)  # a folder, or a Hub id's snapshot
    if adapter is not None and not (Path(adapter) / "adapter_config.json").exists():
        raise ModelError(f"--adapter {adapter} is not a PEFT adapter folder (no adapter_config.json)")
    precision = base_precision(finetune, device)
    model, info = load_model(source, quantize=precision, device=device, shardable=shardable)
    frozen = [] if train_vision else vision_modules(model)
    if train_vision and not info.get("vision"):
        raise ModelError("train_vision needs a vision-language model (one with a vision tower)")
    new_lora = lora_config(lora_r, lora_alpha, lora_dropout, lora_target) if finetune != "full" and adapter is None else None
    if new_lora is not None:
        new_lora.exclude_modules = lora_exclude(model, train_vision)  # None for a text model
    model = _make_trainable(model, finetune, adapter, gradient_checkpointing, new_lora)
    if finetune == "full":
        for name in frozen:
            model.get_submodule(name).requires_grad_(False)
    model.config.use_cache = False
    model.train()  # also what makes transformers' gradient checkpointing take effect

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    info.update(finetune=finetune, adapter=str(adapter) if adapter else None, trainable_params=trainable,
                total_params=total, gradient_checkpointing=gradient_checkpointing)
    if new_lora is not None:
        info["lora"] = {"r": lora_r, "alpha": lora_alpha_of(lora_r, lora_alpha),
                        "dropout": lora_dropout, "target": lora_target}
    if info.get("vision"):
        info["train_vision"] = train_vision
    return model, info


def _make_trainable(model, finetune: str, adapter, gradient_checkpointing: bool, new_lora):
    """The loaded base model made trainable: every weight ("full", after merging ``adapter``), or a LoRA
    adapter on the frozen base (``adapter`` resumed, else a new one from the LoraConfig ``new_lora``), with checkpointing as asked."""
    if finetune == "full":
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        model.requires_grad_(True)
        if gradient_checkpointing:
            enable_checkpointing(model)
    else:
        from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

        if finetune == "qlora":
            # fp32 norms/embeddings and input grads for the 4-bit base (the QLoRA paper's recipe).
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        elif gradient_checkpointing:
            enable_checkpointing(model)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
        else:
            model = get_peft_model(model, new_lora)
    return model


def enable_checkpointing(model) -> None:
    """Activation checkpointing per decoder layer, non-reentrant (safe under DDP and with frozen inputs).
    transformers 5 renamed the method; 4.x has only the old name."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
