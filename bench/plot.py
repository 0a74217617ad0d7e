"""The saturation curves as a picture: p99 latency against deliveries/s, server and relay.

``chat-bench --plot docs/saturation.png`` draws it at the end of a run, and
``python -m bench.plot docs/benchmarks.json docs/saturation.png`` from a saved run.
matplotlib is an optional dependency (``pip install 'compose-chat[bench]'``): only this
picture needs it, so the server, the client and the test suite do not carry it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

LIMIT_MS = 50.0


def check() -> None:
    """Fail early, before a long run, if matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit("--plot needs matplotlib: pip install 'compose-chat[bench]'")


def draw(results: Sequence[dict[str, Any]], path: str, title: str = "") -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, cpu) = plt.subplots(1, 2, figsize=(11, 4.2))
    busy_axis = cpu.twinx()
    styles = {"chat": ("compose-chat", "tab:blue", "o"), "relay": ("bare relay", "tab:gray", "s")}
    for result in results:
        if result["workload"] != "saturation" or "steps" not in result["figures"]:
            continue
        label, color, marker = styles[result["target"]]
        steps = result["figures"]["steps"]
        x = [s["deliveries_per_s"] / 1000 for s in steps]
        lat.plot(x, [s["p99_ms"] for s in steps], marker=marker, color=color, label=label)
        cpu.plot(
            x,
            [s["server_cpu_us_per_delivery"] for s in steps],
            marker=marker,
            color=color,
            label=f"{label}: server CPU-µs per delivery",
        )
        busy = [s.get("core0_busy_pct", 0.0) for s in steps]
        busy_axis.plot(x, busy, linestyle=":", color=color)
    lat.axhline(LIMIT_MS, color="tab:red", linestyle="--", linewidth=1, label="p99 limit 50 ms")
    lat.set_yscale("log")
    lat.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    lat.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    lat.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    lat.set_xlabel("deliveries/s (thousands)")
    lat.set_ylabel("p99 latency, ms (log)")
    lat.set_title("Saturation: p99 against load")
    lat.legend()
    lat.grid(True, which="both", alpha=0.3)
    cpu.set_xlabel("deliveries/s (thousands)")
    cpu.set_ylabel("server CPU-µs per delivery")
    cpu.set_title("Server cost per delivery; its core's busy % dotted")
    busy_axis.set_ylabel("server core busy %")
    busy_axis.set_ylim(0, 105)
    cpu.legend(loc="upper right", fontsize="small")
    cpu.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title, fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        sys.exit("usage: python -m bench.plot RESULTS.json OUT.png")
    check()
    with open(args[0]) as file:
        data = json.load(file)
    draw(data["results"], args[1], data.get("machine", ""))


if __name__ == "__main__":
    main()
