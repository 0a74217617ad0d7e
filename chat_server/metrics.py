"""What a replica reports on ``GET /metrics``, in Prometheus text format (prometheus-client).

Scrape every replica (in compose: DNS service discovery on the name ``server``). Rates
are the scraper's job: ``rate(chat_messages_total[1m])`` is messages per second.
The process collectors of the default registry add CPU, memory and open files.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

CONNECTIONS = Gauge("chat_connections", "Open WebSocket connections on this replica")
MESSAGES = Counter("chat_messages_total", "Messages committed by this replica's writer")
ACKS = Counter("chat_acks_total", "Acks sent (retries of a stored cid included)")
DELIVERIES = Counter("chat_deliveries_total", "msg frames written to clients")
COMMIT_SECONDS = Histogram(
    "chat_commit_seconds",
    "Time to store one batch (one commit)",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
)
BATCH_SIZE = Histogram(
    "chat_batch_messages",
    "Messages per group commit",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
)
FANOUT_LAG = Histogram(
    "chat_fanout_lag_seconds",
    "Cluster: from a batch's commit timestamp to its delivery on this replica",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
)
RESUME_GAPS = Counter("chat_resume_gaps_total", "Replays cut at resume_cap (a gap frame sent)")
ERRORS = Counter("chat_errors_total", "error frames sent, by code", ["code"])
STREAM_UP = Gauge("chat_stream_up", "Cluster: 1 while the LISTEN stream is connected")
STREAM_POSITION = Gauge("chat_stream_position", "Cluster: newest message id delivered here")


def exposition() -> tuple[bytes, str]:
    """The current metrics and their content type."""
    return generate_latest(), CONTENT_TYPE_LATEST
