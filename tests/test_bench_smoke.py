"""A small run of every benchmark workload, so that the benchmark keeps working.

Speed is not judged here (the benchmark measures it); what is checked is that every
workload ran and that nothing was lost, doubled or acknowledged without being stored.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.__main__ import report
from bench.workloads import Result

STORM_CLIENTS, STORM_ROOMS, STORM_BACKLOG = 60, 3, 4


def test_bench_smoke_run(tmp_path: Path) -> None:
    out, picture = tmp_path / "bench.json", tmp_path / "saturation.png"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--clients",
            "10",
            "--seconds",
            "0.5",
            "--rates",
            "1,2",
            "--idle",
            "200",
            "--memory",
            "50",
            "--memory-settle",
            "0.5",
            "--senders",
            "4",
            "--storage-seconds",
            "0.1",
            "--storm-clients",
            str(STORM_CLIENTS),
            "--storm-rooms",
            str(STORM_ROOMS),
            "--storm-backlog",
            str(STORM_BACKLOG),
            "--json",
            str(out),
            "--plot",
            str(picture),
        ],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stderr
    assert "fanout: server CPU per delivery chat/relay" in done.stdout, done.stdout
    data = json.loads(out.read_text())
    results = {(r["workload"], r["target"]): r["figures"] for r in data["results"]}
    assert set(results) == {
        ("fanout", "relay"),
        ("fanout", "chat"),
        ("saturation", "relay"),
        ("saturation", "chat"),
        ("idle", "relay"),
        ("idle", "chat"),
        ("memory", "chat"),
        ("persistence", "chat"),
        ("storm", "chat"),
    }
    for kind in ("relay", "chat"):
        fanout = results[("fanout", kind)]
        assert fanout["expected"] > 0
        assert (fanout["lost"], fanout["duplicated"], fanout["gaps"]) == (0, 0, 0)
        steps = results[("saturation", kind)]["steps"]
        assert steps and all(step["lost"] == 0 for step in steps)
        idle = results[("idle", kind)]
        assert idle["still_open"] == idle["connections"] == 200
    memory = results[("memory", "chat")]
    assert memory["traced_bytes_per_connection"] > 0 and memory["sites"]
    persistence = results[("persistence", "chat")]
    assert persistence["acked_total"] > 0
    assert persistence["acked_but_not_stored"] == 0
    assert persistence["mean_batch"] is not None
    assert all(row["rows_per_s"] > 0 for row in persistence["storage_only"]["results"])
    assert persistence["profile"]["threads"], persistence["profile"]
    storm = results[("storm", "chat")]
    assert storm["reconnect_errors"] == 0
    assert (storm["lost"], storm["duplicated"], storm["gaps"]) == (0, 0, 0)
    # Every client missed its room's backlog and got all of it back in the replay.
    assert storm["replayed_msgs"] >= STORM_CLIENTS * STORM_BACKLOG
    assert picture.read_bytes().startswith(b"\x89PNG")


def test_the_fanout_line_is_there_when_the_relay_used_no_measurable_cpu() -> None:
    """CPU comes in clock ticks: a short run's relay may use none, and the smoke run above
    once failed for want of this line."""
    fanout = {"server_cpu_us_per_delivery": 0.0, "p99_ms": 5.0, "lost": 0}
    results = [
        Result("fanout", "relay", fanout),
        Result("fanout", "chat", {**fanout, "server_cpu_us_per_delivery": 41.67}),
    ]
    text = report(results, {"before": (0, 0, 0), "after": (0, 0, 0), "reference_us": 7.7})
    assert "fanout: server CPU per delivery chat/relay = n/a" in text
