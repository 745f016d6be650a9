"""masqued.observe.status: the status document of a live relay and client (loopback QUIC, fake
TUNs, no root), its JSON schema, the text rendering and --watch rates."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from masqued.config import ClientConfig, MetricsEndpoint, RelayConfig
from masqued.host.naming import InstanceIds
from masqued.host.nat import FakeNat
from masqued.observe import status
from masqued.observe.control import socket_path
from masqued.observe.exposition import scrape
from masqued.observe.status import StatusService, compute_rates, parse_nat_description, render_text
from masqued.proto.packet import build_udp
from tests.inproc import Client, Relay, until

REPO = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((REPO / "docs" / "status.schema.json").read_text())
net = ipaddress.ip_network


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    d = tmp_path / "run"
    monkeypatch.setenv("MASQUED_RUN_DIR", str(d))
    yield d


def relay_config(certs: Path, **kw: Any) -> RelayConfig:
    return RelayConfig(
        name="relay",
        path=Path("/etc/masque/relay.conf"),
        listen_host="127.0.0.1",
        listen_port=4433,
        certificate=certs / "relay.example.pem",
        private_key=certs / "relay.example.key",
        pool=(net("198.18.200.0/24"), net("2001:db8:200::/64")),
        routes=(net("198.19.0.0/24"),),
        egress="eth0",
        nat="nftables",
        **kw,
    )


def client_config(certs: Path) -> ClientConfig:
    return ClientConfig(
        name="c1",
        path=Path("/etc/masque/c1.conf"),
        relay_host="127.0.0.1",
        relay_port=4433,
        server_name="relay.example",
        ca=certs / "ca.pem",
        routes=(net("198.19.0.0/24"),),
    )


def validate(doc: dict[str, Any]) -> None:
    jsonschema.validate(doc, SCHEMA, format_checker=jsonschema.FormatChecker())


async def fetch(name: str, nat: bool = True) -> dict[str, Any]:
    return await asyncio.to_thread(status.fetch, name, nat)


def test_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


async def test_relay_and_client_documents_match_the_traffic_and_the_schema(
    certs: Path, run_dir: Path
) -> None:
    relay = Relay(certs, ("198.18.200.0/24", "2001:db8:200::/64"))
    nat = FakeNat(InstanceIds("relay"), kind="fake")
    nat.apply([net("198.18.200.0/24")], "eth0")
    rsvc = StatusService(
        lambda: relay_config(certs),
        relay.server.snapshot,
        nat=nat,
        extra=lambda: {"egress": "eth0"},
    )
    await rsvc.start()
    client = Client(certs, relay.port)
    csvc = StatusService(lambda: client_config(certs), client.tunnel.snapshot)
    await csvc.start()
    try:
        await asyncio.wait_for(client.up, 5)
        out = [build_udp(client.address, "198.19.0.2", 1000, 53, b"q" * n) for n in (10, 200)]
        client.tun.inject(*out)
        await until(lambda: len(relay.tun.written) == 2)
        back = build_udp("198.19.0.2", client.address, 53, 1000, b"a" * 99)
        relay.tun.inject(back)
        await until(lambda: len(client.tun.written) == 1)
        client.tun.inject(build_udp("198.18.200.99", "198.19.0.2", 1, 2, b"spoofed"))
        await until(lambda: next(iter(relay.server.sessions)).counters.drops["spoofed_source"] == 1)

        rdoc = await fetch("relay")
        validate(rdoc)
        assert rdoc["role"] == "relay" and rdoc["instance"] == "relay"
        assert rdoc["listen"] == "127.0.0.1:4433" and rdoc["egress"] == "eth0"
        assert rdoc["tun"] == {"name": "mq-relay", "mtu": 1300}
        assert rdoc["pool"] == {"used": 1, "capacity": relay.pool.capacity()}
        assert rdoc["results"] == {"accepted": 1}
        assert rdoc["nat"]["backend"] == "fake"
        assert "-A MASQUED-relay -s 198.18.200.0/24 -o eth0 -j MASQUERADE" in rdoc["nat"]["rules"]
        (s,) = rdoc["sessions"]
        assert s["addresses"] == ["198.18.200.2/32", "2001:db8:200::2/128"]
        assert (s["rx_packets"], s["rx_bytes"]) == (3, sum(map(len, out)) + 28 + 7)
        assert (s["tx_packets"], s["tx_bytes"]) == (1, len(back))
        assert s["drops"] == {"spoofed_source": 1}
        assert s["rtt_ms"] is not None and s["cwnd"] > 0
        assert s["last_rx"] >= s["connected_since"]
        assert rdoc["totals"]["rx_bytes"] == s["rx_bytes"]
        assert rdoc["handshake"]["count"] == 1

        cdoc = await fetch("c1")
        validate(cdoc)
        assert cdoc["state"] == "connected" and cdoc["connects"] == 1
        assert cdoc["relay"] == "127.0.0.1:4433" and cdoc["nat"] is None
        assert cdoc["fwmark"] == InstanceIds("c1").fwmark
        (t,) = cdoc["sessions"]
        assert (t["tx_packets"], t["rx_packets"], t["rx_bytes"]) == (3, 1, len(back))
        assert cdoc["relay_routes"] == ["198.19.0.0/24", "2001:db8:19::/64"]

        text = render_text(rdoc)
        assert "session: " in text and "198.18.200.2/32" in text
        assert "-A MASQUED-relay -s 198.18.200.0/24 -o eth0 -j MASQUERADE" in text
        assert "spoofed_source 1" in text and "requests: accepted 1" in text
        assert "tunnel: 127.0.0.1:" in render_text(cdoc)

        # The client's document after the relay goes away: reconnecting, no QUIC figures.
        relay.close()
        await until(lambda: client.tunnel.status.state == "reconnecting")
        cdoc = await fetch("c1")
        validate(cdoc)
        assert cdoc["sessions"][0]["rtt_ms"] is None
        assert "reconnecting" in render_text(cdoc)
    finally:
        await client.close()
        await csvc.close()
        await rsvc.close()
        relay.close()
    assert not socket_path("relay").exists() and not socket_path("c1").exists()


async def test_nat_listing_is_cached_and_can_be_skipped(certs: Path, run_dir: Path) -> None:
    calls: list[int] = []

    class CountingNat(FakeNat):
        def describe(self) -> str:
            calls.append(1)
            return super().describe()

    relay = Relay(certs, ("198.18.200.0/24",))
    svc = StatusService(
        lambda: relay_config(certs), relay.server.snapshot, nat=CountingNat(InstanceIds("relay"))
    )
    await svc.start()
    try:
        await fetch("relay")
        await fetch("relay")
        assert len(calls) == 1
        doc = await fetch("relay", nat=False)
        assert doc["nat"] == {"backend": "nftables", "commands": [], "rules": []}
        validate(doc)
    finally:
        await svc.close()
        relay.close()


async def test_metrics_endpoint_serves_the_same_counters(certs: Path, run_dir: Path) -> None:
    relay = Relay(certs, ("198.18.200.0/24",))
    cfg = relay_config(certs, metrics=MetricsEndpoint(host="127.0.0.1", port=0))
    svc = StatusService(lambda: cfg, relay.server.snapshot)
    await svc.start()
    client = Client(certs, relay.port)
    try:
        await asyncio.wait_for(client.up, 5)
        assert svc.metrics is not None
        client.tun.inject(build_udp(client.address, "198.19.0.2", 1, 2, b"x" * 500))
        await until(lambda: len(relay.tun.written) == 1)
        text = await asyncio.to_thread(scrape, svc.metrics.address)
        values = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }
        assert values[("masqued_bytes_total", (("direction", "rx"),))] == 528
        assert values[("masqued_sessions_open", ())] == 1
    finally:
        await client.close()
        await svc.close()
        relay.close()


async def test_watch_draws_rates(certs: Path, run_dir: Path) -> None:
    relay = Relay(certs, ("198.18.200.0/24",))
    svc = StatusService(lambda: relay_config(certs), relay.server.snapshot)
    await svc.start()
    frames: list[str] = []
    try:
        await asyncio.to_thread(
            status.watch, "relay", interval=0.1, count=2, write=frames.append, clear=False
        )
    finally:
        await svc.close()
        relay.close()
    assert len(frames) == 2
    assert frames[0].startswith("Every 0.1s: masqued status relay")
    assert "rate: rx 0 bit/s (0 pkt/s)" in frames[1] and "rate:" not in frames[0]


def test_compute_rates() -> None:
    prev = {
        "time": 10.0,
        "sessions": [{"id": "a", "rx_bytes": 0, "rx_packets": 0, "tx_bytes": 0, "tx_packets": 0}],
        "totals": {"rx_bytes": 0, "rx_packets": 0, "tx_bytes": 0, "tx_packets": 0},
    }
    cur = {
        "time": 12.0,
        "sessions": [
            {"id": "a", "rx_bytes": 2_500_000, "rx_packets": 2000, "tx_bytes": 0, "tx_packets": 0},
            {"id": "new", "rx_bytes": 5, "rx_packets": 5, "tx_bytes": 0, "tx_packets": 0},
        ],
        "totals": {"rx_bytes": 2_500_005, "rx_packets": 2005, "tx_bytes": 0, "tx_packets": 0},
    }
    rates = compute_rates(prev, cur)
    assert rates["a"] == {"rx_bps": 10_000_000.0, "rx_pps": 1000.0, "tx_bps": 0.0, "tx_pps": 0.0}
    assert "new" not in rates and "total" in rates
    assert compute_rates(None, cur) == {} and compute_rates(cur, cur) == {}
    assert status.human_rate(10_000_000) == "10.0 Mbit/s"


def test_formatting_helpers() -> None:
    assert status.human_bytes(512) == "512 B"
    assert status.human_bytes(3 * 1024 * 1024) == "3.00 MiB"
    assert status.human_duration(0) == "0 seconds"
    assert status.human_duration(3725) == "1 hour, 2 minutes"
    assert status.human_duration(90061) == "1 day, 1 hour"


def test_parse_nat_description() -> None:
    text = "# nft list table inet masqued_r\ntable inet masqued_r {\n\tchain postrouting {\n}"
    got = parse_nat_description("nftables", text)
    assert got["commands"] == ["nft list table inet masqued_r"]
    assert got["rules"][0] == "table inet masqued_r {"


async def test_schema_rejects_broken_documents(certs: Path, run_dir: Path) -> None:
    relay = Relay(certs, ("198.18.200.0/24",))
    svc = StatusService(lambda: relay_config(certs), relay.server.snapshot)
    await svc.start()
    client = Client(certs, relay.port)
    try:
        await asyncio.wait_for(client.up, 5)
        good = await fetch("relay")
    finally:
        await client.close()
        await svc.close()
        relay.close()
    validate(good)
    for path, value in (
        (("sessions", 0, "rx_bytes"), -1),
        (("sessions", 0, "transport"), "carrier-pigeon"),
        (("role",), "router"),
        (("totals", "drops", "acl"), "many"),
        (("tun",), {"name": "mq-relay"}),
    ):
        bad = json.loads(json.dumps(good))
        target: Any = bad
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        with pytest.raises(jsonschema.ValidationError):
            validate(bad)
