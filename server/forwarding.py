"""The client's address behind a trusted proxy, from request headers.

For a connection from a trusted proxy (`server.trusted_proxies`), `forwarded_client`
gives the client's address from `X-Forwarded-For` or, without it, `Forwarded: for=`.
Proxies append the address they received from, so the list is read from the right,
skipping trusted proxies; the first address that is not one is the client. Everything
left of it was written by whoever sent the request and is not believed.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

from websockets.datastructures import Headers

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_FOR = re.compile(r'(?:^|;)\s*for\s*=\s*("[^"]*"|[^;,\s]*)', re.IGNORECASE)


def parse_address(text: str) -> IPAddress | None:
    """An IP address as headers write it: bare, `[v6]`, with a port or not; IPv4-mapped
    IPv6 addresses as IPv4. None for anything else (`unknown`, obfuscated names)."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # IPv4 with a port
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: IPAddress, trusted: Sequence[IPNetwork]) -> bool:
    return any(address in network for network in trusted)


def _forwarded_chain(headers: Headers) -> list[str]:
    """The addresses the proxies forwarded, oldest first, from every header line."""
    x_forwarded = headers.get_all("X-Forwarded-For")
    if x_forwarded:
        return [item for line in x_forwarded for item in line.split(",")]
    chain = []
    for line in headers.get_all("Forwarded"):
        for element in line.split(","):
            match = _FOR.search(element.strip())
            chain.append(match.group(1) if match else "")
    return chain


def forwarded_client(peer: str, headers: Headers, trusted: Sequence[IPNetwork]) -> str:
    """The client's address: the peer's own, unless the peer is a trusted proxy; then the
    right-most forwarded address that is not a trusted proxy. An entry that is not an IP
    address there (`unknown`, garbage) stops the search at the proxy's own address, so
    nothing a client writes can give it a fresh address."""
    address = parse_address(peer)
    if address is None or not _trusted(address, trusted):
        return peer
    for item in reversed(_forwarded_chain(headers)):
        forwarded = parse_address(item)
        if forwarded is None:
            break
        address = forwarded
        if not _trusted(forwarded, trusted):
            break
    return str(address)
