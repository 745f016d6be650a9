"""Fixtures: our relay (real RelayServer, in-memory TUN, loopback UDP and TCP) and PKI."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from masqued.gate.ipam import AddressPool
from masqued.host.tun import FakeTun
from masqued.transport.relay import RelayServer, RelaySettings
from masqued.transport.tcpendpoint import listen_tcp

ROUTES = (ipaddress.ip_network("198.19.0.0/24"), ipaddress.ip_network("2001:db8:19::/64"))
RELAY_MTU = 1300


class OurRelay:
    def __init__(self, certs: Path, **settings: Any) -> None:
        self.tun = FakeTun("mq-relay", RELAY_MTU)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        # HTTP/2 on a port of its own (the daemon's default is the UDP one's number).
        self.tcp_socks = listen_tcp("127.0.0.1", 0)
        self.tcp_port: int = self.tcp_socks[0].getsockname()[1]
        self.pool = AddressPool(
            [ipaddress.ip_network("198.18.200.0/24"), ipaddress.ip_network("2001:db8:200::/64")]
        )
        settings = RelaySettings(
            mtu=RELAY_MTU,
            routes=ROUTES,
            certificate=str(certs / "relay.example.pem"),
            private_key=str(certs / "relay.example.key"),
            **settings,
        )
        self.server = RelayServer(
            asyncio.get_running_loop(),
            self.sock,
            self.tun,
            self.pool,
            settings,
            tcp_socks=self.tcp_socks,
        )
        self.server.start()


@pytest.fixture
async def relay(certs: Path) -> AsyncIterator[OurRelay]:
    r = OurRelay(certs)
    yield r
    r.server.close()
    for sock in r.tcp_socks:
        sock.close()
