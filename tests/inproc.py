"""A relay and clients in the test's event loop over loopback UDP and TCP, with
in-memory TUNs that keep what was written to them (no root needed)."""

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
from masqued.transport.tcpendpoint import listen_tcp

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
        tcp: bool = True,
        client_ca: Path | None = None,
        quic_engine: str | None = None,
    ) -> None:
        self.tun = FakeTun("mq-relay", 1300)
        self.sock, self.tcp_socks = _bind(port, tcp)
        self.port = self.sock.getsockname()[1]
        self.pool = AddressPool([ipaddress.ip_network(p) for p in pool])
        settings = RelaySettings(
            mtu=1300,
            routes=ROUTES,
            certificate=str(certs / "relay.example.pem"),
            private_key=str(certs / "relay.example.key"),
            client_ca=str(client_ca) if client_ca is not None else None,
            quic_engine=quic_engine,
        )
        if limits is not None:
            settings = replace(settings, limits=limits)
        self.server = RelayServer(
            asyncio.get_running_loop(),
            self.sock,
            self.tun,
            self.pool,
            settings,
            access=access,
            tcp_socks=self.tcp_socks,
        )
        self.server.start()

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def close(self) -> None:
        self.server.close()
        for sock in self.tcp_socks:
            sock.close()


def _bind(port: int, tcp: bool) -> tuple[socket.socket, list[socket.socket]]:
    """A UDP socket on 127.0.0.1 and, with ``tcp``, a listening TCP socket on the same
    port number (as the relay's default), retrying where TCP has that port taken."""
    for _ in range(20):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", port))
        if not tcp:
            return udp, []
        try:
            return udp, listen_tcp("127.0.0.1", udp.getsockname()[1])
        except OSError:
            udp.close()
            if port:
                raise
    raise OSError("no port free for both UDP and TCP")


class Client:
    def __init__(
        self,
        certs: Path,
        port: int,
        transport: str = "stream",
        token_file: Path | None = None,
        certificate: Path | None = None,
        **overrides: object,
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
        settings = replace(settings, **overrides)  # type: ignore[arg-type]
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


class UdpGate:
    """A UDP hop between clients and a relay on loopback that forwards both ways while
    ``open`` and drops everything while not: a network that blocks UDP, switched on
    and off by the test."""

    def __init__(self, relay_port: int, open: bool = True) -> None:
        self.loop = asyncio.get_running_loop()
        self.relay = ("127.0.0.1", relay_port)
        self.open = open
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.front.setblocking(False)
        self.port = self.front.getsockname()[1]
        self.dropped = 0
        self._upstream: dict[tuple[str, int], socket.socket] = {}
        self.loop.add_reader(self.front.fileno(), self._from_client)

    def _from_client(self) -> None:
        while True:
            try:
                data, addr = self.front.recvfrom(65535)
            except BlockingIOError:
                return
            if not self.open:
                self.dropped += 1
                continue
            up = self._upstream.get(addr)
            if up is None:
                up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                up.setblocking(False)
                up.connect(self.relay)
                self._upstream[addr] = up
                self.loop.add_reader(up.fileno(), self._from_relay, up, addr)
            up.send(data)

    def _from_relay(self, up: socket.socket, addr: tuple[str, int]) -> None:
        while True:
            try:
                data = up.recv(65535)
            except (BlockingIOError, ConnectionRefusedError):
                return
            if self.open:
                self.front.sendto(data, addr)
            else:
                self.dropped += 1

    def close(self) -> None:
        for sock in [self.front, *self._upstream.values()]:
            self.loop.remove_reader(sock.fileno())
            sock.close()
