"""Zeroconf (mDNS) announcement of the Wyoming service, the way Home Assistant finds
Wyoming services on the network: a `_wyoming._tcp.local.` service with the address and
port Home Assistant should connect to.

On the PyPI package `zeroconf`. The `wyoming` package's own HomeAssistantZeroconf helper
registers the same record, but it has no way to withdraw it; this one says goodbye at
shutdown so that Home Assistant does not keep offering a server that has stopped.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

log = logging.getLogger(__name__)

SERVICE_TYPE = "_wyoming._tcp.local."
_MDNS_GROUP = "224.0.0.251"  # only to find the interface multicast leaves by: nothing is sent


def announced_address(bind_host: str) -> str:
    """The IPv4 address to announce for a server bound to `bind_host`.

    A wildcard bind is reachable on every interface: announce the one multicast leaves by,
    which is where Home Assistant hears the announcement. A specific address is announced
    as it is (a loopback one is reachable only from this machine: the caller warns).
    """
    if bind_host not in ("", "0.0.0.0", "::"):
        return socket.gethostbyname(bind_host)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((_MDNS_GROUP, 1))  # a UDP connect picks a route, sends nothing
        return str(probe.getsockname()[0])


def service_name(name: str) -> str:
    """`name` as an instance of the Wyoming service type (dots would split the label)."""
    label = name.replace(".", "-").strip() or "whisperstream"
    return f"{label}.{SERVICE_TYPE}"


@asynccontextmanager
async def announced(name: str, bind_host: str, port: int) -> AsyncIterator[AsyncServiceInfo]:
    """The Wyoming service announced by mDNS while the block runs, withdrawn after it."""
    address = announced_address(bind_host)
    if ipaddress.ip_address(address).is_loopback:
        log.warning(
            "wyoming.zeroconf: announcing %s, which only this machine can reach; bind "
            "wyoming.host to a network address for Home Assistant on another machine",
            address,
        )
    info = AsyncServiceInfo(
        SERVICE_TYPE,
        service_name(name),
        addresses=[socket.inet_aton(address)],
        port=port,
        properties={"program": "whisperstream"},
    )
    zeroconf = AsyncZeroconf()
    try:
        # A second server under the same name gets "name (2)", as Home Assistant expects.
        await zeroconf.async_register_service(info, allow_name_change=True)
        log.info("wyoming: announced %s at %s:%d by zeroconf", info.name, address, port)
        yield info
    finally:
        try:
            await zeroconf.async_unregister_all_services()
        finally:
            await zeroconf.async_close()
