"""quiet: the library noise of every run is gone, and nothing else is."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

from prefcache.core.quiet import BNB_LOGGER, git_commit_quietly, quiet_libraries

IMPORT_PEFT = "import peft, bitsandbytes"


def _stderr(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stderr


def test_bitsandbytes_kernel_notice_is_dropped_on_import():
    """The CPU kernel notice (printed where bitsandbytes has no CPU kernels, as on this project's CPU machines) is
    gone, and every other line the imports print is still there."""
    loud = _stderr(IMPORT_PEFT)
    quiet = _stderr(f"from prefcache.core.quiet import quiet_libraries; quiet_libraries(); {IMPORT_PEFT}")
    assert "gemm_4bit_forward" not in quiet
    assert quiet.splitlines() == [line for line in loud.splitlines() if "gemm_4bit_forward" not in line]


def test_only_the_kernel_notice_is_filtered(caplog):
    quiet_libraries()
    quiet_libraries()  # idempotent: one filter
    logger = logging.getLogger(BNB_LOGGER)
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=BNB_LOGGER):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community")
        logger.warning("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"]


def test_only_the_checkpointing_deprecations_are_silenced():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_libraries()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1)
        warnings.warn("`gradient_checkpointing_enable` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1)
        warnings.warn("`something_else` is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["`something_else` is deprecated"]


def test_lm_eval_git_lookup_outside_a_repository_is_silent(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    git_commit_quietly()
    assert "fatal" not in capfd.readouterr().err
