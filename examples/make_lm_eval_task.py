"""Turn held-out preference pairs into a local lm-eval task: pick the chosen answer over the rejected one.

Each pair becomes a two-way multiple-choice document scored by log-likelihood: the question is the prompt,
the choices are the chosen and the rejected completion, in an order fixed by the pair's id (so about half
the documents have the chosen answer second), and ``label`` is the index of the chosen one. The texts are
rendered as training renders them (``prefcache.data.pairs``: chat template for conversational data, EOS for
standard data), with the tokenizer of ``--model``, and the choice follows the prompt with no delimiter, so
lm-eval scores exactly the sequences DPO trained on. ``acc`` is then the share of pairs where the model
gives the chosen answer the higher log-likelihood: a DPO checkpoint should beat its base on it.

Writes ``OUT/TASK.jsonl`` and ``OUT/TASK.yaml``; the YAML names the JSONL relative to itself, which
``prefcache eval --include-path OUT`` resolves from any working directory. Plain ``lm-eval`` resolves it
against the working directory: run it from OUT, or build with ``--absolute``.

    python examples/make_dataset.py --out data/
    python examples/make_lm_eval_task.py --data data/heldout.jsonl --out examples/lm_eval_task
    prefcache eval run1 --tasks prefcache_heldout --include-path examples/lm_eval_task
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

YAML = """\
# lm-eval task made by examples/make_lm_eval_task.py from {source} ({n} pairs).
# Two-way multiple choice by log-likelihood: is the chosen answer more likely than the rejected one?
# data_files is relative to this file for `prefcache eval --include-path`; plain lm-eval reads it
# relative to the working directory (or rebuild with --absolute).
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: multiple_choice
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def gold_index(example_id: str) -> int:
    """Where the chosen answer goes (0 or 1): from the id's hash, so the order is fixed yet unbiased."""
    return hashlib.sha256(example_id.encode()).digest()[0] % 2


def build_task(data: str | Path, out: str | Path, task: str = "prefcache_heldout", *, model: str | None = None,
               limit: int | None = None, absolute: bool = False) -> tuple[Path, Path]:
    """Write ``out/{task}.jsonl`` (id, prompt, choices, label) and ``out/{task}.yaml``; returns their paths."""
    from prefcache.data.pairs import load_rows, prepare_examples
    from prefcache.model.load import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(model))
    examples, _ = prepare_examples(load_rows(str(data))[:limit], tokenizer, on_bad_row="skip")
    if not examples:
        raise SystemExit(f"{data}: no usable preference pairs")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    docs = out / f"{task}.jsonl"
    with open(docs, "w", encoding="utf-8") as f:
        for ex in examples:
            label = gold_index(ex.id)
            choices = [ex.chosen, ex.rejected] if label == 0 else [ex.rejected, ex.chosen]
            f.write(json.dumps({"id": ex.id, "prompt": ex.prompt, "choices": choices, "label": label},
                               ensure_ascii=False) + "\n")
    spec = out / f"{task}.yaml"
    data_file = str(docs.resolve()) if absolute else docs.name
    spec.write_text(YAML.format(source=Path(data).name, n=len(examples), task=task, data_file=json.dumps(data_file)))
    return docs, spec


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="preference data (any format prefcache reads)")
    ap.add_argument("--out", type=Path, default=Path("examples/lm_eval_task"))
    ap.add_argument("--task", default="prefcache_heldout", help="the lm-eval task name")
    ap.add_argument("--model", default=None, help="model whose tokenizer renders the texts [default: embedded]")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N rows")
    ap.add_argument("--absolute", action="store_true", help="write an absolute data path (for plain lm-eval)")
    args = ap.parse_args()
    for path in build_task(args.data, args.out, args.task, model=args.model, limit=args.limit, absolute=args.absolute):
        print(path)
