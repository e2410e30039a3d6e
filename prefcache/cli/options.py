"""Options several commands share: ``--config FILE``, ``--revision``, and the data source / mapping options.

``--config`` is eager: it reads the YAML before any other option and hands it to click as the command's
``default_map``, so a value given on the command line wins over the file, and the file over the default.
"""

from __future__ import annotations

import click

from prefcache.core.runconfig import ConfigFileError, read_config
from prefcache.data.columns import unescape


def _to_defaults(command: click.Command, data: dict, path: str) -> dict:
    """Config-file values -> click defaults for ``command``'s parameters."""
    params = {p.name: p for p in command.params}
    for p in command.params:  # the option's own spelling too: `run:` for --run (whose parameter is `runs`)
        for opt in getattr(p, "opts", []):
            if opt.startswith("--"):
                params.setdefault(opt[2:].replace("-", "_"), p)
    defaults = {}
    for key, value in data.items():
        if key == "progress" and "no_progress" in params:  # the dataclass field behind --no-progress
            defaults["no_progress"] = not value
            continue
        if key == "config":
            continue
        if key not in params:
            options = ", ".join(sorted({p.name for p in command.params} - {"config"}))
            raise click.BadParameter(f"{path}: unknown key {key!r} for `prefcache {command.name}` (its options: {options})",
                                     param_hint="'--config'")
        param = params[key]
        key = param.name
        if value is None:
            if key == "max_grad_norm":  # None = no clipping, which the command line spells 0
                defaults[key] = 0.0
            continue  # the option's own default
        if isinstance(value, dict):
            value = ",".join(f"{k}={v}" for k, v in value.items())
        many = param.multiple or param.nargs == -1
        if isinstance(value, (list, tuple)) and not many:
            value = ",".join(str(v) for v in value)
        elif many and not isinstance(value, (list, tuple)):
            value = [value]
        defaults[key] = value
    return defaults


def _load_config(ctx: click.Context, param: click.Parameter, value):
    if not value:
        return value
    try:
        data = read_config(value)
    except ConfigFileError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from e
    ctx.default_map = {**(ctx.default_map or {}), **_to_defaults(ctx.command, data, value)}
    return value


def config_option(f):
    return click.option("--config", type=click.Path(exists=True, dir_okay=False), is_eager=True, expose_value=False,
                        callback=_load_config,
                        help="YAML file of options (keys = option names, e.g. max_length: 512); flags given "
                             "on the command line win. Every train/precompute run saves its own as config.yaml.")(f)


def revision_option(f):
    return click.option("--revision", default=None,
                        help="Hub revision (branch, tag or commit) when --model is a Hub id; or write ID@REV.")(f)


def _unescape(ctx, param, value):
    return unescape(value)


def data_options(eval_split: bool = False):
    """--split, --data-config, --columns and the templates (and --eval-split for train)."""

    def decorate(f):
        for name, what in (("rejected", "rejected completion"), ("chosen", "chosen completion")):
            f = click.option(f"--{name}-template", default=None, callback=_unescape,
                             help=f"Format string for the {what}, with {{{name}}} where it goes.")(f)
        f = click.option("--prompt-template", default=None, callback=_unescape,
                         help="Format string for the prompt, e.g. 'Question: {prompt}\\n\\nAnswer: ' (\\n = newline; "
                              "other {column}s of the row may appear too).")(f)
        f = click.option("--columns", default=None, metavar="TARGET=COLUMN,...",
                         help="The data's own column names, e.g. id=qid,prompt=question,chosen=response_j,rejected=response_k.")(f)
        f = click.option("--data-config", default=None, help="Subset (configuration) of a Hub dataset.")(f)
        if eval_split:
            f = click.option("--eval-split", default=None, help="Split of --eval-data (a Hub dataset or DatasetDict).")(f)
        f = click.option("--split", default=None,
                         help="Split of --data when it is a Hub dataset id or a DatasetDict (e.g. train_prefs).")(f)
        return f

    return decorate
