"""prefcache.data.options."""

from __future__ import annotations

from dataclasses import dataclass

from prefcache.data.columns import RowMapping, parse_columns

TRUNCATIONS = ("keep_start", "keep_end")


BAD_ROW_POLICIES = ("fail", "skip")


def _data_options(config) -> None:
    """Validate the column mapping and templates now (one clear line), and store columns as text."""
    columns = parse_columns(getattr(config, "columns", None))
    object.__setattr__(config, "columns", ",".join(f"{t}={c}" for t, c in columns) or None)
    RowMapping.of(config)


@dataclass(frozen=True, kw_only=True)
class DataOptions:
    """Options shared by the commands that read preference data (precompute, train, score), declared once.

    revision: the Hub revision (branch, tag or commit) of a Hub ``model``. split / data_config: the split and
    subset of a Hub dataset or dataset folder. columns / *_template: the column mapping and prompt templates
    (:mod:`prefcache.data.columns`), validated on construction.
    """

    revision: str | None = None
    split: str | None = None
    data_config: str | None = None
    columns: str | None = None
    prompt_template: str | None = None
    chosen_template: str | None = None
    rejected_template: str | None = None

    def __post_init__(self):
        _data_options(self)
