"""The processor's ICE candidates, kept to the relay's allow-list.

With an allow-list the relay reaches only the hosts it names, its media included: a candidate in
the processor's answer whose address is not an allowed host is removed before the answer is
applied, so that no connectivity check (and no media) is ever sent there. The allowed names are
resolved when the answer arrives and a candidate is kept when its address is one they resolve to:
`localhost` allows what it resolves to (127.0.0.1 and ::1 on most systems, not the rest of
127.0.0.0/8), an IP address in the list allows itself. An IPv4-mapped IPv6 address counts as its
IPv4 address, and a zone (`fe80::1%eth0`) is ignored. A candidate given by name (mDNS, `….local`)
is kept only when that very name is in the list.

A list that allows loopback allows this machine's own addresses too: a processor on this machine
answers with its host candidates, which are this machine's addresses (aiortc offers no loopback
candidate), and what is sent to them never leaves the machine.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket

from aioice.ice import get_host_addresses

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_CANDIDATE = "a=candidate:"


class Allowed:
    """The addresses and names an allow-list stands for at one moment."""

    def __init__(self, addresses: frozenset[IPAddress], names: frozenset[str]) -> None:
        self.addresses = addresses
        self.names = names

    @classmethod
    async def resolve(cls, hosts: frozenset[str]) -> Allowed:
        """Resolve every host of the list at once; one that does not resolve allows nothing."""
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(loop.getaddrinfo(host, None, type=socket.SOCK_DGRAM) for host in hosts),
            return_exceptions=True,
        )
        addresses: set[IPAddress] = set()
        for host, result in zip(hosts, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("allowed host %r does not resolve: %s", host, result)
                continue
            addresses.update(address for *_, sockaddr in result if (address := _ip(str(sockaddr[0]))))
        if any(address.is_loopback for address in addresses):
            own = get_host_addresses(use_ipv4=True, use_ipv6=True)
            addresses.update(address for text in own if (address := _ip(text)))
        return cls(frozenset(addresses), frozenset(host.lower() for host in hosts))

    def admits(self, address: str) -> bool:
        ip = _ip(address)
        return ip in self.addresses if ip is not None else address.lower() in self.names


def keep_allowed(sdp: str, allowed: Allowed) -> tuple[str, list[str], int]:
    """`sdp` without the candidates `allowed` does not admit: the SDP, the addresses removed, and
    how many candidates are left. A candidate line too short to name an address is removed."""
    kept: list[str] = []
    removed: list[str] = []
    left = 0
    for line in sdp.splitlines(keepends=True):
        if line.startswith(_CANDIDATE):
            # foundation component transport priority address port "typ" type ...
            fields = line[len(_CANDIDATE) :].split()
            address = fields[4] if len(fields) >= 8 else line.strip()
            if len(fields) < 8 or not allowed.admits(address):
                removed.append(address)
                continue
            left += 1
        kept.append(line)
    return "".join(kept), removed, left


def _ip(text: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
