"""trainlog: the run's Parquet logs, whole part files only, truncated on resume."""

from __future__ import annotations

import pyarrow.parquet as pq

from prefcache.training.log import EXAMPLE_SCHEMA, STEP_SCHEMA, RunLog, write_pairs


def _examples(n: int, offset: int = 0) -> dict[str, list]:
    return {"id": [f"e{offset + i}" for i in range(n)], "policy_chosen_logps": [-1.0] * n,
            "policy_rejected_logps": [-2.0] * n, "ref_chosen_logps": [None] * n, "ref_rejected_logps": [None] * n,
            "reward_chosen": [0.1] * n, "reward_rejected": [0.0] * n, "margin": [0.1] * n,
            "prompt_tokens": [3] * n, "chosen_tokens": [4] * n, "rejected_tokens": [5] * n}


def test_flush_writes_numbered_parts_with_the_schemas(tmp_path):
    log = RunLog(tmp_path)
    log.add_step({"step": 1, "split": "train", "loss": 0.69, "not_a_column": 1})
    log.add_examples(_examples(2), step=1, split="train")
    assert log.pending == 1
    log.flush()
    log.add_step({"step": 2, "split": "train", "loss": 0.5})
    log.flush()
    log.flush()  # nothing buffered: no empty part
    names = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert names == ["examples-000000.parquet", "steps-000000.parquet", "steps-000001.parquet"]
    steps = pq.read_table(tmp_path / "logs" / "steps-000000.parquet")
    assert steps.schema.remove_metadata() == STEP_SCHEMA
    assert steps.to_pylist()[0]["loss"] == 0.69 and steps.to_pylist()[0]["lr"] is None
    examples = pq.read_table(tmp_path / "logs" / "examples-000000.parquet")
    assert examples.schema.remove_metadata() == EXAMPLE_SCHEMA
    assert examples.column("step").to_pylist() == [1, 1] and examples.column("checkpoint").to_pylist() == [None] * 2
    assert RunLog(tmp_path).seq == 2  # a new log continues the numbering


def test_truncate_drops_rows_after_the_checkpoint(tmp_path):
    log = RunLog(tmp_path)
    for step in (1, 2, 3):
        log.add_step({"step": step, "split": "train"})
        log.add_examples(_examples(2, offset=2 * step), step=step, split="train")
        if step != 2:
            log.flush()
    resumed = RunLog(tmp_path)
    assert resumed.truncate(1) == 2 + 4  # steps 2 and 3, and their four example rows
    steps = sorted(r["step"] for p in (tmp_path / "logs").glob("steps-*.parquet") for r in pq.read_table(p).to_pylist())
    assert steps == [1]
    assert not (tmp_path / "logs" / "steps-000001.parquet").exists()  # emptied parts are removed


def test_a_disabled_log_writes_nothing(tmp_path):
    log = RunLog(tmp_path / "run", enabled=False)
    log.add_step({"step": 1})
    log.add_examples(_examples(1), step=1, split="train")
    log.flush()
    assert log.truncate(0) == 0
    assert not (tmp_path / "run").exists()


def test_stale_temporaries_are_removed_and_never_read(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / ".tmp-abc.part").write_text("half")
    RunLog(tmp_path)
    assert list((tmp_path / "logs").iterdir()) == []


def test_write_pairs_keeps_each_id_once(tmp_path):
    class Ex:
        def __init__(self, i, text):
            self.id, self.prompt, self.chosen, self.rejected = i, text, "c", "r"

    write_pairs(tmp_path / "pairs.parquet", [Ex("a", "1"), Ex("b", "2"), Ex("a", "1")])
    assert pq.read_table(tmp_path / "pairs.parquet").column("id").to_pylist() == ["a", "b"]
