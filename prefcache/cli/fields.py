"""Click options built from an options dataclass: each option is declared once, as a field.

The field's default, help, range, choices and CLI spelling live in its ``metadata``
(:func:`prefcache.core.options.option`), as TRL's ``HfArgumentParser`` reads them; :func:`options_from`
turns every field into one click parameter. Spelling rules, the same for every command:

- ``max_length`` -> ``--max-length``; a field without a default is a required option (or an argument);
- a bool is ``--x/--no-x`` (so a saved ``x: true`` can be overridden from the command line);
- a tuple is comma-separated text (``--loss sigmoid,sft``), or a repeatable option with ``multiple``;
- choices become ``click.Choice``; ``cli_none`` is how the command line spells None (``--max-grad-norm 0``);
- a template's ``\\n``, ``\\t``, ``\\\\`` are unescaped when typed on the command line, never when they come
  from a config file (which holds what the command line meant).
"""

from __future__ import annotations

import dataclasses
import types
import typing

import click
from click.core import ParameterSource

from prefcache.core.options import Range, ordered_fields
from prefcache.data.columns import unescape

_TYPED = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


class FieldOption(click.Option):
    """A click option that remembers the field it was built from (config files read its metadata)."""

    def __init__(self, *args, field: dataclasses.Field, **kwargs):
        super().__init__(*args, **kwargs)
        self.field = field


def _base_type(hint):
    """``int | None`` -> int; ``tuple[str, ...]`` -> tuple."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def _callback(meta: dict):
    cli_none, escapes = meta.get("cli_none"), meta.get("escapes")
    if cli_none is None and not escapes:
        return None

    def convert(ctx: click.Context, param: click.Parameter, value):
        if escapes and ctx.get_parameter_source(param.name) in _TYPED:
            return unescape(value)
        return None if cli_none is not None and value == cli_none else value

    return convert


def _help(meta: dict) -> str:
    text = meta.get("help", "")
    rng: Range | None = meta.get("range")
    if rng is not None and (rng.high is not None or rng.low not in (None, 0)):  # positive, >= 0: unsaid
        text += f" ({rng.span().strip()})"
    return text


def _param(field: dataclasses.Field, hint) -> typing.Callable:
    meta, kind = field.metadata, _base_type(hint)
    name = field.name.replace("_", "-")
    required = field.default is dataclasses.MISSING
    if meta.get("argument"):
        return click.argument(field.name, nargs=-1, required=required)
    default = None if required else field.default
    kwargs = {"help": _help(meta), "required": required, "callback": _callback(meta), "metavar": meta.get("metavar")}
    if meta.get("default_text"):
        kwargs["show_default"] = meta["default_text"]
    elif default not in (None, (), ""):
        kwargs["show_default"] = True
    decls = [f"--{name}"]
    if kind is bool:
        decls = [f"--{name}/--no-{name}"]
    elif meta.get("choices"):
        kwargs["type"] = click.Choice(meta["choices"])
    elif kind in (int, float):
        kwargs["type"] = kind
    elif kind is tuple and meta.get("multiple"):
        kwargs["multiple"] = True
    elif kind is tuple:
        default = ",".join(map(str, default)) if default else None
    return click.option(*decls, field.name, cls=FieldOption, field=field, default=default, **kwargs)


def options_from(cls, *, only: tuple[str, ...] | None = None) -> typing.Callable:
    """A decorator adding one click parameter per field of ``cls`` (own fields first, then its groups'), or
    per field named in ``only`` (a command that shares a few options of a config, e.g. verify's --split)."""
    hints = typing.get_type_hints(cls)
    fields = [f for f in ordered_fields(cls) if (only is None or f.name in only) and f.metadata.get("cli", True)]

    def decorate(f):
        for field in reversed(fields):  # click lists the parameter applied last first
            f = _param(field, hints[field.name])(f)
        return f

    return decorate
