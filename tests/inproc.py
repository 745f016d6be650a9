"""A relay and clients in the test's event loop over loopback UDP, with in-memory TUNs
that keep what was written to them (no root needed)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from masqued.config import RelayConfig
from masqued.gate.access import AccessControl
from masqued.gate.ipam import AddressPool
from masqued.host.tun import FakeTun
from masqued.proto.request import TunnelParams
from masqued.transport.client import ClientSettings, ClientTunnel
from masqued.transport.limits import EndpointLimits
from masqued.transport.relay import RelayServer, RelaySettings

ROUTES = (ipaddress.ip_network("198.19.0.0/24"), ipaddress.ip_network("2001:db8:19::/64"))


def relay_config(certs: Path, **kw: object) -> RelayConfig:
    """A RelayConfig for AccessControl (only its auth and client keys matter here)."""
    base = RelayConfig(
        name="relay",
        path=certs / "relay.conf",
        listen_host="127.0.0.1",
        listen_port=443,
        certificate=certs / "relay.example.pem",
        private_key=certs / "relay.example.key",
        pool=(ipaddress.ip_network("198.18.200.0/24"),),
        routes=ROUTES,
        egress="auto",
        nat="auto",
    )
    return replace(base, **kw)  # type: ignore[arg-type]


class Relay:
    def __init__(
        self,
        certs: Path,
        pool: tuple[str, ...],
        port: int = 0,
        access: AccessControl | None = None,
        limits: EndpointLimits | None = None,
    ) -> None:
        self.tun = FakeTun("mq-relay", 1300)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        self.pool = AddressPool([ipaddress.ip_network(p) for p in pool])
        settings = RelaySettings(
            mtu=1300,
            routes=ROUTES,
            certificate=str(certs / "relay.example.pem"),
            private_key=str(certs / "relay.example.key"),
        )
        if limits is not None:
            settings = replace(settings, limits=limits)
        self.server = RelayServer(
            asyncio.get_running_loop(), self.sock, self.tun, self.pool, settings, access=access
        )
        self.server.start()

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def close(self) -> None:
        self.server.close()


class Client:
    def __init__(
        self,
        certs: Path,
        port: int,
        transport: str = "stream",
        token_file: Path | None = None,
        certificate: Path | None = None,
    ) -> None:
        self.tun = FakeTun("mq-client", 1300)
        self.params: list[TunnelParams] = []
        settings = ClientSettings(
            relay_host="127.0.0.1",
            relay_port=port,
            server_name="relay.example",
            ca=str(certs / "ca.pem"),
            mtu=1300,
            fwmark=0,
            keepalive=0.5,
            reconnect_max=0.5,
            transport=transport,
            token_file=str(token_file) if token_file is not None else None,
            certificate=str(certificate) if certificate is not None else None,
            private_key=str(certificate.with_suffix(".key")) if certificate is not None else None,
        )
        loop = asyncio.get_running_loop()
        self.tunnel = ClientTunnel(loop, settings, self.tun, self.params.append)
        self.up: asyncio.Future[None] = loop.create_future()
        self.task = loop.create_task(self.tunnel.run(self.up))

    @property
    def address(self) -> ipaddress.IPv4Address:
        return next(a.ip for a in self.params[-1].addresses if a.version == 4)  # type: ignore[return-value]

    async def close(self) -> None:
        self.tunnel.stop()
        await asyncio.wait_for(self.task, 5)


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)
