"""The ``prefcache`` command line: a thin click layer over the Python API.

Each command family lives in its own module; they import only click at module level, so
``prefcache --help`` answers without loading torch, transformers or lm-eval.
"""

from __future__ import annotations

import importlib

import click

from prefcache import __version__

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
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="prefcache")
def main():
    """Preference optimisation (DPO and family) with a precomputed reference cache.

    \b
    The usual flow:
      prefcache precompute --data prefs.jsonl --out ref-cache --quantize 4bit
      prefcache train --data prefs.jsonl --cache ref-cache --out run1
      prefcache query reward_summary --run run1
      prefcache score run1/checkpoints/step-000100 --cache heldout-cache --data heldout.jsonl

    Run `prefcache COMMAND --help` for the options of each command.
    """
