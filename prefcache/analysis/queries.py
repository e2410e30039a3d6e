"""Named queries: one .sql file each under sql/, with a header (``-- name:``, ``-- description:``,
``-- param: NAME DEFAULT TEXT``) and DuckDB ``$name`` parameters only (values are bound, never pasted in).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


class AnalysisError(ValueError):
    """A query that cannot run: bad SQL, an unknown view or query, a missing parameter, a write."""


REQUIRED = "required"  # a param whose default is this word must be given


@dataclass(frozen=True)
class Param:
    name: str
    default: object  # int | float | str, or None when required
    type: type  # what a value given as text is converted to: int, float or str
    description: str

    @property
    def required(self) -> bool:
        return self.default is None

    def convert(self, value):
        """A value from the command line (text) or Python, as the type of the default."""
        if not isinstance(value, str) or self.type is str:
            return value
        try:
            return self.type(value)
        except ValueError:
            raise AnalysisError(f"parameter {self.name} expects {self.type.__name__}, got {value!r}") from None


@dataclass(frozen=True)
class NamedQuery:
    name: str
    description: str
    params: tuple[Param, ...]
    sql: str
    path: Path

    def bind(self, values: Mapping[str, object]) -> dict[str, object]:
        """Every declared parameter, typed: the given value or the default. Unknown or missing ones fail."""
        known = {p.name: p for p in self.params}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise AnalysisError(f"query {self.name} has no parameter {', '.join(unknown)} "
                                f"(it takes: {', '.join(known) or 'none'})")
        bound = {}
        for p in self.params:
            if p.name in values:
                bound[p.name] = p.convert(values[p.name])
            elif p.required:
                raise AnalysisError(f"query {self.name} needs parameter {p.name} ({p.description}): --param {p.name}=VALUE")
            else:
                bound[p.name] = p.default
        return bound


_HEADER = re.compile(r"^--\s*(name|description|param):\s*(.*?)\s*$")


_PARAM = re.compile(r"^(\w+)\s+('(?:[^']|'')*'|\S+)\s*(.*)$")


def _typed_default(text: str) -> tuple[object, type]:
    if text == REQUIRED:
        return None, str
    if len(text) >= 2 and text[0] == text[-1] == "'":
        return text[1:-1].replace("''", "'"), str
    for kind in (int, float):
        try:
            return kind(text), kind
        except ValueError:
            pass
    return text, str


def parse_query(path: str | os.PathLike) -> NamedQuery:
    path = Path(path)
    text = path.read_text()
    fields: dict[str, str] = {}
    params = []
    for line in text.splitlines():
        if not line.startswith("--"):
            if line.strip():
                break  # the header ends at the first line of SQL
            continue
        m = _HEADER.match(line)
        if not m:
            continue
        key, value = m.groups()
        if key == "param":
            pm = _PARAM.match(value)
            if not pm:
                raise AnalysisError(f"{path}: bad param line {line!r} (want: -- param: NAME DEFAULT DESCRIPTION)")
            default, kind = _typed_default(pm.group(2))
            params.append(Param(pm.group(1), default, kind, pm.group(3)))
        else:
            fields[key] = value
    if "name" not in fields:
        raise AnalysisError(f"{path}: no '-- name:' header line")
    return NamedQuery(fields["name"], fields.get("description", ""), tuple(params), text, path)


def sql_dir(here: Path | None = None) -> Path:
    """Where the named queries live: ``prefcache/sql/`` when installed, else the repository's ``sql/``."""
    here = here or Path(__file__).resolve().parent
    for candidate in (here / "sql", here.parent / "sql"):
        if candidate.is_dir() and any(candidate.glob("*.sql")):
            return candidate
    raise AnalysisError(f"no named queries found (looked in {here / 'sql'} and {here.parent / 'sql'})")


def list_queries() -> list[NamedQuery]:
    """All named queries, sorted by name."""
    return sorted((parse_query(p) for p in sql_dir().glob("*.sql")), key=lambda q: q.name)


def get_query(name: str) -> NamedQuery:
    queries = {q.name: q for q in list_queries()}
    if name not in queries:
        raise AnalysisError(f"no named query {name!r} (known: {', '.join(queries)}; see `prefcache query --list`)")
    return queries[name]
