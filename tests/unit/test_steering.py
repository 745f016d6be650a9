"""Relay workers: the reuseport steering program on a real kernel, and connection IDs
that lead back to the worker that issued them."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
from aioquic.quic.connection import QuicConnection

from masqued.transport import aioquic_engine as engine
from masqued.transport.steering import (
    LONG_HEADER_DCID,
    reuseport_group,
    steering_program,
    worker_for,
)


def _drain(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(2048))
        except BlockingIOError:
            return out


@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_the_kernel_steers_by_the_first_dcid_byte(workers: int) -> None:
    socks = reuseport_group("127.0.0.1", 0, workers)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        port = socks[0].getsockname()[1]
        assert all(s.getsockname()[1] == port for s in socks)
        for s in socks:
            s.setblocking(False)
        sent = []
        for b in (0, 1, 2, 3, 7, 200, 255):
            # Short header from many source ports, long header, and one too short
            # to hold a DCID (index 0).
            sent.append(bytes([0x40, b]) + os.urandom(30))
            sent.append(bytes([0xC0, 0, 0, 0, 1, 8, b]) + os.urandom(30))
        sent.append(b"\xc0\x00")
        for p in sent:
            tx.sendto(p, ("127.0.0.1", port))
        time.sleep(0.05)
        got = {i: _drain(s) for i, s in enumerate(socks)}
        assert sum(map(len, got.values())) == len(sent)
        for i, packets in got.items():
            for p in packets:
                assert worker_for(p, workers) == i
        # Every worker index was reachable (0..workers-1 all among the bytes above).
        assert all(got[i] for i in range(workers))
    finally:
        tx.close()
        for s in socks:
            s.close()


def test_the_program_rejects_impossible_worker_counts() -> None:
    with pytest.raises(ValueError):
        steering_program(0)
    with pytest.raises(ValueError):
        steering_program(65)


CLIENT = ("198.18.1.2", 50000)
RELAY = ("198.18.1.1", 4433)


def _handshake(client: QuicConnection, server: QuicConnection) -> None:
    now = time.monotonic()
    for _ in range(20):
        moved = False
        for a, b, source in ((client, server, CLIENT), (server, client, RELAY)):
            for data, _ in a.datagrams_to_send(now):
                b.receive_datagram(data, source, now)
                moved = True
        if not moved:
            return
    raise AssertionError("handshake did not settle")


@pytest.mark.parametrize("worker", [0, 1, 5])
def test_every_connection_id_a_worker_issues_leads_back_to_it(certs: Path, worker: int) -> None:
    server_config = engine.configuration(
        is_client=False,
        certificate=str(certs / "relay.example.pem"),
        private_key=str(certs / "relay.example.key"),
    )
    client_config = engine.configuration(
        is_client=True, server_name="relay.example", cafile=str(certs / "ca.pem")
    )
    client = engine.client_connection(client_config)
    client.connect(RELAY, now=time.monotonic())
    # The server side learns the client's DCID from its first Initial.
    first = client.datagrams_to_send(time.monotonic())
    dcid = first[0][0][LONG_HEADER_DCID : LONG_HEADER_DCID + 8]
    server = engine.connection_class(worker, False)(
        configuration=server_config, original_destination_connection_id=dcid
    )
    for data, _ in first:
        server.receive_datagram(data, CLIENT, time.monotonic())
    _handshake(client, server)
    assert client._handshake_complete and server._handshake_complete
    issued = [c.cid for c in server._host_cids]
    assert len(issued) > 1  # NEW_CONNECTION_ID frames went out as well
    assert all(cid[0] == worker for cid in issued)
    # What the client may use as DCID from now on: the handshake's and the new ones.
    known = [client._peer_cid.cid] + [c.cid for c in client._peer_cid_available]
    assert all(cid[0] == worker for cid in known)
    # ... and a short-header packet the client sends now goes to that worker.
    client.send_ping(1)
    packet = client.datagrams_to_send(time.monotonic())[0][0]
    assert packet[0] & 0x80 == 0
    assert worker_for(packet, max(worker + 1, 2)) == worker
