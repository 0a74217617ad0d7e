"""The client's address behind a reverse proxy: X-Forwarded-For from trusted proxies only."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from chat_server.forwarded import RESOLVE_AT_MOST, TrustedProxies
from tests.helpers import server, url


@pytest.mark.parametrize(
    ("spec", "peer", "headers", "client"),
    [
        ("", "10.0.0.2", ["203.0.113.7"], "10.0.0.2"),  # no proxy trusted: header ignored
        ("10.0.0.2", "10.0.0.9", ["203.0.113.7"], "10.0.0.9"),  # not from the proxy
        ("10.0.0.2", "10.0.0.2", ["203.0.113.7"], "203.0.113.7"),
        ("10.0.0.0/8", "10.0.0.2", ["198.51.100.1, 203.0.113.7"], "203.0.113.7"),  # forged left
        ("10.0.0.0/8", "10.0.0.2", ["203.0.113.7, 10.1.1.1"], "203.0.113.7"),  # two proxies
        ("10.0.0.0/8", "10.0.0.2", ["198.51.100.1", "203.0.113.7"], "203.0.113.7"),  # 2 lines
        ("10.0.0.2", "10.0.0.2", [], "10.0.0.2"),
        ("10.0.0.2", "10.0.0.2", ["not-an-address"], "10.0.0.2"),
        ("10.0.0.2", "10.0.0.2", ["[2001:db8::1]:4711"], "2001:db8::1"),
        ("localhost", "127.0.0.1", ["203.0.113.7:5000"], "203.0.113.7"),  # by host name
    ],
)
async def test_client_address(spec: str, peer: str, headers: list[str], client: str) -> None:
    assert await TrustedProxies(spec).client_ip(peer, headers) == client


async def test_connection_limit_counts_forwarded_clients_apart(db: Path) -> None:
    async with server(db, trusted_proxies="127.0.0.1", max_connections_per_ip=1) as chat:
        alice = {"X-Forwarded-For": "203.0.113.1"}
        bob = {"X-Forwarded-For": "203.0.113.2"}
        async with (
            connect(url(chat), additional_headers=alice),
            connect(url(chat), additional_headers=bob),
        ):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(url(chat), additional_headers=alice):
                    pass
            assert refused.value.response.status_code == 429


async def test_untrusted_peer_cannot_pick_its_address(db: Path) -> None:
    async with server(db, max_connections_per_ip=1) as chat:
        async with connect(url(chat), additional_headers={"X-Forwarded-For": "203.0.113.1"}):
            headers = {"X-Forwarded-For": "203.0.113.2"}
            with pytest.raises(InvalidStatus) as refused:
                async with connect(url(chat), additional_headers=headers):
                    pass
            assert refused.value.response.status_code == 429


async def test_a_restarted_proxy_with_a_new_address_is_trusted_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers = {"haproxy": "10.0.0.2"}

    async def getaddrinfo(host: str, *_: object, **__: object) -> list[tuple[object, ...]]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], 0))]

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
    proxies = TrustedProxies("haproxy")
    assert await proxies.client_ip("10.0.0.2", ["203.0.113.7"]) == "203.0.113.7"
    answers["haproxy"] = "10.0.0.3"  # the proxy container was recreated
    await asyncio.sleep(RESOLVE_AT_MOST + 0.1)
    assert await proxies.client_ip("10.0.0.3", ["203.0.113.7"]) == "203.0.113.7"
    assert await proxies.client_ip("10.0.0.2", ["203.0.113.7"]) == "10.0.0.2"
