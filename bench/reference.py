"""How fast this machine's core is today: one fixed piece of Python, timed.

The same code on the same virtual machine ran the persistence workload at 13.6k acked
messages/s one night and 22.0k the next morning, with other processes taking at most 5 %
of the server's core both times: what changed was the host under the machine. So every
benchmark run also
times this fixed piece (JSON of a chat frame, the frame parsed back, a dict and a short
string method per message: the kind of work the server does per message) on the
server's core, and prints it next to the machine. Two runs' figures compare only as far
as their reference figures agree.

``python -m bench.reference`` prints it (µs per round, best of 7).
"""

from __future__ import annotations

import json
import time

FRAME = {
    "type": "msg",
    "id": 123456,
    "ts": 1764300000000,
    "room": "lobby",
    "from": "alice",
    "body": "b|0|0|0|" + "x" * 192,
}


def one_round() -> int:
    text = json.dumps(FRAME)
    frame = json.loads(text)
    seen = {key: len(str(value)) for key, value in frame.items()}
    return len(text) + sum(seen.values()) + len(frame["body"].strip())


def measure(rounds: int = 20_000, repeat: int = 7) -> float:
    """Microseconds per round: the best of ``repeat`` timings of ``rounds`` rounds."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(rounds):
            one_round()
        best = min(best, time.perf_counter() - started)
    return round(best / rounds * 1e6, 3)


if __name__ == "__main__":
    print(measure())
