"""The ``prefcache`` command line: a thin click layer over the Python API.

Each command family lives in its own module; they import only click at module level, so
``prefcache --help`` answers without loading torch, transformers or lm-eval.
"""

from __future__ import annotations

import importlib
import sys

import click

from prefcache import __version__
from prefcache.core.allocator import current, maybe_reexec
from prefcache.core.quiet import quiet_libraries

# command name -> (module, attribute); imported when the command is used or listed.
COMMANDS = {
    "precompute": ("prefcache.cli.precompute", "precompute_cmd"),
    "inspect": ("prefcache.cli.precompute", "inspect_cmd"),
    "verify": ("prefcache.cli.precompute", "verify_cmd"),
    "train": ("prefcache.cli.train", "train_cmd"),
    "eval": ("prefcache.cli.evaluate", "eval_cmd"),
    "score": ("prefcache.cli.evaluate", "score_cmd"),
    "sql": ("prefcache.cli.sql", "sql_cmd"),
    "query": ("prefcache.cli.sql", "query_cmd"),
    "report": ("prefcache.cli.sql", "report_cmd"),
    "export": ("prefcache.cli.export", "export_cmd"),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return [*COMMANDS, *super().list_commands(ctx)]

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return super().get_command(ctx, name)
        module, attr = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)


# Commands that run models: they get jemalloc on CPU (see prefcache/core/allocator.py).
HEAVY = {"precompute", "train", "eval", "score", "env"}


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="prefcache")
@click.pass_context
def main(ctx):
    """Preference optimisation (DPO and family) with a precomputed reference cache.

    \b
    The usual flow:
      prefcache precompute --data prefs.jsonl --out ref-cache --quantize 4bit
      prefcache train --data prefs.jsonl --cache ref-cache --out run1
      prefcache query reward_summary --run run1
      prefcache score run1/checkpoints/step-000100 --cache heldout-cache --data heldout.jsonl

    Run `prefcache COMMAND --help` for the options of each command.
    On CPU, model-running commands re-exec once with jemalloc when it is installed
    (less memory, faster steps); set PREFCACHE_ALLOCATOR=system to keep the default.
    """
    if ctx.invoked_subcommand in HEAVY and not {"-h", "--help"} & set(sys.argv):
        maybe_reexec()


@main.command("env")
def env_cmd():
    """Print versions, devices and the memory allocator in use (paste it into bug reports)."""
    import platform

    import torch

    quiet_libraries()  # importing bitsandbytes below would print its CPU kernel notice
    rows = {"prefcache": __version__, "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "cuda available": torch.cuda.is_available(),
            "cpu threads": torch.get_num_threads(), "allocator": current()}
    for name in ("transformers", "peft", "bitsandbytes", "duckdb", "polars", "pyarrow", "lm_eval"):
        try:
            rows[name] = importlib.import_module(name).__version__
        except Exception as e:  # noqa: BLE001 - report, never fail, in a diagnostics command
            rows[name] = f"unavailable ({type(e).__name__})"
    if torch.cuda.is_available():
        rows["gpu"] = torch.cuda.get_device_name(0)
    for key, value in rows.items():
        click.echo(f"{key:<16} {value}")
