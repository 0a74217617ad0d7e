"""The benchmark's small tools: they run, and measure what they say."""

import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from bench import procstat, reference, sendpath, storage


def test_sendpath_times_every_piece() -> None:
    figures = sendpath.measure(number=200)
    assert set(figures) == {"ack", "msg frame", "decode", "parse send", "two quota takes"}
    assert all(value > 0 for value in figures.values())


def test_storage_drops_the_indexes_it_is_told_to(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    storage.create(path, ["messages_channel", "messages_dm_sender"])
    with sqlite3.connect(path) as db:
        indexes = {
            row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
        }
    assert "messages_channel" not in indexes and "messages_dm_sender" not in indexes
    assert {"messages_sender_cid", "messages_dm_recipient"} <= indexes
    result = storage.measure([8], 0.05, str(tmp_path), drop=["messages_channel"], ways=["sqlite3"])
    assert result["dropped_indexes"] == ["messages_channel"]
    assert [row["way"] for row in result["results"]] == ["sqlite3"]
    assert result["results"][0]["rows_per_s"] > 0


def test_a_window_measures_its_processes_cores_and_the_hosts_steal() -> None:
    window = procstat.Window(os.getpid(), [], server_core=None)
    window.start()
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:
        pass  # this process is the "server": a busy loop
    figures = window.stop()
    assert figures["server_cpu_pct"] > 50
    assert 0.0 <= figures["host_steal_pct"] <= 100.0
    busy = [value for name, value in figures.items() if name.endswith("_busy_pct")]
    assert len(busy) == os.cpu_count()
    # The steal a window reports is /proc/stat's steal column, read between two reads.
    low = _stolen()
    steal = sum(stolen for _, _, stolen in procstat.core_times().values())
    assert low <= steal <= _stolen()


def _stolen() -> int:
    with open("/proc/stat") as file:
        return sum(int(line.split()[8]) for line in file if line[3].isdigit())


def test_the_reference_round_is_timed_and_slower_when_the_core_is_shared() -> None:
    alone = reference.measure(rounds=2_000, repeat=3)
    assert 0 < alone < 10_000
    # The same rounds while a second thread competes for the interpreter take longer:
    # the figure measures the core this process gets, not a constant.
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    other = threading.Thread(target=spin)
    other.start()
    try:
        shared = reference.measure(rounds=2_000, repeat=3)
    finally:
        stop.set()
        other.join()
    assert shared > alone


def test_the_throughput_workloads_use_at_most_one_generator_process_per_core(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bench import __main__ as cli

    monkeypatch.setattr(cli, "generator_cpus", lambda: [1])
    assert cli.throughput_workers(2) == 1
    monkeypatch.setattr(cli, "generator_cpus", lambda: [1, 2, 3])
    assert (cli.throughput_workers(2), cli.throughput_workers(5)) == (2, 3)
