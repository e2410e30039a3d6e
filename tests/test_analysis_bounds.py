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
from conftest import ENV, finish, read_line

from prefcache.analysis.views import AnalysisError, connect

HUGE = "SELECT a.range AS x FROM range(100000000) a, range(100000000) b"  # 1e16 rows


def prefcache(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "prefcache", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, **kwargs)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, all its threads together."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_max_rows_fetches_only_what_is_shown():
    with connect() as a:
        assert a.sql(HUGE, fetch_rows=6).height == 6
    p = prefcache("sql", HUGE, "--max-rows", "5")
    out, err = finish(p, timeout=120)  # materialising 1e16 rows would never end: killed then
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
    try:
        assert read_line(p, 120).strip() == "ready"
        # The query is running once the child has worked a CPU-second more: connecting and building the
        # views take milliseconds. (An interrupt while it connects is caught by the same handler.)
        start, deadline = cpu_seconds(p.pid), time.monotonic() + 120
        while cpu_seconds(p.pid) < start + 1.0:
            assert p.poll() is None, p.communicate(timeout=30)[1]
            assert time.monotonic() < deadline, "the query did not start within 120 s"
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        out, err = finish(p, timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=30)
    assert p.returncode == 130 and err.strip() == "interrupted", err


def test_memory_is_capped_and_spills_go_to_a_private_folder_removed_on_close():
    with connect(memory_limit="300MB") as a:
        limit = a.sql("SELECT current_setting('memory_limit') AS m")["m"][0]
        temp = a.sql("SELECT current_setting('temp_directory') AS t")["t"][0]
        assert limit in ("286.1 MiB", "300.0 MB"), limit
        assert Path(temp).is_dir() and (Path(temp).stat().st_mode & 0o077) == 0
        assert ".tmp" not in Path(temp).name
    assert not Path(temp).exists()


def duckdb_bytes(shown: str) -> tuple[float, float]:
    """DuckDB's memory_limit as it shows it: bytes, and how far that display may be from the setting in
    bytes (one decimal, cut: 6026 MiB shows as "5.8 GiB")."""
    number, unit = shown.split()
    scale = {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}[unit]
    return float(number) * scale, 0.1 * scale


def test_the_default_memory_limit_is_a_quarter_of_the_machine():
    """The README: DuckDB may use a quarter of the machine's memory (DuckDB's own default is 80%), in
    `prefcache sql` and in connect()."""
    from click.testing import CliRunner

    from prefcache.cli import main

    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    quarter = int(meminfo["MemTotal"].split()[0]) * 1024 / 4
    with connect() as a:
        shown = a.sql("SELECT current_setting('memory_limit') AS m")["m"][0]
    limit, rounding = duckdb_bytes(shown)
    assert abs(limit - quarter) <= rounding + 2**20, (shown, quarter / 2**30)  # + the whole MiB it is set in
    result = CliRunner().invoke(main, ["sql", "SELECT current_setting('memory_limit') AS m", "-f", "csv"])
    assert result.exit_code == 0 and result.output.splitlines() == ["m", shown], result.output


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
