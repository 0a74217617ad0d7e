"""Log lines an attacker can cause, at most one per kind per interval.

A flood (thousands of refused connections a second, a process out of file descriptors)
must not turn into a flood of log lines: the log is what an operator reads to find out
what happened, and writing it costs CPU and disk. The first occurrence of a kind is
logged at once; later ones within ``interval`` seconds are counted, and the next line
logged says how many were left out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class LogThrottle:
    """At most one line per ``key`` every ``interval`` seconds, with a count of the rest."""

    __slots__ = ("_clock", "_seen", "interval", "logger")

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self._clock = clock
        #: key -> (when it was last logged, occurrences left out since)
        self._seen: dict[str, tuple[float, int]] = {}

    def log(self, level: int, key: str, message: str, *args: object, **kwargs: object) -> bool:
        """Log ``message % args`` unless ``key`` was logged within the interval; True if
        it was logged now. ``kwargs`` go to :meth:`logging.Logger.log` (``exc_info``)."""
        now = self._clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.interval:
            self._seen[key] = (last[0], last[1] + 1)
            return False
        if len(self._seen) > 1024:  # keys may hold addresses: keep only recent ones
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.interval}
        if last is not None and last[1]:
            message += " (and %d more like this in the last %.0f s)"
            args = (*args, last[1], now - last[0])
        self._seen[key] = (now, 0)
        self.logger.log(level, message, *args, **kwargs)  # type: ignore[arg-type]
        return True

    def warning(self, key: str, message: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, message, *args)
