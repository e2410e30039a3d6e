"""Library noise a user would see on every run, removed where prefcache uses the library.

Only these messages, each harmless here, are dropped; every other warning and log line still shows:
- bitsandbytes on CPU logs, when it is imported (peft imports it even for fp32 runs), that it cannot
  fetch an optional ``gemm_4bit_forward`` kernel from the Hub. Its own fallback is correct (see
  ``models.keep_4bit_layers_differentiable``).
- transformers 5 deprecates ``is_gradient_checkpointing`` / ``gradient_checkpointing_enable``; peft
  still calls them (prefcache itself calls the new names, see ``policy.enable_checkpointing``).
- lm-eval runs ``git describe`` to record the working directory's commit, and git prints "fatal: not a
  git repository" outside one. The same command runs with its stderr dropped.
"""

from __future__ import annotations

import logging
import os
import subprocess
import warnings
from contextlib import contextmanager

BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
_DEPRECATED = r"`(is_gradient_checkpointing|gradient_checkpointing_enable)` is deprecated"


class _DropKernelNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "gemm_4bit_forward" not in record.getMessage()


def quiet_libraries() -> None:
    """Install the filters (idempotent). Call before torch-side libraries are imported."""
    logger = logging.getLogger(BNB_LOGGER)
    if not any(isinstance(f, _DropKernelNotice) for f in logger.filters):
        logger.addFilter(_DropKernelNotice())
    warnings.filterwarnings("ignore", message=_DEPRECATED, category=FutureWarning)


def git_commit_quietly() -> str | None:
    """lm-eval's ``get_git_commit_hash``, without git's complaint outside a repository."""
    from lm_eval.loggers.utils import get_commit_from_path

    try:
        return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return get_commit_from_path(os.getcwd())


@contextmanager
def quiet_lm_eval():
    """lm-eval's evaluator with :func:`git_commit_quietly` in place of its git call."""
    import lm_eval.evaluator as evaluator

    original = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = git_commit_quietly
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original
