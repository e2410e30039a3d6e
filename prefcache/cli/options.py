"""``--config FILE``: a YAML file of options, read before any other option and handed to click as defaults.

``--config`` is eager: it reads the YAML before any other option and hands it to click as the command's
``default_map``, so a value given on the command line wins over the file, and the file over the default.
Keys are field names (``max_length``; ``max-length`` too) or an option's own spelling (``json`` for
``--json``, ``no_progress: true`` for ``--no-progress``). Files written by earlier versions still read:
their one-off ``resume:`` is not replayed (give ``--resume`` on the command line), ``max_grad_norm: null``
means no clipping.
"""

from __future__ import annotations

import click

from prefcache.core.runconfig import ConfigFileError, read_config


def _by_key(command: click.Command) -> dict[str, tuple[click.Parameter, bool]]:
    """Config-file key -> (parameter, negated): names, option spellings, and ``no_x`` for a ``--no-x`` flag."""
    keys = {}
    for p in command.params:
        keys[p.name] = (p, False)
        for opt in getattr(p, "opts", []):  # `run:` for --run (whose parameter is `runs`)
            if opt.startswith("--"):
                keys.setdefault(opt[2:].replace("-", "_"), (p, False))
        for opt in getattr(p, "secondary_opts", []):
            keys.setdefault(opt.lstrip("-").replace("-", "_"), (p, True))
    return keys


def _to_defaults(command: click.Command, data: dict, path: str) -> dict:
    """Config-file values -> click defaults for ``command``'s parameters."""
    keys = _by_key(command)
    defaults = {}
    for key, value in data.items():
        if key == "config":
            continue
        if key not in keys:
            options = ", ".join(sorted({p.name for p in command.params} - {"config"}))
            raise click.BadParameter(f"{path}: unknown key {key!r} for `prefcache {command.name}` (its options: {options})",
                                     param_hint="'--config'")
        param, negated = keys[key]
        meta = getattr(getattr(param, "field", None), "metadata", {})
        if not meta.get("replay", True):  # a one-off action, saved by earlier versions: never replayed
            if value:
                click.echo(f"{path}: {key}: {value} is not replayed from a config file; give --{param.name} on the "
                           "command line", err=True)
            continue
        if value is None:
            if meta.get("cli_none") is not None:  # None = e.g. no clipping, which the command line spells 0
                defaults[param.name] = meta["cli_none"]
            continue  # the option's own default
        if negated:
            value = not value
        if isinstance(value, dict):
            value = ",".join(f"{k}={v}" for k, v in value.items())
        many = param.multiple or param.nargs == -1
        if isinstance(value, (list, tuple)) and not many:
            value = ",".join(str(v) for v in value)
        elif many and not isinstance(value, (list, tuple)):
            value = [value]
        defaults[param.name] = value
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


class ResumableCommand(click.Command):
    """A command whose ``--resume`` continues a run with the options it saved: ``OUT/config.yaml`` gives the
    defaults of every option not on the command line (a ``--config`` file wins over it, the command line over
    both), so ``prefcache train --out run1 --resume --max-steps 400`` needs nothing else, and an option the
    command line leaves out never changes the run behind its back (the trackers, the loss)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        from prefcache.training.rundir import CONFIG_YAML, saved_options

        try:  # a first look at --out and --resume only; the real parse below reports any mistake
            given, _, _ = self.make_parser(ctx).parse_args(args=list(args))
            out = given.get("out") or (read_config(given["config"]).get("out") if given.get("config") else None)
        except (click.UsageError, ConfigFileError):
            given, out = {}, None
        if given.get("resume") and out and (saved := saved_options(out)):
            ctx.default_map = {**_to_defaults(self, saved, f"{out}/{CONFIG_YAML}"), **(ctx.default_map or {})}
        return super().parse_args(ctx, args)


def config_option(f):
    return click.option("--config", type=click.Path(exists=True, dir_okay=False), is_eager=True, expose_value=False,
                        callback=_load_config,
                        help="YAML file of options (keys = option names, e.g. max_length: 512); flags given "
                             "on the command line win. Every train/precompute run saves its own as config.yaml "
                             "(without the one-off --resume).")(f)
