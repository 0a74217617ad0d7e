"""Replays the hand-typed session in docs/protocol.md against a real server.

A line the doc shows the server sending must match what the server sends: exactly,
except `ts`, `epoch` and `secret`, whose values vary. A line shortened with `…` must match on
its `type` and on every field it still shows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tests.helpers import peer, server

DOC = Path(__file__).parent.parent / "docs" / "protocol.md"
VARYING = {"ts", "epoch", "secret"}


def transcript_blocks() -> list[list[str]]:
    text = DOC.read_text()
    blocks = re.findall(r"```text\n(.*?)```", text, flags=re.S)
    return [[line for line in block.splitlines() if line[:2] in ("> ", "< ")] for block in blocks]


def matches(expected: Any, actual: Any) -> bool:
    if isinstance(expected, dict):
        return (
            isinstance(actual, dict)
            and expected.keys() == actual.keys()
            and all(k in VARYING or matches(v, actual[k]) for k, v in expected.items())
        )
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(expected) == len(actual)
            and all(matches(e, a) for e, a in zip(expected, actual, strict=True))
        )
    return bool(expected == actual)


def check(line: str, frame: dict[str, Any]) -> None:
    try:
        expected = json.loads(line)
    except ValueError:
        # Shortened with …: every "key":value pair still shown must hold.
        for key, raw in re.findall(r'"(\w+)":("[^"…]*"|\d+|true|false)', line):
            assert key in VARYING or frame.get(key) == json.loads(raw), (key, frame)
        return
    assert matches(expected, frame), f"doc says {line}\nserver sent {json.dumps(frame)}"


async def test_protocol_transcript_replays(db: Path) -> None:
    blocks = transcript_blocks()
    assert len(blocks) == 2
    secret = ""
    async with server(db, port=0) as chat:
        for block in blocks:
            async with peer(chat) as p:
                for line in block:
                    body = line[2:].replace("Fh3k…", secret)
                    if line.startswith("> "):
                        await p.ws.send(body)
                        continue
                    frame = await p.recv()
                    if frame.get("secret"):
                        secret = frame["secret"]
                    check(body.replace(f'"{secret}"', '"x"') if secret else body, frame)
                assert await p.quiet(0.3) == []
