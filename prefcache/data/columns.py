"""Column mapping and prompt templates: other people's preference data as prompt/chosen/rejected.

``--columns id=qid,prompt=question,chosen=response_j,rejected=response_k`` names the data's own columns;
``--prompt-template 'Question: {prompt}\\n\\nAnswer: '`` renders the prompt (a :meth:`str.format` string;
it may also name any other column of the row), ``--chosen-template`` / ``--rejected-template`` the
completions. Rows are mapped and rendered first; everything after (ids, validation, tokenisation) sees
plain prompt/chosen/rejected, so a derived id is the content hash of the *rendered* pair.

A cache records the mapping (``data_mapping``, None when there is none: also what caches made before
mapping existed mean), and training or scoring with another mapping is refused.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from prefcache.data.formats import DataFormatError

TARGETS = ("id", "prompt", "chosen", "rejected", "images")  # images: vision rows (prefcache.data.vision)
UNPAIRED_TARGETS = ("completion", "label")  # TRL's unpaired format: not mapped yet
UNPAIRED_NOT_YET = ("column mappings and templates (--columns, --*-template) are not supported for unpaired data yet: "
                    "give the data prompt, completion and label columns")
TEMPLATES = ("prompt_template", "chosen_template", "rejected_template")


def parse_columns(value) -> tuple[tuple[str, str], ...]:
    """``"id=qid,prompt=question"``, a ``{target: source}`` dict, or pairs -> ((target, source), ...)."""
    if not value:
        return ()
    if isinstance(value, str):
        items = []
        for part in (p.strip() for p in value.split(",")):
            if not part:
                continue
            target, sep, source = part.partition("=")
            if not sep or not target.strip() or not source.strip():
                raise ValueError(f"--columns wants TARGET=COLUMN pairs such as prompt=question, got {part!r}")
            items.append((target.strip(), source.strip()))
    elif isinstance(value, dict):
        items = [(str(k), str(v)) for k, v in value.items()]
    else:
        items = [(str(k), str(v)) for k, v in value]
    for target, source in items:
        if target in UNPAIRED_TARGETS:
            raise ValueError(f"--columns {target}={source}: {UNPAIRED_NOT_YET}")
        if target not in TARGETS:
            raise ValueError(f"--columns: unknown column {target!r}; map {', '.join(TARGETS)} (e.g. prompt=question)")
    if len({t for t, _ in items}) != len(items):
        raise ValueError(f"--columns maps a column twice: {value!r}")
    return tuple(items)


def no_completion_columns(names, hint: str = "") -> DataFormatError:
    """The error for data with neither a chosen nor a rejected column; ``names``: the columns the data has."""
    return DataFormatError("no 'chosen' or 'rejected' column: preference data needs prompt/chosen/rejected "
                           f"(TRL's standard or conversational format); found columns {sorted(names)}{hint}")


def unescape(text: str | None) -> str | None:
    r"""A template typed on the command line: ``\n`` is a newline, ``\t`` a tab, ``\\`` a backslash."""
    if text is None:
        return None
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _fields(template: str) -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise ValueError(f"template {template!r} is not a format string ({e}); write a literal brace as {{{{ or }}}}") from e


@dataclass(frozen=True)
class RowMapping:
    """How rows of the data become prompt/chosen/rejected (and id). Empty = the data already uses them."""

    columns: tuple[tuple[str, str], ...] = ()
    prompt_template: str | None = None
    chosen_template: str | None = None
    rejected_template: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "columns", parse_columns(self.columns))
        for name in TEMPLATES:
            template = getattr(self, name)
            if template is None:
                continue
            target = name.removesuffix("_template")
            fields = _fields(template)
            if target not in fields:
                raise ValueError(f"--{target}-template must contain {{{target}}} (where the {target} text goes), "
                                 f"got {template!r}")
            if bad := [f for f in fields if not f.isidentifier()]:
                raise ValueError(f"--{target}-template: {{{bad[0]}}} is not a column name")

    @classmethod
    def of(cls, config) -> RowMapping:
        """The mapping an options dataclass asks for (its columns and *_template fields)."""
        return cls(getattr(config, "columns", None) or (), *(getattr(config, n, None) for n in TEMPLATES))

    def __bool__(self) -> bool:
        return bool(self.columns) or any(getattr(self, n) is not None for n in TEMPLATES)

    def record(self) -> dict | None:
        """What a cache stores under ``data_mapping``: None when there is no mapping."""
        if not self:
            return None
        return {"columns": dict(self.columns), **{n: getattr(self, n) for n in TEMPLATES}}

    def check_columns(self, names, source: str = "the data") -> None:
        """Every mapped column and every column a template names must exist in the data."""
        names = list(names)
        have = set(names)
        for target, column in self.columns:
            if column not in have:
                raise DataFormatError(f"--columns maps {target} to {column!r}, which is not a column of {source} "
                                      f"(it has {', '.join(names)})")
        mapped = have | {t for t, _ in self.columns}
        if not mapped & {"chosen", "rejected"}:  # said here, where the data's own names are known (not the mapped rows')
            e = no_completion_columns(names, "; map them with --columns chosen=COLUMN,rejected=COLUMN")
            raise DataFormatError(f"{source}: {e}")
        for name in TEMPLATES:
            template = getattr(self, name)
            if template is None:
                continue
            target = name.removesuffix("_template")
            if target not in mapped:
                raise DataFormatError(f"--{target}-template needs a {target} column, and {source} has none "
                                      f"(it has {', '.join(names)}; map one with --columns {target}=COLUMN)")
            if missing := [f for f in _fields(template) if f not in mapped]:
                raise DataFormatError(f"--{target}-template names {{{missing[0]}}}, which is not a column of "
                                      f"{source} (it has {', '.join(names)})")

    def apply(self, row):
        """One row -> the row with id/prompt/chosen/rejected mapped and rendered (other keys kept)."""
        if not self or not isinstance(row, dict):
            return row
        out = dict(row)
        for target, column in self.columns:
            out[target] = row.get(column)
        values = {k: v for k, v in out.items() if isinstance(k, str)}
        for name in TEMPLATES:
            template, target = getattr(self, name), name.removesuffix("_template")
            value = out.get(target)
            if template is None or value is None:
                continue  # a null field is reported as a bad row later
            if not isinstance(value, str):
                raise DataFormatError(f"--{target}-template renders plain text, but a row's {target} is a "
                                      f"{type(value).__name__} (conversational data is rendered by the chat template)")
            out[target] = template.format_map({**values, target: value})
        return out


