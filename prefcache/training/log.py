"""The run directory's Parquet logs: ``logs/steps-*.parquet``, ``logs/examples-*.parquet``,
``pairs.parquet`` and ``run.json`` (schemas in :mod:`prefcache.core.schemas`; the SQL views read them as they are).

Rows are buffered and written as a new numbered part file per flush, each to a ``.tmp-`` name and then
renamed, so a killed run leaves whole files only. A resumed run first drops the rows logged after the
checkpoint it resumes from, so no step appears twice.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from prefcache.core import schemas
from prefcache.core.atomic import write_atomic, write_json_atomic, write_table_atomic  # noqa: F401 (write_json_atomic: trainer's)

STEP_SCHEMA, EXAMPLE_SCHEMA, PAIRS_SCHEMA = schemas.STEPS, schemas.EXAMPLES, schemas.PAIRS
_PART = re.compile(r"^(steps|examples)-(\d{6})\.parquet$")
IMAGES_PREFIX = "example_images"  # logs/example_images-*.parquet: a vision run's image references, by example id


def write_example_images(logs: Path, table: pa.Table, name: str) -> Path:
    """``logs/example_images-{name}.parquet``: the images of a vision run's examples (ids, positions, sha256s,
    paths: :func:`prefcache.data.store.example_images`), written once, beside the examples logs they join."""
    logs.mkdir(parents=True, exist_ok=True)
    return write_table_atomic(table, logs / f"{IMAGES_PREFIX}-{name}.parquet")


def write_pairs(path: Path, examples) -> None:
    """RUN/pairs.parquet: id and rendered texts of every example the run sees (train + eval)."""
    seen, cols = set(), {c: [] for c in PAIRS_SCHEMA.names}
    for ex in examples:
        if ex.id not in seen:
            seen.add(ex.id)
            for c in cols:
                cols[c].append(getattr(ex, c))
    write_table_atomic(pa.Table.from_pydict(cols, schema=PAIRS_SCHEMA), path)


def write_pairs_batches(path: Path, batches) -> None:
    """RUN/pairs.parquet from record batches of :data:`PAIRS_SCHEMA` (the texts of a data store, read a batch at a
    time: see :func:`prefcache.data.store.text_batches`)."""
    def write(tmp: str) -> None:
        with pq.ParquetWriter(tmp, PAIRS_SCHEMA, compression="zstd") as writer:
            for batch in batches:
                writer.write_batch(batch)

    write_atomic(path, write)


class RunLog:
    """Buffers step and example rows and writes them as part files under ``run_dir/logs``.

    ``enabled=False`` (ranks other than 0) makes every method a no-op.
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True):
        self.dir = Path(run_dir) / "logs"
        self.enabled = enabled
        self.steps: list[dict] = []
        self.examples: dict[str, list] = {c: [] for c in EXAMPLE_SCHEMA.names}
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(".tmp-*"):  # half-written parts of a killed run
                stale.unlink(missing_ok=True)
        self.seq = max((int(m.group(2)) for p in self._parts() if (m := _PART.match(p.name))), default=-1) + 1

    def _parts(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("*.parquet") if _PART.match(p.name)) if self.dir.exists() else []

    def truncate(self, after_step: int) -> int:
        """Drop logged rows with step > after_step (a resume from that step). Returns rows dropped."""
        if not self.enabled:
            return 0
        dropped = 0
        for path in self._parts():
            table = pq.read_table(path)
            kept = table.filter(pc.less_equal(table.column("step"), after_step))
            if kept.num_rows == table.num_rows:
                continue
            dropped += table.num_rows - kept.num_rows
            if kept.num_rows:
                write_table_atomic(kept, path)
            else:
                path.unlink()
        return dropped

    def add_step(self, row: dict) -> None:
        if self.enabled:
            self.steps.append({c: row.get(c) for c in STEP_SCHEMA.names})

    def add_examples(self, cols: dict[str, list], *, step: int, split: str, checkpoint: str | None = None) -> None:
        if not self.enabled:
            return
        n = len(cols["id"])
        fixed = {"step": step, "split": split, "checkpoint": checkpoint}
        for c in EXAMPLE_SCHEMA.names:
            self.examples[c].extend([fixed[c]] * n if c in fixed else cols[c])

    @property
    def pending(self) -> int:
        return len(self.steps)

    def flush(self) -> None:
        if not self.enabled or not (self.steps or self.examples["id"]):
            return
        name = f"{self.seq:06d}.parquet"
        if self.examples["id"]:
            write_table_atomic(pa.Table.from_pydict(self.examples, schema=EXAMPLE_SCHEMA), self.dir / f"examples-{name}")
        if self.steps:
            write_table_atomic(pa.Table.from_pylist(self.steps, schema=STEP_SCHEMA), self.dir / f"steps-{name}")
        self.seq += 1
        self.steps = []
        self.examples = {c: [] for c in EXAMPLE_SCHEMA.names}


def peak_mem_mb(device: str) -> float:
    """Peak accelerator memory allocated, or on CPU the process's peak resident set size, in MiB."""
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
