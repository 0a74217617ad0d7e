"""bench.cluster runs end to end (SQLite, then two replicas on PostgreSQL) and loses nothing.

A smoke run: it checks loss and duplication, not speed (figures: docs/cluster.md).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.stack import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

SMOKE = ("--clients", "6", "--rate", "4", "--seconds", "2", "--replicas", "2")


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
        acked_per_s, deliveries_per_s = (float(x) for x in row[26:44].split())
        assert acked_per_s > 0 and deliveries_per_s >= acked_per_s * 5
