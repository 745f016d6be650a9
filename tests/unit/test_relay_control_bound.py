"""Issue 14: the relay's answers to ADDRESS_REQUEST go through the request stream's
send bound. A real RelayServer, its admission and sessions, on a link fake that keeps
what was sent and what the peer acknowledged (no QUIC: the peer here never acks)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from pathlib import Path
from typing import Any

from masqued.gate.ipam import AddressPool
from masqued.host.tun import FakeTun
from masqued.proto.connect_ip import RequestedAddress, encode_address_request
from masqued.proto.packet import build_udp
from masqued.proto.request import build_connect_request
from masqued.transport import aioquic_engine as engine
from masqued.transport.relay import RelayServer, RelaySettings
from tests.inproc import ROUTES


class KeptLink:
    """A link that keeps state: bytes written per stream, bytes the peer acknowledged,
    aborted streams. It takes no QUIC datagrams (capsules carry the packets)."""

    http_version = "h3"

    def __init__(self) -> None:
        self.peer = "198.18.1.2:40000"
        self.peer_addr = ("198.18.1.2", 40000)
        self.closed = False
        self.created = 0.0
        self.sent: dict[int, bytearray] = {}
        self.acked: dict[int, int] = {}
        self.headers: dict[int, list[Any]] = {}
        self.aborted: dict[int, int] = {}

    def send_headers(self, stream_id: int, headers: Any, end: bool = False) -> None:
        self.headers.setdefault(stream_id, []).append(headers)

    def send_data(self, stream_id: int, data: bytes, end: bool = False) -> None:
        self.sent.setdefault(stream_id, bytearray()).extend(data)

    def abort(self, stream_id: int, code: int) -> None:
        self.aborted[stream_id] = code

    def close(self, code: int, reason: str) -> None:
        self.closed = True

    def admitted(self) -> None:
        pass

    def fail(self, exc: BaseException) -> None:
        raise exc

    def accepts_datagrams(self) -> bool:
        return False

    def open_tunnel(self, stream_id: int) -> None:
        pass

    def datagram_room(self, stream_id: int) -> int:
        return 0

    def send_datagram(self, stream_id: int, payload: bytes) -> None:
        raise AssertionError("no datagrams on this link")

    def datagrams_queued(self) -> tuple[int, int]:
        return 0, 0

    def stream_acked(self, stream_id: int) -> int | None:
        return self.acked.get(stream_id, 0) if stream_id in self.sent else None

    def stream_backlog(self, stream_id: int) -> int:
        return len(self.sent.get(stream_id, b"")) - self.acked.get(stream_id, 0)

    def delivered(self) -> int | None:
        return sum(self.acked.values())

    def in_flight(self) -> int:
        return 0

    def min_rtt(self) -> float:
        return 0.01

    def stats(self) -> dict[str, Any]:
        return {"rtt_ms": None, "cwnd": None, "bytes_in_flight": None}

    def peer_certificate(self) -> tuple[Any, list[Any]]:
        return None, []

    def flush(self) -> None:
        pass


async def test_address_requests_beyond_the_send_bound_end_the_tunnel(certs: Path) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    tun = FakeTun("mq-relay", 1300)
    server = RelayServer(
        asyncio.get_running_loop(),
        sock,
        tun,
        AddressPool([ipaddress.ip_network("198.18.200.0/24")]),
        RelaySettings(
            mtu=1300,
            routes=ROUTES,
            certificate=str(certs / "relay.example.pem"),
            private_key=str(certs / "relay.example.key"),
        ),
    )
    link = KeptLink()
    sid = 0
    server.link_headers(
        link, sid, build_connect_request("relay.example:443", transport="datagram"), False
    )  # type: ignore[arg-type]
    assert [t.stream_id for t in server.sessions] == [sid]
    tunnel = server.sessions[0]
    request = 1

    def ask() -> None:
        nonlocal request
        capsule = encode_address_request(
            [RequestedAddress(request, ipaddress.ip_network("0.0.0.0/32"))]
        )
        request += 1
        server.link_data(link, sid, capsule, False)  # type: ignore[arg-type]

    # Answered while the stream has room (the peer acknowledges everything).
    for _ in range(3):
        ask()
        link.acked[sid] = len(link.sent[sid])
    assert sid not in link.aborted and server.sessions
    # Packets for the client fill the stream (DATAGRAM capsules: it takes no QUIC
    # datagrams) up to its bound while it acknowledges nothing.
    me = tunnel.lease.addresses[0].ip
    while link.stream_backlog(sid) <= tunnel.plane.capsule_bound.limit:  # type: ignore[attr-defined]
        tun.inject(build_udp("198.19.0.2", me, 53, 40000, b"x" * 1200))
        server._tun_ready()
    held = len(link.sent[sid])
    ask()  # its answer would not fit: the tunnel ends instead
    assert link.aborted.get(sid) == engine.H3_EXCESSIVE_LOAD
    assert not server.sessions
    assert len(link.sent[sid]) == held  # nothing more was queued
    server.close()
