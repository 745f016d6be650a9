"""Prometheus exposition of an instance's status (``metrics = ...`` in the config).

At scrape time ``SnapshotCollector`` turns the instance's status snapshot (the same
dict ``masqued status`` shows) into metric families, and ``MetricsServer`` serves
them with prometheus-client's own encoders from the daemon's event loop — so a
scrape reads a consistent state and never races the packet path from another thread.
Imported only when an endpoint is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from masqued.observe.metrics import DROP_REASONS, MAX_CLIENT_SERIES, MAX_LABEL_LEN, SESSION_RESULTS

log = logging.getLogger("masqued.observe.metrics")


def _label(value: object) -> str:
    text = str(value)
    return text if len(text) <= MAX_LABEL_LEN else text[:MAX_LABEL_LEN]


def _drops(snapshot_drops: dict[str, int]) -> dict[str, int]:
    out = dict.fromkeys(DROP_REASONS, 0)
    for reason, n in snapshot_drops.items():
        out[_label(reason)] = out.get(_label(reason), 0) + int(n)
    return out


class SnapshotCollector:
    """Prometheus collector reading the instance's status snapshot at scrape time.

    ``snapshot`` is called from the event loop (the scrape is served there), so it
    sees a consistent state. It must return the dict documented in
    docs/status.schema.json.
    """

    def __init__(self, snapshot: Callable[[], dict[str, Any]], per_client: bool = False) -> None:
        self.snapshot = snapshot
        self.per_client = per_client

    def collect(self) -> Iterable[Metric]:
        snap = self.snapshot()
        role = str(snap.get("role", ""))
        yield from self._common(snap, role)
        if role == "relay":
            yield from self._relay(snap)
        else:
            yield from self._client(snap)
        if self.per_client and role == "relay":
            yield from self._per_client(snap)

    def _common(self, snap: dict[str, Any], role: str) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "masqued_info",
            "Instance information (always 1).",
            labels=["instance", "role", "version"],
        )
        info.add_metric(
            [_label(snap.get("instance", "")), role, _label(snap.get("masqued_version", ""))], 1
        )
        yield info
        yield GaugeMetricFamily(
            "masqued_start_time_seconds",
            "Start time of the instance, seconds since the epoch.",
            value=float(snap.get("started", 0.0)),
        )
        totals = snap.get("totals", {})
        packets = CounterMetricFamily(
            "masqued_packets",
            "IP packets carried; rx = received from the tunnel peer(s), tx = sent to them.",
            labels=["direction"],
        )
        octets = CounterMetricFamily(
            "masqued_bytes",
            "Bytes of IP packets carried (framing not included), by direction as above.",
            labels=["direction"],
        )
        for direction in ("rx", "tx"):
            packets.add_metric([direction], float(totals.get(f"{direction}_packets", 0)))
            octets.add_metric([direction], float(totals.get(f"{direction}_bytes", 0)))
        yield packets
        yield octets
        drops = CounterMetricFamily(
            "masqued_drops", "Packets dropped, by reason.", labels=["reason"]
        )
        for reason, n in sorted(_drops(totals.get("drops", {})).items()):
            drops.add_metric([reason], float(n))
        yield drops
        hist = snap.get("handshake")
        if hist:
            family = HistogramMetricFamily(
                "masqued_handshake_seconds",
                "Time from the first QUIC packet to a usable CONNECT-IP tunnel.",
            )
            family.add_metric(
                [],
                buckets=[
                    ("+Inf" if b["le"] is None else repr(float(b["le"])), float(b["count"]))
                    for b in hist["buckets"]
                ],
                sum_value=float(hist["sum"]),
            )
            yield family

    def _relay(self, snap: dict[str, Any]) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "masqued_sessions_open", "Open client sessions.", value=len(snap.get("sessions", ()))
        )
        results = CounterMetricFamily(
            "masqued_sessions",
            "CONNECT-IP requests by result (accepted, rejected, pool_exhausted, ...).",
            labels=["result"],
        )
        counts = dict.fromkeys(SESSION_RESULTS, 0) | dict(snap.get("results", {}))
        for result, n in sorted(counts.items()):
            results.add_metric([_label(result)], float(n))
        yield results
        pool = snap.get("pool") or {}
        yield GaugeMetricFamily(
            "masqued_pool_used", "Pool addresses in use.", value=float(pool.get("used", 0))
        )
        yield GaugeMetricFamily(
            "masqued_pool_capacity",
            "Pool addresses that can be given out.",
            value=float(pool.get("capacity", 0)),
        )

    def _client(self, snap: dict[str, Any]) -> Iterator[Metric]:
        sessions = snap.get("sessions", ())
        tunnel = sessions[0] if sessions else {}
        connected = 1.0 if tunnel.get("state") == "connected" else 0.0
        yield GaugeMetricFamily(
            "masqued_sessions_open", "Open tunnels (1 when connected).", value=connected
        )
        yield CounterMetricFamily(
            "masqued_reconnects",
            "Tunnels established after the first one.",
            value=float(max(0, int(snap.get("connects", 0)) - 1)),
        )
        rtt = tunnel.get("rtt_ms")
        if rtt is not None:
            yield GaugeMetricFamily(
                "masqued_rtt_seconds", "Smoothed QUIC RTT to the relay.", value=rtt / 1000
            )
        cwnd = tunnel.get("cwnd")
        if cwnd is not None:
            yield GaugeMetricFamily(
                "masqued_congestion_window_bytes",
                "QUIC congestion window of the connection to the relay.",
                value=float(cwnd),
            )

    def _per_client(self, snap: dict[str, Any]) -> Iterator[Metric]:
        sessions = snap.get("sessions", [])[:MAX_CLIENT_SERIES]
        labels = ["client", "address"]
        packets = CounterMetricFamily(
            "masqued_client_packets", "Packets per client session.", labels=[*labels, "direction"]
        )
        octets = CounterMetricFamily(
            "masqued_client_bytes", "Bytes per client session.", labels=[*labels, "direction"]
        )
        rtt = GaugeMetricFamily("masqued_client_rtt_seconds", "Smoothed RTT.", labels=labels)
        for s in sessions:
            ident = _label(s.get("identity") or s.get("peer", ""))
            addr = _label(s["addresses"][0] if s.get("addresses") else "")
            for direction in ("rx", "tx"):
                packets.add_metric([ident, addr, direction], float(s[f"{direction}_packets"]))
                octets.add_metric([ident, addr, direction], float(s[f"{direction}_bytes"]))
            if s.get("rtt_ms") is not None:
                rtt.add_metric([ident, addr], s["rtt_ms"] / 1000)
        yield packets
        yield octets
        yield rtt


def make_registry(
    snapshot: Callable[[], dict[str, Any]], per_client: bool = False
) -> CollectorRegistry:
    """A registry with our collector and the process collector (CPU, memory, fds)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot, per_client))
    ProcessCollector(registry=registry)
    return registry


