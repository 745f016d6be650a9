"""Counters kept by the data path, cheap enough to bump per packet."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# Drop reasons (label values; a bounded set).
DROP_SPOOFED = "spoofed_source"
DROP_MALFORMED = "malformed"
DROP_NO_SESSION = "no_session"
DROP_QUEUE_FULL = "queue_full"
DROP_TUN_WRITE = "tun_write"
DROP_OVERSIZED = "oversized"
DROP_DISCONNECTED = "disconnected"


@dataclass
class TrafficCounters:
    """Packets and bytes in each direction plus drops by reason.

    ``rx`` is what came from the peer (QUIC side), ``tx`` what we sent to it.
    """

    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    drops: Counter[str] = field(default_factory=Counter)

    def snapshot(self) -> dict[str, Any]:
        return {
            "rx_packets": self.rx_packets,
            "rx_bytes": self.rx_bytes,
            "tx_packets": self.tx_packets,
            "tx_bytes": self.tx_bytes,
            "drops": dict(self.drops),
        }

    def add(self, other: TrafficCounters) -> None:
        self.rx_packets += other.rx_packets
        self.rx_bytes += other.rx_bytes
        self.tx_packets += other.tx_packets
        self.tx_bytes += other.tx_bytes
        self.drops.update(other.drops)
