"""Relay workers: Retry tokens and the choice of the least busy worker; and, over
loopback with two relay workers on one reuseport group, clients spread evenly."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from masqued.gate.ipam import AddressPool, pool_slice
from masqued.host.tun import FakeTun
from masqued.transport.balance import TOKEN_LIFETIME, Balancer, InvalidToken, RetryTokens, retry_cid
from masqued.transport.relay import RelayServer, RelaySettings
from masqued.transport.steering import reuseport_group, worker_for
from tests.inproc import ROUTES, Client, until

ADDR = "198.18.1.11:50000"


def test_a_token_opens_only_for_its_client_its_connection_id_and_in_time() -> None:
    tokens = RetryTokens(os.urandom(32))
    odcid, scid = os.urandom(8), bytes((1,)) + os.urandom(7)
    token = tokens.seal(ADDR, odcid, scid, now=1000.0)
    assert tokens.open(ADDR, token, scid, now=1001.0) == (odcid, scid)
    with pytest.raises(InvalidToken, match="another address"):
        tokens.open("198.18.1.12:50000", token, scid, now=1001.0)
    with pytest.raises(InvalidToken, match="connection ID"):
        tokens.open(ADDR, token, os.urandom(8), now=1001.0)
    with pytest.raises(InvalidToken, match="expired"):
        tokens.open(ADDR, token, scid, now=1000.0 + TOKEN_LIFETIME + 1)
    with pytest.raises(InvalidToken):
        RetryTokens(os.urandom(32)).open(ADDR, token, scid, now=1001.0)  # another key
    tampered = token[:-1] + bytes((token[-1] ^ 1,))
    with pytest.raises(InvalidToken):
        tokens.open(ADDR, tampered, scid, now=1001.0)
    with pytest.raises(InvalidToken, match="short"):
        tokens.open(ADDR, b"x", scid)


def test_the_balancer_sends_new_clients_to_the_least_busy_worker() -> None:
    b = Balancer(0, 3, RetryTokens(os.urandom(32)))
    assert b.target(own=0) is None  # nobody is less busy than an empty worker
    b.report([5, 2, 3])
    # Each client sent away counts where it went until the next report.
    assert [b.target(own=5) for _ in range(4)] == [1, 1, 2, 1]  # 2, 3/3, 4/3, 4/4
    assert b.target(own=4) is None  # ties stay where they are
    b.report([3, 3, 3])  # a new report replaces what was counted as sent
    assert b.target(own=3) is None
    assert b.target(own=4) == 1
    assert b.redirects == 5
    cid = retry_cid(2)
    assert len(cid) == 8 and worker_for(bytes([0x40]) + cid, 3) == 2


class Workers:
    """Two relay workers in one event loop: a reuseport group on loopback with the
    steering program, each worker its half of the pool, one shared token key."""

    def __init__(self, certs: Path) -> None:
        loop = asyncio.get_running_loop()
        self.socks = reuseport_group("127.0.0.1", 0, 2)
        self.port = self.socks[0].getsockname()[1]
        key = os.urandom(32)
        pool = [ipaddress.ip_network("198.18.200.0/24")]
        self.servers: list[RelayServer] = []
        for k in (0, 1):
            settings = RelaySettings(
                mtu=1300,
                routes=ROUTES,
                certificate=str(certs / "relay.example.pem"),
                private_key=str(certs / "relay.example.key"),
                worker=k,
                workers=2,
            )
            server = RelayServer(
                loop,
                self.socks[k],
                FakeTun(f"mq-relay+{k}", 1300),
                AddressPool(pool_slice(pool, k, 2)),
                settings,
                balancer=Balancer(k, 2, RetryTokens(key)),
            )
            server.on_change = self.report
            server.start()
            self.servers.append(server)

    def report(self) -> None:
        """What the main process does: every worker's session count to every worker."""
        loads = [len(s.sessions) for s in self.servers]
        for s in self.servers:
            assert s.balancer is not None
            s.balancer.report(loads)

    def close(self) -> None:
        for s in self.servers:
            s.close()


@pytest.fixture
async def workers(certs: Path) -> AsyncIterator[Workers]:
    w = Workers(certs)
    yield w
    w.close()


async def test_clients_spread_evenly_over_two_workers(
    workers: Workers, certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every client's first Initial goes to worker 0 here (its random DCID is made to
    start with 0): worker 0 keeps every other one and sends the rest to worker 1."""
    import types

    import aioquic.quic.connection as aioquic_connection

    real = os.urandom
    fake_os = types.SimpleNamespace(urandom=lambda n: b"\x00" + real(n - 1))
    clients = []
    with monkeypatch.context() as m:
        m.setattr(aioquic_connection, "os", fake_os)
        for _ in range(6):  # one after the other: each sees the others' sessions
            c = Client(certs, workers.port)
            await asyncio.wait_for(c.up, 5)
            clients.append(c)
    counts = [len(s.sessions) for s in workers.servers]
    assert counts == [3, 3], counts
    assert workers.servers[0].results.get("redirected") == 3
    assert workers.servers[1].results.get("redirected") is None
    # Each session's address comes from the share of the worker that serves it.
    for k, s in enumerate(workers.servers):
        share = pool_slice([ipaddress.ip_network("198.18.200.0/24")], k, 2)[0]
        assert all(a.ip in share for sess in s.sessions for a in sess.lease.addresses)
    # And the tunnels work, through whichever worker.
    from masqued.proto.packet import build_udp

    for c in clients:
        c.tun.inject(build_udp(c.address, "198.19.0.2", 1000, 53, b"q"))
    await until(lambda: sum(len(s.tun.written) for s in workers.servers) == 6)  # type: ignore[attr-defined]
    for c in clients:
        await c.close()


async def test_an_initial_with_a_forged_token_is_dropped(workers: Workers) -> None:
    """A client that invents a token (or replays one elsewhere) gets nothing."""
    from aioquic.quic.packet import QuicProtocolVersion

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        dcid = bytes((1,)) + os.urandom(7)
        token = os.urandom(40)
        # Initial long header: flags, version, DCID, SCID, token, then junk (padded).
        head = bytes([0xC0]) + int(QuicProtocolVersion.VERSION_1).to_bytes(4, "big")
        head += bytes([8]) + dcid + bytes([8]) + os.urandom(8)
        head += bytes([len(token)]) + token
        rest = 1200 - len(head) - 2
        head += (0x4000 | rest).to_bytes(2, "big")  # Length (2-byte varint)
        sock.sendto(head + os.urandom(rest), ("127.0.0.1", workers.port))
        w1 = workers.servers[1]
        await until(lambda: w1.results.get("retry_invalid", 0) == 1)
        assert not w1.connections
    finally:
        sock.close()
