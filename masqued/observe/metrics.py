"""Counters kept by the data path (their Prometheus exposition is masqued.observe.exposition).

The data path only bumps plain integers (``TrafficCounters``) and a fixed-bucket
``LatencyHistogram``; nothing here touches a prometheus object per packet, and this
module does not even import prometheus-client: a daemon without ``metrics`` never
loads it (it is a sizeable share of a client's start-up).

Label values are bounded: directions, drop reasons and session results are fixed
sets in the code; per-client series exist only when the operator asks for them
(``metrics_per_client = true``) and are capped at ``MAX_CLIENT_SERIES`` sessions.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("masqued.observe.metrics")

# Drop reasons (label values; a bounded set).
DROP_SPOOFED = "spoofed_source"
DROP_MALFORMED = "malformed"
DROP_NO_SESSION = "no_session"
DROP_QUEUE_FULL = "queue_full"
DROP_TUN_WRITE = "tun_write"
DROP_OVERSIZED = "oversized"
DROP_DISCONNECTED = "disconnected"
DROP_ACL = "acl"
DROP_OUT_OF_SCOPE = "out_of_scope"

# Reasons shown (as 0) even before the first drop, so dashboards have the series.
DROP_REASONS = (
    DROP_SPOOFED,
    DROP_ACL,
    DROP_OVERSIZED,
    DROP_MALFORMED,
    DROP_OUT_OF_SCOPE,
    DROP_NO_SESSION,
    DROP_QUEUE_FULL,
    DROP_TUN_WRITE,
    DROP_DISCONNECTED,
)
# Results of CONNECT-IP requests on a relay (RelayServer.results keys).
SESSION_RESULTS = ("accepted", "rejected", "pool_exhausted")

# Handshake latency buckets in seconds: QUIC + TLS + the CONNECT round trip.
HANDSHAKE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# With per-client labels: at most this many sessions get their own series.
MAX_CLIENT_SERIES = 256
# Label values from the data path are cut to this length (they are code constants;
# this is a guard, not a normal case).
MAX_LABEL_LEN = 40


@dataclass
class TrafficCounters:
    """Packets and bytes in each direction plus drops by reason.

    ``rx`` is what came from the peer (QUIC side), ``tx`` what we sent to it.
    ``last_rx``/``last_tx`` are wall-clock times of the last batch (0.0: never),
    set once per batch rather than per packet.
    """

    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    drops: Counter[str] = field(default_factory=Counter)
    last_rx: float = 0.0
    last_tx: float = 0.0

    def snapshot(self) -> dict[str, Any]:
        return {
            "rx_packets": self.rx_packets,
            "rx_bytes": self.rx_bytes,
            "tx_packets": self.tx_packets,
            "tx_bytes": self.tx_bytes,
            "drops": dict(self.drops),
            "last_rx": self.last_rx or None,
            "last_tx": self.last_tx or None,
        }

    def sent(self, packets: int, nbytes: int) -> None:
        """``packets`` IP packets of ``nbytes`` in total went to the peer just now."""
        self.tx_packets += packets
        self.tx_bytes += nbytes
        self.last_tx = time.time()

    def add(self, other: TrafficCounters) -> None:
        self.rx_packets += other.rx_packets
        self.rx_bytes += other.rx_bytes
        self.tx_packets += other.tx_packets
        self.tx_bytes += other.tx_bytes
        self.drops.update(other.drops)
        self.last_rx = max(self.last_rx, other.last_rx)
        self.last_tx = max(self.last_tx, other.last_tx)

    def copy(self) -> TrafficCounters:
        return TrafficCounters(
            self.rx_packets,
            self.rx_bytes,
            self.tx_packets,
            self.tx_bytes,
            Counter(self.drops),
            self.last_rx,
            self.last_tx,
        )


@dataclass
class LatencyHistogram:
    """A fixed-bucket histogram cheap enough for the data path (one bisect per sample)."""

    bounds: tuple[float, ...] = HANDSHAKE_BUCKETS
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; +Inf last
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds
        self.count += 1

    def snapshot(self) -> dict[str, Any]:
        """Cumulative buckets as Prometheus has them; ``le`` null stands for +Inf."""
        buckets: list[dict[str, Any]] = []
        running = 0
        for i, n in enumerate(self.counts):
            running += n
            le = self.bounds[i] if i < len(self.bounds) else None
            buckets.append({"le": le, "count": running})
        return {"count": self.count, "sum": round(self.total, 6), "buckets": buckets}
