"""Bad rows: what is wrong with a row of preference data, where it is (row, line), and the policy for them.

``on_bad_row='fail'`` raises :class:`BadDataError` listing them; ``'skip'`` leaves them out, and the pass lists
them in ``bad_rows.jsonl`` (:func:`write_bad_rows`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from prefcache.core.atomic import write_text_atomic
from prefcache.data.options import BAD_ROW_POLICIES

SHOWN_BAD_ROWS = 10

@dataclass(frozen=True)
class BadRow:
    row: int  # 0-based row index in the source file
    id: str | None
    problem: str
    line: int | None = None  # 1-based line of a line-based file (JSONL, CSV), when known

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line else f"row {self.row + 1}"  # people count from 1
        return f"{where}{f' (id {self.id})' if self.id else ''}: {self.problem}"


class BadDataError(ValueError):
    """Rows that cannot be used, with ``on_bad_row='fail'``. ``bad_rows`` holds all of them."""

    def __init__(self, bad_rows: list[BadRow], source: str = "the data"):
        self.bad_rows = bad_rows
        shown = "\n".join(f"  {b}" for b in bad_rows[:SHOWN_BAD_ROWS])
        more = f"\n  ... and {len(bad_rows) - SHOWN_BAD_ROWS} more" if len(bad_rows) > SHOWN_BAD_ROWS else ""
        super().__init__(
            f"{len(bad_rows)} bad row{'s' if len(bad_rows) != 1 else ''} in {source}:\n{shown}{more}\n"
            "Fix them, or pass on_bad_row='skip' (CLI: --on-bad-row skip) to leave them out "
            "and list them in bad_rows.jsonl."
        )


class _Bad(Exception):
    """Internal: a row's problem, raised where it is found."""



def write_bad_rows(path: str | os.PathLike, bad_rows: list[BadRow]) -> None:
    """One JSON object per bad row: ``{"row" (0-based), "id", "problem"}``, and ``"line"`` (1-based) for JSONL/CSV."""
    write_text_atomic(path, "".join(json.dumps({"row": b.row, "id": b.id, "problem": b.problem}
                                               | ({"line": b.line} if b.line else {}), ensure_ascii=False)
                                    + "\n" for b in bad_rows), prefix=".tmp-bad_rows-")


def _check_policy(on_bad_row: str) -> None:
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ValueError(f"on_bad_row must be one of {', '.join(BAD_ROW_POLICIES)}, got {on_bad_row!r}")


def _apply_policy(bad: list[BadRow], on_bad_row: str, source: str = "the data") -> None:
    if bad and on_bad_row == "fail":
        raise BadDataError(bad, source)
