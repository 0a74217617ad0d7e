"""Run the real server as a subprocess, the way users and containers run it."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

LISTENING = re.compile(r"listening on [\d.]+:(\d+)")


def line_client_command(url: str, nick: str, state: Path, *extra: str) -> list[str]:
    """The command line of a line-mode ``chat-client`` with its own state directory."""
    command = [sys.executable, "-m", "chat_client", "--url", url, "--nick", nick]
    return [*command, "--state-dir", str(state), "--mode", "line", *extra]


class ServerProcess:
    def __init__(
        self,
        db: Path,
        *args: str,
        port: int = 0,
        nofile: tuple[int, int] | None = None,
        uvloop: bool = True,
    ) -> None:
        self.db = db
        self.args = args
        self.port = port
        #: (soft, hard) limit on open files to start it with, as a container might.
        self.nofile = nofile
        #: False: run on asyncio's own loop, as without the optional uvloop installed.
        self.uvloop = uvloop
        self.proc: subprocess.Popen[str] | None = None
        self.log: list[str] = []

    def start(self, timeout: float = 15.0) -> ServerProcess:
        run = ["-m", "chat_server"]
        if not self.uvloop:
            code = "import sys; sys.modules['uvloop'] = None; from chat_server.__main__ import main"
            run = ["-c", code + "; main()"]
        cmd = [sys.executable, *run, "--port", str(self.port), "--db", str(self.db)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        nofile = self.nofile

        def limit_files() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

        self.proc = subprocess.Popen(
            [*cmd, *self.args],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=limit_files if nofile is not None else None,
        )
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            match = LISTENING.search(line)
            if match:
                self.port = int(match.group(1))  # keep it across restarts
                # Keep draining stderr so a chatty server never blocks on a full pipe.
                threading.Thread(target=self._drain, daemon=True).start()
                return self
        raise RuntimeError("server did not start:\n" + "".join(self.log))

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def terminate(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
