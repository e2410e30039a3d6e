"""`prefcache sql` stays bounded (fetches what it shows, caps memory), stops on Ctrl-C, and reads only
the folders it was given (DuckDB's temp folder included)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prefcache.analysis.views import AnalysisError, connect

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
HUGE = "SELECT a.range AS x FROM range(100000000) a, range(100000000) b"  # 1e16 rows


def prefcache(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "prefcache", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, **kwargs)


def test_max_rows_fetches_only_what_is_shown():
    with connect() as a:
        assert a.sql(HUGE, fetch_rows=6).height == 6
    p = prefcache("sql", HUGE, "--max-rows", "5")
    out, err = p.communicate(timeout=120)  # materialising 1e16 rows would never end
    assert p.returncode == 0, err
    assert "(5 rows shown, more not fetched" in out


READY_THEN_SQL = """
import sys
import duckdb, polars, prefcache.analysis.views, prefcache.cli.sql  # the imports done, Ctrl-C lands in the command
from prefcache.cli import main
print("ready", flush=True)
main(["sql", sys.argv[1]])
"""


def test_ctrl_c_stops_a_running_query_with_one_line():
    query = "SELECT count(*) FROM range(100000000) a, range(100000000) b WHERE a.range + b.range < 0"  # hours
    p = subprocess.Popen([sys.executable, "-c", READY_THEN_SQL, query], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=ENV)
    assert p.stdout.readline().strip() == "ready"
    time.sleep(2)  # the query is running (an interrupt while it connects is caught by the same handler)
    assert p.poll() is None
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130 and err.strip() == "interrupted", err


def test_memory_is_capped_and_spills_go_to_a_private_folder_removed_on_close():
    with connect(memory_limit="300MB") as a:
        limit = a.sql("SELECT current_setting('memory_limit') AS m")["m"][0]
        temp = a.sql("SELECT current_setting('temp_directory') AS t")["t"][0]
        assert limit in ("286.1 MiB", "300.0 MB"), limit
        assert Path(temp).is_dir() and (Path(temp).stat().st_mode & 0o077) == 0
        assert ".tmp" not in Path(temp).name
    assert not Path(temp).exists()


@pytest.mark.parametrize("path", [".tmp/secret.txt", "secret.txt", "/etc/hostname"])
def test_nothing_outside_the_given_folders_can_be_read(tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "secret.txt").write_text("secret")
    (tmp_path / "secret.txt").write_text("secret")
    with connect() as a:
        with pytest.raises(AnalysisError):
            a.sql(f"SELECT content FROM read_text('{path}')")
        with pytest.raises(AnalysisError):
            a.sql(f"SELECT * FROM read_csv('{path}')")
