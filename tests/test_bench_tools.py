"""The persistence engineer's two small tools: they run, and measure what they say."""

import sqlite3
from pathlib import Path

from bench import sendpath, storage


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
