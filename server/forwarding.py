"""Addresses from request headers: the client behind a trusted proxy, and the Host name.

- `forwarded_client`: for a connection from a trusted proxy (`server.trusted_proxies`),
  the client's address from `X-Forwarded-For` or, without it, `Forwarded: for=`. Proxies
  append the address they received from, so the list is read from the right, skipping
  trusted proxies; the first address that is not one is the client. Everything left of
  it was written by whoever sent the request and is not believed.
- `host_name` / `is_loopback_name`: the name a request's `Host` header gives, for the
  DNS-rebinding check in server/routes.py.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

from websockets.datastructures import Headers

from server.addresses import is_loopback

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
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


def host_name(header: str) -> str | None:
    """The name in a Host header (`name`, `name:port`, `[v6]:port`), lower case, without
    a trailing dot; None if it is not a host name or address (so only such a name is
    ever shown back in an answer)."""
    header = header.strip().lower()
    if header.startswith("["):
        name, bracket, port = header[1:].partition("]")
        if not bracket or not _is_address(name) or (port and not port.startswith(":")):
            return None
        port = port[1:]
    else:
        name, _, port = header.partition(":")
        name = name.rstrip(".")
        if not _HOST_NAME.fullmatch(name):
            return None
    if port and not port.isdigit():
        return None
    return name


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def is_loopback_name(name: str) -> bool:
    """`localhost` and names under it (browsers resolve them to loopback themselves),
    127.0.0.0/8, ::1, and IPv4-mapped loopback addresses."""
    if is_loopback(name) or name.endswith(".localhost"):
        return True
    address = parse_address(f"[{name}]" if ":" in name else name)
    return address is not None and address.is_loopback
