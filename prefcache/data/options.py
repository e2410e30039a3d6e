"""prefcache.data.options: the options of every command that reads preference data, declared once."""

from __future__ import annotations

from dataclasses import dataclass

from prefcache.core.options import check_options, check_revision, option
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

    revision: str | None = option(None, "Hub revision (branch, tag or commit) when --model is a Hub id; or write "
                                        "ID@REV.")
    split: str | None = option(None, "Split of --data when it is a Hub dataset id or a DatasetDict (e.g. train_prefs).")
    data_config: str | None = option(None, "Subset (configuration) of a Hub dataset.")
    columns: str | None = option(None, "The data's own column names, e.g. "
                                       "id=qid,prompt=question,chosen=response_j,rejected=response_k (pairs only: "
                                       "unpaired data is not mapped yet).",
                                 metavar="TARGET=COLUMN,...")
    prompt_template: str | None = option(None, "Format string for the prompt, e.g. 'Question: {prompt}\\n\\nAnswer: ' "
                                               "(\\n = newline, \\t = tab, \\\\ = backslash; other {column}s of the "
                                               "row may appear too).", escapes=True)
    chosen_template: str | None = option(None, "Format string for the chosen completion, with {chosen} where it goes.",
                                         escapes=True)
    rejected_template: str | None = option(None, "Format string for the rejected completion, with {rejected} where it "
                                                 "goes.", escapes=True)

    def __post_init__(self):
        _data_options(self)
        check_options(self, DataOptions)
        check_revision(getattr(self, "model", None), self.revision)
