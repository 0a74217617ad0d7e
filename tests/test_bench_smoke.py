"""A small run of the benchmark, so that it keeps working. Figures are not judged here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--clients",
            "10",
            "--seconds",
            "1",
            "--rates",
            "1,2",
            "--idle",
            "200",
            "--senders",
            "4",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "fanout server CPU chat/relay" in done.stdout
    results = {
        (r["workload"], r["target"]): r["figures"] for r in json.loads(out.read_text())["results"]
    }
    assert set(results) == {
        ("fanout", "relay"),
        ("fanout", "chat"),
        ("saturation", "relay"),
        ("saturation", "chat"),
        ("idle", "relay"),
        ("idle", "chat"),
        ("persistence", "chat"),
    }
    for kind in ("relay", "chat"):
        fanout = results[("fanout", kind)]
        assert fanout["expected"] > 0
        assert fanout["lost"] == 0
        assert fanout["duplicated"] == 0
    persistence = results[("persistence", "chat")]
    assert persistence["acked_total"] > 0
    assert persistence["acked_but_not_stored"] == 0
