"""Each option declared once: a dataclass field carries its default, help, range and CLI spelling.

``option(default, help, ...)`` is :func:`dataclasses.field` with the facts about an option in its
``metadata`` (as TRL's ``HfArgumentParser`` reads them); ``check_options`` validates fields from those
facts, and :mod:`prefcache.cli.fields` builds the click options from the same fields. Nothing here
imports click, so the configs stay plain dataclasses for Python users.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, NamedTuple


class Range(NamedTuple):
    """Where a number option may lie: finite always, and within [low, high] (each end open or closed)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def span(self) -> str:
        if self.low is not None and self.high is not None:
            return f" in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f" {'>' if self.low_open else '>='} {self.low}"
        return f" {'<' if self.high_open else '<='} {self.high}" if self.high is not None else ""

    def check(self, name: str, value) -> None:
        if value is None:
            return
        if isinstance(value, tuple):  # loss_weights: each element
            for v in value:
                self.check(f"each {name.removesuffix('s').replace('_', ' ')}", v)
            return
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if ok and self.low is not None:
            ok = value > self.low if self.low_open else value >= self.low
        if ok and self.high is not None:
            ok = value < self.high if self.high_open else value <= self.high
        if ok:
            return
        if self == POSITIVE:  # `nan <= 0` is False: without the isfinite check NaN would pass as positive
            raise ValueError(f"{name} must be positive and finite, got {value}")
        raise ValueError(f"{name} must be a finite number{self.span()}, got {value}")


POSITIVE = Range(0, low_open=True)
FINITE = Range()


def option(default: Any = dataclasses.MISSING, help: str = "", *, range: Range | None = None,  # noqa: A002
           choices: tuple | None = None, metavar: str | None = None, default_text: str | None = None,
           replay: bool = True, cli_none: Any = None, escapes: bool = False, argument: bool = False,
           multiple: bool = False, cli: bool = True) -> Any:
    """A dataclass field declaring one option.

    help: the ``--help`` line. range / choices: checked on construction (:func:`check_options`) and
    shown by the CLI. metavar, default_text (``[default: ...]`` for a None default), argument (positional),
    multiple (a repeatable option): CLI spelling only. replay=False: a one-off action (``resume``), left
    out of the saved config.yaml. cli_none: how the command line spells None (max_grad_norm: 0).
    escapes: a template whose ``\\n``, ``\\t``, ``\\\\`` the command line types as escapes.
    """
    meta = {"help": help, "range": range, "choices": choices, "metavar": metavar, "default_text": default_text,
            "replay": replay, "cli_none": cli_none, "escapes": escapes, "argument": argument,
            "multiple": multiple, "cli": cli}
    return dataclasses.field(default=default, metadata=meta)


def own_fields(config, cls) -> list[dataclasses.Field]:
    """The fields ``cls`` itself declares (not its bases'): a group validates its own."""
    names = cls.__dict__.get("__annotations__", {})
    return [f for f in dataclasses.fields(config) if f.name in names]


def check_options(config, cls=None) -> None:
    """Validate every declared range and choice of ``config``'s fields (of ``cls``'s own fields)."""
    for f in own_fields(config, cls) if cls is not None else dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("range") is not None:
            f.metadata["range"].check(f.name, value)
        if f.metadata.get("choices") is not None and value is not None:
            _choice(f.name, value, f.metadata["choices"])


def ordered_fields(cls) -> list[dataclasses.Field]:
    """``cls``'s fields, its own first (data, out, ...), then its bases' in declaration order: the order of
    ``--help`` and of config.yaml."""
    own = cls.__dict__.get("__annotations__", {})
    fields = dataclasses.fields(cls)
    return [f for f in fields if f.name in own] + [f for f in fields if f.name not in own]


def given(config, names) -> set[str]:
    """The options among ``names`` set away from their declared defaults."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    return {n for n in names if n in fields and getattr(config, n) != fields[n].default}


def replayed(config) -> dict:
    """``config`` as a flat dict without its one-off actions (``replay=False``): what config.yaml holds."""
    values = dataclasses.asdict(config)
    return {f.name: values[f.name] for f in ordered_fields(type(config)) if f.metadata.get("replay", True)}


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")


def _positive(name: str, value) -> None:
    POSITIVE.check(name, value)


def _in_range(name: str, value, low: float, high: float | None = None, *, high_open: bool = False) -> None:
    """A finite number in [low, high] ([low, high) with high_open; no upper bound with high None)."""
    Range(low, high, high_open=high_open).check(name, value)


DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device(device: str) -> None:
    """Refuse a device name torch would reject only after the model loaded (e.g. 'tpu9', 'gpu')."""
    if not isinstance(device, str) or not DEVICE_PATTERN.match(device):
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")


def check_revision(model, revision) -> None:
    """``ID@a`` with ``revision`` b names two revisions: refuse it rather than pick one silently."""
    if model is None or revision is None:
        return
    repo, at, rev = str(model).partition("@")
    if at and rev and rev != revision:
        raise ValueError(f"model {model} names revision {rev!r} but revision is {revision!r}: give one "
                         f"(--model {repo}@{revision}, or --model {repo} --revision {revision})")


def _names(value) -> tuple:
    """'a,b' or ['a', 'b'] -> ('a', 'b')."""
    if isinstance(value, str):
        value = value.split(",")
    return tuple(v.strip() if isinstance(v, str) else v for v in value if not (isinstance(v, str) and not v.strip()))


def _str_names(value) -> tuple[str, ...]:
    """None, 'a,b', or a list of strings / paths -> ('a', 'b')."""
    return tuple(str(v) for v in _names(value or ()))
