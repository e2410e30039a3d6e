"""Model resolution, GGUF conversion, fingerprints and precisions."""

from __future__ import annotations

import pytest
import torch

from prefcache.model.load import (
    ModelError,
    chat_template_hash,
    default_model,
    file_fingerprint,
    hf_folder,
    load_model,
    resolve_model,
    tokenizer_fingerprint,
)


def test_default_model_is_the_embedded_smollm2():
    source = default_model()
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolve_model(None) == source
    assert resolve_model(str(source.path / source.gguf_file)).gguf_file == source.gguf_file


def test_gguf_becomes_a_plain_hf_folder_once(smol_dir):
    assert (smol_dir / "config.json").exists() and (smol_dir / "model.safetensors").exists()
    assert hf_folder(default_model()) == smol_dir  # second call reuses the folder
    assert "quantization_config" not in (smol_dir / "config.json").read_text()


def test_clear_errors_for_bad_model_paths(tmp_path):
    with pytest.raises(ModelError, match="model not found"):
        resolve_model(tmp_path / "nope")
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(tmp_path)


def test_fingerprints_follow_content(tmp_path, tokenizer):
    """A weight file's fingerprint is its name and content: a copy in another folder fingerprints the
    same, another name or another content does not, and the order the files are given in is irrelevant."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    a, copy, renamed = tmp_path / "one" / "a.bin", tmp_path / "two" / "a.bin", tmp_path / "two" / "b.bin"
    for f in (a, copy, renamed):
        f.write_bytes(b"weights")
    assert file_fingerprint([a]) == file_fingerprint([copy])
    assert file_fingerprint([renamed]) != file_fingerprint([a])
    assert file_fingerprint([a, renamed]) == file_fingerprint([renamed, a]) != file_fingerprint([a])
    before = file_fingerprint([a])
    a.write_bytes(b"other weights")
    assert file_fingerprint([a]) != before and file_fingerprint([copy]) == before
    assert len(tokenizer_fingerprint(tokenizer)) == 32
    assert chat_template_hash(tokenizer) != "none"


@pytest.mark.parametrize("quantize,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("auto", torch.float32)])
def test_precisions_on_cpu(tiny_model, quantize, dtype):
    model, info = load_model(resolve_model(str(tiny_model)), quantize=quantize, device="cpu")
    assert next(model.parameters()).dtype == dtype
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert info["quantization"] == ("fp32" if quantize == "auto" else quantize)


def test_4bit_nf4_on_cpu(tiny_model):
    model, info = load_model(resolve_model(str(tiny_model)), quantize="4bit", device="cpu")
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear4bit"
    assert layer.weight.quant_state.quant_type == "nf4"
    assert info["dtype"] == "float32"
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(out).all()


def test_adapter_must_be_a_peft_folder(tiny_model, tmp_path):
    with pytest.raises(ModelError, match="not a PEFT adapter"):
        load_model(resolve_model(str(tiny_model)), quantize="fp32", device="cpu", adapter=tmp_path)
