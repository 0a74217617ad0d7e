"""The per-message pieces of the send path, each timed alone: ``python -m bench.sendpath``.

The persistence workload says how many messages per second the server acknowledges and
the profile says where its time goes; this says what one piece costs per message, in
microseconds (best of 5 repeats of ``--number`` calls), so a change to one piece can be
measured without the noise of a whole run on a shared machine:

- ``ack``: the ``ack`` frame's bytes; ``msg frame``: the ``msg`` frame's, through the
  frame cache with no budget (encoded every time);
- ``decode``: a ``send`` frame's text to a dict; ``parse send``: that dict to a ``Send``;
- ``two quota takes``: the per-nick and per-address message quotas, as a send takes them.

It prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import timeit
from collections.abc import Callable, Sequence
from typing import Any

from chat_protocol import encode
from chat_protocol.frames import decode, parse_client_frame
from chat_server.encoding import ack_frame
from chat_server.messages import EncodedFrames, StoredMessage
from chat_server.ratelimit import Limit, Quotas, Rule

BODY = "b|0|0|0|" + "x" * 192  # as the persistence workload sends


def measure(number: int) -> dict[str, float]:
    def best(call: Callable[[], Any]) -> float:
        return round(min(timeit.repeat(call, number=number, repeat=5)) / number * 1e6, 3)

    message = StoredMessage(123456, 1764400000000, "p1", "p1", "p1", None, None, False, BODY, "c1")
    frames = EncodedFrames(budget=0)
    text = encode({"type": "send", "cid": "c1", "room": "p1", "body": BODY}).decode()
    frame = decode(text)
    quotas = Quotas(
        {Limit.NICK_MESSAGES: Rule(100_000, 100_000), Limit.ADDRESS_MESSAGES: Rule(0, 0)}
    )

    async def takes() -> float:
        started = time.perf_counter()
        for _ in range(number):
            await quotas.take(Limit.NICK_MESSAGES, "p1", 1.0)
            await quotas.take(Limit.ADDRESS_MESSAGES, "127.0.0.1", 1.0)
        return (time.perf_counter() - started) / number * 1e6

    return {
        "ack": best(lambda: ack_frame(message, None)),
        "msg frame": best(lambda: frames(message)),
        "decode": best(lambda: decode(text)),
        "parse send": best(lambda: parse_client_frame(frame)),
        "two quota takes": round(min(asyncio.run(takes()) for _ in range(3)), 3),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sendpath", description=__doc__)
    parser.add_argument("--number", type=int, default=200_000, help="calls per repeat")
    args = parser.parse_args(argv)
    json.dump(measure(args.number), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
