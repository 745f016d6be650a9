"""masqued.observe.metrics (cheap counters) and .exposition (snapshot collector, /metrics)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from masqued.observe.exposition import MetricsServer, make_registry, scrape
from masqued.observe.metrics import (
    HANDSHAKE_BUCKETS,
    MAX_CLIENT_SERIES,
    LatencyHistogram,
    TrafficCounters,
)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def session(i: int, rx: int = 10, tx: int = 20) -> dict[str, Any]:
    return {
        "id": f"198.18.1.{i}:4000#0",
        "identity": None,
        "peer": f"198.18.1.{i}:4000",
        "addresses": [f"198.18.200.{i}/32"],
        "transport": "stream",
        "state": "connected",
        "connected_since": 1.0,
        "rtt_ms": 2.5,
        "cwnd": 12000,
        "bytes_in_flight": 0,
        "rx_packets": rx,
        "rx_bytes": rx * 100,
        "tx_packets": tx,
        "tx_bytes": tx * 100,
        "drops": {"spoofed_source": 1},
        "last_rx": None,
        "last_tx": None,
    }


def relay_doc(n_sessions: int = 2) -> dict[str, Any]:
    hist = LatencyHistogram()
    hist.observe(0.02)
    hist.observe(7.0)
    return {
        "instance": "relay",
        "role": "relay",
        "masqued_version": "0.1.0",
        "started": 1000.0,
        "sessions": [session(i) for i in range(n_sessions)],
        "pool": {"used": n_sessions, "capacity": 253},
        "results": {"accepted": 5, "pool_exhausted": 2},
        "handshake": hist.snapshot(),
        "totals": {
            "rx_packets": 30,
            "rx_bytes": 3000,
            "tx_packets": 40,
            "tx_bytes": 4000,
            "drops": {"spoofed_source": 3, "no_session": 1},
        },
    }


def test_counters_add_copy_snapshot() -> None:
    a = TrafficCounters(1, 100, 2, 200, last_rx=5.0)
    a.drops["malformed"] += 1
    b = a.copy()
    b.add(TrafficCounters(1, 10, 1, 10, last_tx=9.0))
    assert a.snapshot()["rx_bytes"] == 100  # the copy is independent
    snap = b.snapshot()
    assert (snap["rx_packets"], snap["rx_bytes"], snap["tx_packets"], snap["tx_bytes"]) == (
        2,
        110,
        3,
        210,
    )
    assert snap["drops"] == {"malformed": 1}
    assert (snap["last_rx"], snap["last_tx"]) == (5.0, 9.0)
    assert TrafficCounters().snapshot()["last_rx"] is None


def test_histogram_buckets_are_cumulative() -> None:
    h = LatencyHistogram()
    for value in (0.001, 0.005, 0.03, 0.03, 100.0, -1.0):
        h.observe(value)
    snap = h.snapshot()
    counts = [b["count"] for b in snap["buckets"]]
    assert counts == sorted(counts) and counts[-1] == snap["count"] == 6
    assert snap["buckets"][-1]["le"] is None
    assert len(snap["buckets"]) == len(HANDSHAKE_BUCKETS) + 1
    by_le = {b["le"]: b["count"] for b in snap["buckets"]}
    assert by_le[0.005] == 3  # -1 (clamped to 0), 0.001 and 0.005 (le is inclusive)
    assert by_le[0.05] == 5


def test_relay_exposition_parses_and_has_the_documented_series() -> None:
    registry = make_registry(lambda: relay_doc())
    text = _generate(registry)
    got = samples(text)
    assert got[("masqued_sessions_open", ())] == 2
    assert got[("masqued_sessions_total", (("result", "accepted"),))] == 5
    assert got[("masqued_sessions_total", (("result", "pool_exhausted"),))] == 2
    assert got[("masqued_sessions_total", (("result", "rejected"),))] == 0
    assert got[("masqued_bytes_total", (("direction", "rx"),))] == 3000
    assert got[("masqued_packets_total", (("direction", "tx"),))] == 40
    assert got[("masqued_drops_total", (("reason", "spoofed_source"),))] == 3
    assert got[("masqued_drops_total", (("reason", "acl"),))] == 0
    assert got[("masqued_pool_used", ())] == 2 and got[("masqued_pool_capacity", ())] == 253
    assert got[("masqued_handshake_seconds_count", ())] == 2
    assert got[("masqued_handshake_seconds_bucket", (("le", "0.025"),))] == 1
    assert got[("masqued_handshake_seconds_bucket", (("le", "+Inf"),))] == 2
    assert ("process_resident_memory_bytes", ()) in got
    # No per-client labels unless asked for.
    assert not any(name.startswith("masqued_client_") for name, _ in got)


def test_per_client_series_are_opt_in_and_capped() -> None:
    registry = make_registry(lambda: relay_doc(MAX_CLIENT_SERIES + 50), per_client=True)
    got = samples(_generate(registry))
    rx_series = [
        k for k in got if k[0] == "masqued_client_bytes_total" and ("direction", "rx") in k[1]
    ]
    assert len(rx_series) == MAX_CLIENT_SERIES
    assert got[
        (
            "masqued_client_rtt_seconds",
            (("address", "198.18.200.3/32"), ("client", "198.18.1.3:4000")),
        )
    ] == pytest.approx(0.0025)


def test_client_exposition() -> None:
    tunnel = session(1) | {"state": "connected", "rtt_ms": 12.0, "cwnd": 50000}
    doc = {
        "instance": "c1",
        "role": "client",
        "masqued_version": "0.1.0",
        "started": 5.0,
        "connects": 3,
        "sessions": [tunnel],
        "handshake": LatencyHistogram().snapshot(),
        "totals": {"rx_packets": 1, "rx_bytes": 2, "tx_packets": 3, "tx_bytes": 4, "drops": {}},
    }
    got = samples(_generate(make_registry(lambda: doc)))
    assert got[("masqued_reconnects_total", ())] == 2
    assert got[("masqued_sessions_open", ())] == 1
    assert got[("masqued_rtt_seconds", ())] == pytest.approx(0.012)
    assert got[("masqued_congestion_window_bytes", ())] == 50000
    doc["sessions"] = [tunnel | {"state": "reconnecting", "rtt_ms": None, "cwnd": None}]
    got = samples(_generate(make_registry(lambda: doc)))
    assert got[("masqued_sessions_open", ())] == 0
    assert ("masqued_rtt_seconds", ()) not in got


def test_unknown_drop_reason_label_is_bounded_in_length() -> None:
    doc = relay_doc()
    doc["totals"]["drops"] = {"x" * 500: 1}
    got = samples(_generate(make_registry(lambda: doc)))
    assert got[("masqued_drops_total", (("reason", "x" * 40),))] == 1


def _generate(registry: CollectorRegistry) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()


# -- the HTTP endpoint ------------------------------------------------------------------


async def _raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    if not data.endswith(b"\r\n\r\n"):
        writer.write_eof()
    out = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return out


async def test_endpoint_over_tcp_moves_with_the_counters() -> None:
    doc = relay_doc()
    server = MetricsServer(make_registry(lambda: doc), host="127.0.0.1", port=0)
    await server.start()
    try:
        text = await asyncio.to_thread(scrape, server.address)
        assert samples(text)[("masqued_bytes_total", (("direction", "rx"),))] == 3000
        doc["totals"]["rx_bytes"] = 9000
        text = await asyncio.to_thread(scrape, server.address)
        assert samples(text)[("masqued_bytes_total", (("direction", "rx"),))] == 9000
        assert server.scrapes == 2
    finally:
        await server.close()


async def test_endpoint_rejects_what_is_not_a_scrape_and_keeps_serving() -> None:
    server = MetricsServer(make_registry(lambda: relay_doc()), host="127.0.0.1", port=0)
    await server.start()
    try:
        assert b" 404 " in await _raw(server.port, b"GET /admin HTTP/1.1\r\n\r\n")
        assert b" 405 " in await _raw(server.port, b"POST /metrics HTTP/1.1\r\n\r\n")
        assert b" 400 " in await _raw(server.port, b"\x00\xff garbage\r\n\r\n")
        assert b" 400 " in await _raw(server.port, b"GET /metrics")  # no end of head
        assert b" 400 " in await _raw(server.port, b"X" * 100_000)  # head too large
        head = await _raw(server.port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
        assert b" 200 " in head and head.endswith(b"\r\n\r\n")
        openmetrics = await _raw(
            server.port,
            b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n",
        )
        assert b"application/openmetrics-text" in openmetrics and b"# EOF" in openmetrics
        text = await asyncio.to_thread(scrape, server.address)
        assert "masqued_sessions_open 2.0" in text
    finally:
        await server.close()


async def test_endpoint_on_a_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "metrics.sock"
    server = MetricsServer(make_registry(lambda: relay_doc()), path=path)
    await server.start()
    try:
        assert path.is_socket() and path.stat().st_mode & 0o777 == 0o600
        text = await asyncio.to_thread(scrape, str(path))
        assert samples(text)[("masqued_pool_used", ())] == 2
    finally:
        await server.close()
    assert not path.exists()


async def test_scrape_reports_a_non_200_answer() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    def answer() -> None:
        conn, _ = listener.accept()
        conn.recv(1000)
        conn.sendall(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n")
        conn.close()

    task = asyncio.create_task(asyncio.to_thread(answer))
    with pytest.raises(OSError, match="500"):
        await asyncio.to_thread(scrape, f"127.0.0.1:{port}")
    await task
    listener.close()
