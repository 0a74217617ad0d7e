"""Runs every command of the lab guide on the compose deployment and checks what it says.

Each ```sh block in docs/lab/en.md is followed by checks in HTML comments:
``re PATTERN`` (the output matches), ``exit N``, ``lines N`` (non-empty output lines),
``save NAME`` / ``same NAME`` / ``differs NAME`` (compare outputs of two commands).
The Spanish guide must hold exactly the same commands and checks.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.stack import ROOT, Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

LAB = ROOT / "docs" / "lab"
BLOCK = re.compile(r"```sh\n(.*?)```\n((?:<!-- check: .*? -->\n)+)?", re.S)
CHECK = re.compile(r"<!-- check: (\w+) ?(.*?) -->")


@dataclass
class Step:
    command: str
    checks: list[tuple[str, str]]


def steps(path: Path) -> list[Step]:
    found = []
    for match in BLOCK.finditer(path.read_text()):
        checks = CHECK.findall(match.group(2) or "")
        assert checks, f"{path.name}: a command without checks:\n{match.group(1)}"
        found.append(Step(match.group(1).strip(), checks))
    return found


def test_guides_hold_the_same_commands_and_checks() -> None:
    english, spanish = steps(LAB / "en.md"), steps(LAB / "es.md")
    assert len(english) > 20
    assert english == spanish


def test_every_lab_command_does_what_the_guide_says(stack: Stack) -> None:
    saved: dict[str, str] = {}
    for n, step in enumerate(steps(LAB / "en.md")):
        command = step.command.replace("compose-chat_", f"{stack.project}_")
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=ROOT,
            env=stack.env,
            capture_output=True,
            text=True,
            timeout=600,
            stdin=subprocess.DEVNULL,
        )
        out = (done.stdout + done.stderr).replace("\r", "").strip()
        where = f"step {n}: {step.command}\n--- output (exit {done.returncode}):\n{out}"
        expected_exit = [int(arg) for kind, arg in step.checks if kind == "exit"]
        if expected_exit:
            assert done.returncode == expected_exit[0], where
        else:
            assert done.returncode == 0, where
        stdout = done.stdout.replace("\r", "").strip()
        for kind, arg in step.checks:
            if kind == "re":
                assert re.search(arg.replace("compose-chat_", f"{stack.project}_"), out, re.M), (
                    f"no match for {arg!r} in {where}"
                )
            elif kind == "lines":
                assert len([ln for ln in stdout.splitlines() if ln.strip()]) == int(arg), where
            elif kind == "save":
                saved[arg] = stdout
            elif kind == "same":
                assert stdout == saved[arg], where
            elif kind == "differs":
                assert stdout != saved[arg], where
            else:
                assert kind == "exit", f"unknown check {kind}"
