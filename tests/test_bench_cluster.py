"""bench.cluster runs end to end through HAProxy (SQLite, then two replicas on PostgreSQL)
and loses nothing.

A smoke run: it checks loss and duplication, not speed (figures: docs/cluster.md).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.stack import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

SMOKE = ("--clients", "6", "--rates", "4", "--seconds", "2", "--replicas", "2", "--haproxy")


def test_cluster_benchmark_smoke_run_loses_nothing() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.cluster", *SMOKE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "bench.cluster: nothing lost or doubled" in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.startswith(("sqlite", "postgresql"))]
    assert len(rows) == 2
    for row in rows:
        rate, acked_per_s, deliveries_per_s = (float(x) for x in row[26:53].split())
        assert rate == 4 and acked_per_s > 0 and deliveries_per_s >= acked_per_s * 5
    assert "deliveries/s at p99 <= 50 ms" in done.stdout