# -- the HTTP endpoint ----------------------------------------------------------------

MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 5.0
MAX_SCRAPERS = 8
HTTP_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
}


class MetricsServer:
    """``GET /metrics`` over HTTP/1.x on a TCP address or a unix socket, in the loop.

    Deliberately tiny: one request per connection, head bounded to 8 KiB and 5 s,
    at most ``MAX_SCRAPERS`` connections at once; anything else is answered 4xx.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        host: str = "",
        port: int = 0,
        path: Path | None = None,
    ) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self.path = path
        self._server: asyncio.AbstractServer | None = None
        self._active = 0
        self.scrapes = 0

    @property
    def address(self) -> str:
        if self.path is not None:
            return str(self.path)
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def start(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                if self.path.is_socket():
                    self.path.unlink()
            old = os.umask(0o177)  # 0600: metrics are for root and the scraper's proxy
            try:
                self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
            finally:
                os.umask(old)
            os.chmod(self.path, 0o600)
        else:
            self._server = await asyncio.start_server(
                self._serve, host=self.host, port=self.port, reuse_address=True
            )
            if self.port == 0:  # tests: learn the port picked by the kernel
                self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 1.0)
        self._server = None
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._active >= MAX_SCRAPERS:
            writer.close()
            return
        self._active += 1
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                await self._respond(writer, 400, b"bad request\n")
                return
            if len(head) > MAX_REQUEST_HEAD:
                await self._respond(writer, 431, b"request head too large\n")
                return
            status, body, ctype = self._handle(head)
            await self._respond(writer, status, body, ctype)
        except (ConnectionError, OSError):
            pass
        finally:
            self._active -= 1
            writer.close()

    def _handle(self, head: bytes) -> tuple[int, bytes, str]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return 400, b"bad request\n", "text/plain"
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            return 405, b"only GET\n", "text/plain"
        if target.split("?", 1)[0] not in ("/metrics", "/"):
            return 404, b"try /metrics\n", "text/plain"
        accept = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "accept":
                accept = value.strip()
        encoder, ctype = choose_encoder(accept)
        self.scrapes += 1
        body = encoder(self.registry)
        return 200, (b"" if method == "HEAD" else body), ctype

    async def _respond(
        self, writer: asyncio.StreamWriter, status: int, body: bytes, ctype: str = "text/plain"
    ) -> None:
        reason = HTTP_REASONS.get(status, "Error")
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        writer.write(head + body)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)


def scrape(address: str, timeout: float = 5.0) -> str:
    """Fetch ``/metrics`` from ``host:port`` or a unix socket path (for tests and doctor)."""
    if address.startswith("/"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: Any = address
        host = "localhost"
    else:
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        target = (host, int(port))
    with sock:
        sock.settimeout(timeout)
        sock.connect(target)
        sock.sendall(f"GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" ":
        raise OSError(f"metrics endpoint answered {status.decode(errors='replace')}")
    return body.decode()
