"""The client's real address behind a reverse proxy (``X-Forwarded-For``, trusted proxies).

Behind HAProxy every connection comes from HAProxy's address, so limits per address
would lump every user together. HAProxy (``option forwardfor``) adds the address it saw
to ``X-Forwarded-For``; the server believes that header only when the connection comes
from a proxy it trusts (``CHAT_TRUSTED_PROXIES``), and then takes the right-most address
in it that is not itself a trusted proxy — anything left of it could be forged by the
client. Proxies are named by address, network (``10.0.0.0/8``) or host name
(``haproxy``: resolved, and again every :data:`RESOLVE_EVERY` seconds, or at most once a
second when a peer sending ``X-Forwarded-For`` is not among them: a restarted proxy
container may have a new address).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Iterable

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

RESOLVE_EVERY = 10.0
RESOLVE_AT_MOST = 1.0


def _address(text: str) -> Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class TrustedProxies:
    """Decides the client address of a connection from its peer and its headers."""

    def __init__(self, spec: str) -> None:
        self.networks: list[Network] = []
        self.hosts: list[str] = []
        for entry in (part.strip() for part in spec.split(",")):
            if not entry:
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.hosts.append(entry)
        self._resolved: set[Address] = set()
        self._resolved_at = float("-inf")

    def __bool__(self) -> bool:
        return bool(self.networks or self.hosts)

    async def _refresh(self, every: float = RESOLVE_EVERY) -> None:
        if not self.hosts or time.monotonic() - self._resolved_at < every:
            return
        self._resolved_at = time.monotonic()
        loop = asyncio.get_running_loop()
        resolved: set[Address] = set()
        for host in self.hosts:
            try:
                infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            except OSError as exc:
                log.warning("trusted proxy %r does not resolve: %s", host, exc)
                continue
            for info in infos:
                address = _address(str(info[4][0]))
                if address is not None:
                    resolved.add(address)
        self._resolved = resolved

    async def resolve(self) -> None:
        """Resolve the proxies' host names now (at start, before the first connection)."""
        await self._refresh(0)

    def known(self, peer: str) -> bool:
        """Whether ``peer`` is a trusted proxy, as far as is known without waiting."""
        address = _address(peer)
        return address is not None and self._trusted(address)

    def _trusted(self, address: Address) -> bool:
        return address in self._resolved or any(address in net for net in self.networks)

    async def client_ip(self, peer: str, forwarded_for: Iterable[str]) -> str:
        """The client's address: the peer's, unless the peer is a trusted proxy."""
        if not self:
            return peer
        address = _address(peer)
        if address is None:
            return peer
        await self._refresh()
        hops = [hop for header in forwarded_for for hop in header.split(",")]
        if not self._trusted(address) and hops:
            await self._refresh(RESOLVE_AT_MOST)  # the proxy may have a new address
        if not self._trusted(address):
            return peer
        for hop in reversed(hops):
            found = _address(hop)
            if found is None:
                return str(address)  # garbage in the chain: stop at what we know
            address = found
            if not self._trusted(address):
                break
        return str(address)
