"""``prefcache export``: a checkpoint of a run as a folder people can load, with a model card.

Without ``merge``: the PEFT adapter (or, for full fine-tuning, the model) as the checkpoint holds it,
the tokenizer and a README.md model card. With ``merge``: one plain transformers model folder, the
adapter merged into the base. A QLoRA base is *not* merged in 4-bit: the base is loaded in full
precision (fp32, de-quantised) and the adapter merged into that, because folding LoRA deltas into NF4
weights re-quantises them and loses accuracy (the recommendation of TRL's DPO docs and of the QLoRA
paper's authors). The merged weights are then cast to ``dtype`` (default: the base model's own).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from prefcache.core.atomic import make_temp_dir, publish_dir, write_text_atomic
from prefcache.core.folders import check_folder_kind
from prefcache.losses.registry import UNPAIRED_LOSSES
from prefcache.model.load import file_fingerprint, hf_folder, resolve_model
from prefcache.training.rundir import CHECKPOINT_JSON, read_checkpoint_info, read_run_info

DTYPES = ("bf16", "fp16", "fp32")
_SKIP = {"trainer_state.pt", CHECKPOINT_JSON}  # resume state, not something a user loads


def checkpoint_info(checkpoint: str | os.PathLike) -> tuple[dict, dict]:
    """(the checkpoint's prefcache.json, its run's run.json or {})."""
    ckpt = Path(checkpoint)
    if (info := read_checkpoint_info(ckpt)) is None:
        raise ValueError(f"{ckpt} is not a prefcache checkpoint (no {CHECKPOINT_JSON}): give RUN/checkpoints/step-NNNNNN")
    return info, read_run_info(ckpt.parent.parent)


def cache_fingerprint(cache_dir: str | os.PathLike | None, metadata: dict | None = None) -> str | None:
    """sha256 of the cache's shard files (names and contents; memoised like model fingerprints), or, when
    the cache folder is gone, of its recorded metadata (``meta:`` prefix)."""
    import hashlib

    from prefcache.cache.store import (
        shard_paths,  # pyarrow: the CLI imports this module for --help (DTYPES)
    )

    if cache_dir and Path(cache_dir).is_dir() and (shards := shard_paths(cache_dir)):
        return file_fingerprint(shards)
    if metadata:
        blob = json.dumps({k: v for k, v in metadata.items() if k != "created_at"}, sort_keys=True, default=str)
        return "meta:" + hashlib.sha256(blob.encode()).hexdigest()[:32]
    return None


def final_metrics(run_dir: Path, step: int) -> dict[str, dict]:
    """The last logged train and eval metrics at or before ``step`` (from the run's Parquet logs)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    parts = sorted((run_dir / "logs").glob("steps-*.parquet"))
    if not parts:
        return {}
    import pyarrow as pa

    table = pa.concat_tables([pq.read_table(p) for p in parts])
    table = table.filter(pc.less_equal(table.column("step"), step))
    found = {}
    for split in ("train", "eval"):
        rows = [r for r in table.to_pylist() if r["split"] == split]
        if rows:
            last = max(rows, key=lambda r: r["step"])
            found[split] = {k: v for k, v in last.items() if k not in ("split", "epoch") and v is not None}
    return found


def model_card(info: dict, run: dict, metrics: dict, *, merged: bool, dtype: str | None) -> str:
    """README.md: YAML front matter (base model, library) and what the model was trained on and how."""
    config = run.get("config", {})
    cache_meta = run.get("cache") or {}
    finetune = info.get("finetune", config.get("finetune"))
    adapter = finetune in ("lora", "qlora") and not merged
    base = info.get("model") or info.get("base_model")
    loss = info.get("loss") or config.get("loss")
    loss = ",".join(loss) if isinstance(loss, list | tuple) else loss
    lines = ["---", f"base_model: {json.dumps(str(base))}", f"library_name: {'peft' if adapter else 'transformers'}",
             "tags:", "- prefcache", f"- {str(loss).split(',')[0]}", "---", "",
             f"# {info.get('base_model', base)} — preference-tuned with prefcache", "",
             "| | |", "|---|---|",
             f"| base model | {base} |",
             f"| fine-tuning | {finetune}{' (merged into the full-precision base)' if merged and finetune != 'full' else ''} |",
             f"| format | {'PEFT adapter' if adapter else 'transformers model'}{f', {dtype}' if dtype else ''} |",
             f"| data | {config.get('data')} ({run.get('train_pairs', '?')} training "
             f"{'examples' if str(loss) in UNPAIRED_LOSSES else 'pairs'}) |",
             f"| loss | {loss}, beta {info.get('beta', config.get('beta'))} |",
             f"| steps | {info.get('step')} (epoch {info.get('epoch', 0):.2f}) |",
             f"| max length / truncation | {info.get('max_length')} / {info.get('truncation')} |",
             f"| reference cache | {info.get('cache')} (fingerprint `{info.get('cache_fingerprint')}`) |"]
    if cache_meta:
        lines.append(f"| reference model | {cache_meta.get('model_name')} ({cache_meta.get('quantization')}, "
                     f"fingerprint `{cache_meta.get('model_fingerprint')}`) |")
    if extra := [k for k in ("ld_alpha", "label_smoothing", "simpo_gamma") if config.get(k)]:
        lines.append("| loss options | " + ", ".join(f"{k} {config[k]}" for k in extra) + " |")
    lines.append(f"| prefcache | {info.get('prefcache_version')} |")
    for split, values in metrics.items():
        lines += ["", f"## Final {split} metrics (step {values.get('step')})", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" for k, v in values.items() if k != "step" and isinstance(v, int | float)]
    lines += ["", "Rewards are β·(log π − log π_ref) on summed completion log-probs (nats), against the cached "
              "reference; accuracies are the share of pairs with a positive margin.", ""]
    return "\n".join(lines)


def base_dtype(folder: Path) -> str:
    """The dtype a model folder's config.json declares, as bf16/fp16/fp32 (fp32 when it says nothing)."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except OSError:
        return "fp32"
    named = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    return {"bfloat16": "bf16", "float16": "fp16"}.get(named, "fp32")


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, *, merge: bool = False, dtype: str | None = None,
           model: str | None = None) -> dict:
    """Export ``checkpoint`` to ``out`` (created; refused when it exists and is not empty).

    merge: fold the LoRA adapter into the base (full precision, then ``dtype``); refused for full
    fine-tuning checkpoints, which are whole models already with nothing to merge (``dtype`` casts them).
    dtype: bf16, fp16 or fp32 of the written weights; None = the base model's own dtype.
    model: the base model folder, when the path the run recorded has moved.
    Returns a summary: out, merged, dtype, files.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    ckpt, out = Path(checkpoint), Path(out)
    check_folder_kind(out, "model", "choose a new, empty --out for the exported model")
    info, run = checkpoint_info(ckpt)
    if merge and info.get("finetune") == "full":  # said, not ignored: the user expected an adapter to fold in
        raise ValueError(f"{ckpt} is a full fine-tune, a whole model with no adapter to merge: drop --merge "
                         "(--dtype casts its weights)")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose a new --out")
    source = resolve_model(model if model is not None else info.get("model"))
    full = info.get("finetune") == "full"
    dtype = dtype or base_dtype(ckpt if full else hf_folder(source))
    info = {**info, "cache_fingerprint": cache_fingerprint(info.get("cache"), run.get("cache"))}
    metrics = final_metrics(ckpt.parent.parent, int(info.get("step", 0)))

    tmp = make_temp_dir(out)  # the umask's modes (mkdtemp gives 0700), as every prefcache output
    try:
        if merge or (full and dtype != base_dtype(ckpt)):
            write_merged(ckpt, source, tmp, dtype=dtype, full=full)
            merged = True
        else:
            for p in ckpt.iterdir():
                if p.name not in _SKIP and p.is_file():
                    shutil.copy2(p, tmp / p.name)
            merged = False
        write_text_atomic(tmp / "README.md", model_card(info, run, metrics, merged=merged and not full,
                                                        dtype=dtype if merged or full else None))
        publish_dir(tmp, out)  # an empty `out` is replaced
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "merged": merged, "dtype": dtype if merged or full else None,
            "files": sorted(p.name for p in out.iterdir())}


def write_merged(ckpt: Path, source, target: Path, *, dtype: str, full: bool) -> None:
    """Load the base in fp32 (a QLoRA base de-quantised: never 4-bit), merge the adapter, cast, save."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer


    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    if full:
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    else:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(hf_folder(source), dtype=torch.float32)
        model = PeftModel.from_pretrained(base, ckpt).merge_and_unload()
    model = model.to(torch_dtype)
    model.config.use_cache = True  # training turned the KV cache off; generation wants it back
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(ckpt).save_pretrained(target)
