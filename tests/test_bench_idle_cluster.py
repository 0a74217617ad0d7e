"""The idle workload over several replicas on PostgreSQL (``chat-bench --replicas K``):
the way to show more idle connections than one process may hold open files for.

A small run checks that every connection opened and stayed open, where each went, and
that each replica's RSS and PostgreSQL's memory are reported; not how much memory.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import FD_MARGIN, raise_nofile
from bench.cluster import _mib
from tests.stack import ROOT

BENCH = (sys.executable, "-m", "bench", "--workloads", "idle")


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_idle_connections_are_spread_over_replicas_and_each_replicas_rss_reported(
    tmp_path: Path,
) -> None:
    out = tmp_path / "idle.json"
    done = subprocess.run(
        [*BENCH, "--idle", "90", "--replicas", "2", "--workers", "3", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = {
        (r["workload"], r["target"]): r["figures"] for r in json.loads(out.read_text())["results"]
    }
    assert set(results) == {("idle", "relay"), ("idle", "chat"), ("idle", "cluster")}
    # The baselines hold what one replica holds.
    for kind in ("relay", "chat"):
        assert results[("idle", kind)]["still_open"] == results[("idle", kind)]["connections"] == 45
    cluster = results[("idle", "cluster")]
    assert cluster["still_open"] == cluster["connections"] == 90
    assert cluster["servers"] == 2 and cluster["handshakes_retried"] == 0
    assert (cluster["generator_processes"], cluster["source_addresses"]) == (3, 3)
    replicas = cluster["per_server"]
    assert [r["connections"] for r in replicas] == [45, 45]
    for replica in replicas:
        assert 0 < replica["rss_before_mib"] < replica["rss_after_mib"]
    assert cluster["rss_after_mib"] == pytest.approx(
        sum(r["rss_after_mib"] for r in replicas), abs=0.2
    )
    # PostgreSQL held the replicas' connections and 90 sessions: it was measured, not idle.
    assert 0 < cluster["database_pss_mib_before"] < cluster["database_pss_mib_after"]
    assert cluster["database_docker_stats_mib_after"] > 0
    assert "idle cluster: 90 of 90 connections still open on 2 replicas" in done.stdout
    assert "replica 1: 45 connections" in done.stdout


def test_one_process_refuses_more_connections_than_its_open_files_and_names_the_way_out() -> None:
    limit = raise_nofile()  # what the benchmark's process (and so the server) may open
    most = limit - FD_MARGIN
    done = subprocess.run(
        [*BENCH, "--idle", str(5 * limit)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert f"--replicas {math.ceil(5 * limit / most)} or more" in done.stderr
    assert f"at most {most} idle connections each" in done.stderr


def test_docker_stats_sizes_are_read_in_mib() -> None:
    assert _mib("512KiB") == 0.5
    assert _mib(" 1.5GiB ") == 1536.0
    assert _mib("12.5MiB") == 12.5
    assert _mib("1MB") == pytest.approx(0.954, abs=0.001)
    with pytest.raises(ValueError, match="not a size"):
        _mib("lots")
