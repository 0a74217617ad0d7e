"""The load generator's parent side: several worker processes, driven over pipes.

Clients are spread over the workers by id (client ``i`` lives in worker ``i % n``); a
command goes to some or all workers and their answers come back as a list.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

from bench import worker
from bench.targets import generator_cpus

#: Source addresses for many connections: each has its own ephemeral ports.
SOURCES = [f"127.0.0.{n}" for n in range(2, 34)]


class WorkerError(RuntimeError):
    pass


class Generator:
    def __init__(self, workers: int, cpus: Sequence[int] | None = None) -> None:
        self.cpus = list(cpus) if cpus is not None else generator_cpus()
        context = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.next_id = 0
        self.waiting: list[dict[int, Any]] = []
        for index in range(workers):
            parent, child = context.Pipe()
            proc = context.Process(target=worker.main, args=(child, index, self.cpus), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
            self.waiting.append({})

    @property
    def size(self) -> int:
        return len(self.conns)

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self.procs if proc.pid is not None]

    def split(self, ids: Sequence[int]) -> list[list[int]]:
        """Client ids per worker."""
        return [[i for i in ids if i % self.size == w] for w in range(self.size)]

    def submit(self, index: int, op: str, **args: Any) -> int:
        self.next_id += 1
        self.conns[index].send({"id": self.next_id, "op": op, **args})
        return self.next_id

    def result(self, index: int, ident: int, timeout: float = 600.0) -> Any:
        box = self.waiting[index]
        conn = self.conns[index]
        deadline = time.monotonic() + timeout
        while ident not in box:
            left = deadline - time.monotonic()
            if left <= 0 or not conn.poll(left):
                raise WorkerError(f"worker {index}: no answer to command {ident}")
            answer = conn.recv()
            box[answer["id"]] = answer
        answer = box.pop(ident)
        if "error" in answer:
            raise WorkerError(f"worker {index}:\n{answer['error']}")
        return answer["ok"]

    def call(self, index: int, op: str, **args: Any) -> Any:
        return self.result(index, self.submit(index, op, **args))

    def each(self, op: str, per_worker: Sequence[dict[str, Any]]) -> list[Any]:
        """Send each worker its own arguments; wait for all of them."""
        idents = [self.submit(w, op, **args) for w, args in enumerate(per_worker)]
        return [self.result(w, ident) for w, ident in enumerate(idents)]

    def all(self, op: str, **args: Any) -> list[Any]:
        """The same command to every worker."""
        return self.each(op, [args] * self.size)

    def close(self) -> None:
        for w in range(self.size):
            with contextlib.suppress(WorkerError, OSError, EOFError):
                self.call(w, "quit")
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
