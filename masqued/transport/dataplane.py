"""The two data planes of a tunnel, as strategies: how IP packets leave on a link.

``StreamPlane`` frames packets onto the request stream (masqued's stream mode);
``DatagramPlane`` sends each packet as an HTTP Datagram, or as a DATAGRAM capsule on
the stream when the peer takes no datagrams (RFC 9484). Both drop rather than queue
without end: the stream's unacknowledged bytes, or the connection's bytes in flight
plus its queued datagrams, stay under a bound in time (``BacklogBound``) derived from
what the peer acknowledges (README, Performance: why these figures).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

from masqued.observe.metrics import TrafficCounters
from masqued.proto.capsule import encode_datagram_capsule
from masqued.proto.connect_ip import encode_ip_datagram
from masqued.proto.drops import DROP_OVERSIZED, DROP_QUEUE_FULL
from masqued.proto.framing import encode_frame, encode_frames
from masqued.proto.framings import Mode
from masqued.transport.link import Link

# Datagrams waiting in the engine's queue beyond which new ones are dropped whatever
# the bound allows: bounds the count (memory) when the datagrams are small.
DATAGRAM_QUEUE_LIMIT = 1024
# What one datagram adds to the bytes in flight besides its payload, at most (packet
# header, AEAD tag, frame header, connection ID).
DATAGRAM_COST = 1 + 4 + 16 + 1 + 2 + 20


class BacklogBound:
    """How many unacknowledged bytes a tunnel may hold before packets are dropped
    (tail drop, like a router queue): acknowledged rate x (min RTT + QUEUE_TARGET),
    kept between FLOOR and CEILING, so the queue is ~QUEUE_TARGET whatever the speed."""

    QUEUE_TARGET = 0.006
    FLOOR = 64 * 1024
    CEILING = 4 * 1024 * 1024
    WINDOW = 0.025  # rate samples span at least this long ...
    SHORT_WINDOW = 0.003  # ... or this (and one min RTT) while the bound is dropping
    RATE_HORIZON = 1.0  # the rate is the best sample of this long (a max filter)
    REST = 0.1  # unused this long: the next packets start a new flow, sampled alone
    # Above the bound for less than GRACE, up to GRACE_FACTOR times it may be held
    # (CoDel's burst vs standing queue): host stalls of a few ms must not drop.
    GRACE = 0.010
    GRACE_FACTOR = 2

    def __init__(self) -> None:
        self.limit = self.FLOOR
        self.rate = 0.0  # acknowledged bytes per second (best recent window)
        # Set by whoever dropped a packet because of the bound since the last sample.
        self.limited = False
        self._at: float | None = None
        self._acked = 0
        self._samples: collections.deque[tuple[float, float]] = collections.deque()
        self._used: float | None = None  # last follow()
        self._over_since: float | None = None  # above the bound since then

    def follow(self, link: Link, acked: int, now: float) -> int:
        """The bound now, from ``acked``: a count of acknowledged bytes that only grows."""
        used, self._used = self._used, now
        if self._at is None or used is None or now - used > self.REST:
            self._at, self._acked = now, acked
            return self.limit
        elapsed = now - self._at
        if elapsed < self.WINDOW and not (
            self.limited and elapsed >= self.SHORT_WINDOW and elapsed >= link.min_rtt()
        ):
            return self.limit
        min_rtt = link.min_rtt()
        sample = (acked - self._acked) / elapsed
        self._at, self._acked = now, acked
        self.limited = False
        # A max filter, as BBR keeps its bandwidth estimate: rises at once when a
        # transfer starts, and a dip does not shrink the bound and deepen itself.
        samples = self._samples
        samples.append((now, sample))
        while samples[0][0] < now - self.RATE_HORIZON:
            samples.popleft()
        self.rate = max(r for _, r in samples)
        self.limit = int(
            min(self.CEILING, max(self.FLOOR, self.rate * (min_rtt + self.QUEUE_TARGET)))
        )
        return self.limit

    def room(self, bound: int, used: int, now: float) -> int:
        """Bytes that may still be queued now, with ``used`` bytes held (in flight or
        queued) against ``bound``: up to GRACE_FACTOR times the bound unless ``used``
        has stayed above the bound for GRACE."""
        if used <= bound:
            self._over_since = None
        elif self._over_since is None:
            self._over_since = now
        elif now - self._over_since >= self.GRACE:
            return bound - used
        return bound * self.GRACE_FACTOR - used


class DatagramBound(BacklogBound):
    """Datagram mode's bound: the connection's bytes in flight plus the datagrams in
    the engine's queue stay below acknowledged rate x (min RTT + QUEUE_TARGET).
    ``refresh`` once per batch of packets, then ``queue`` spends ``budget``."""

    def __init__(self) -> None:
        super().__init__()
        self.budget = self.FLOOR

    def refresh(self, link: Link, now: float) -> int:
        """Recompute ``budget``: the bytes that may still be queued now."""
        delivered = link.delivered()
        limit = self.limit if delivered is None else self.follow(link, delivered, now)
        _, queued = link.datagrams_queued()
        self.budget = self.room(limit, link.in_flight() + queued, now)
        return self.budget

    def queue(self, link: Link, stream_id: int, payload: bytes) -> str:
        """Queue one HTTP Datagram; "" when queued, else the drop reason. The caller
        checked the size (it answers with Packet Too Big); this check is the safety
        net that keeps an oversized datagram out of the engine's queue, where it would
        block every later one."""
        if len(payload) > link.datagram_room(stream_id):
            return DROP_OVERSIZED
        cost = len(payload) + DATAGRAM_COST
        if cost > self.budget or link.datagrams_queued()[0] >= DATAGRAM_QUEUE_LIMIT:
            self.limited = True
            return DROP_QUEUE_FULL
        self.budget -= cost
        link.send_datagram(stream_id, payload)
        return ""


def _bounds(link: Link) -> DatagramBound:
    """The link's one DatagramBound (its datagram queue is per connection)."""
    bound: DatagramBound | None = getattr(link, "datagram_bound", None)
    if bound is None:
        bound = DatagramBound()
        link.datagram_bound = bound  # type: ignore[attr-defined]
    return bound


class DataPlane:
    """How one tunnel's packets leave on its link (the strategy for its mode)."""

    mode: Mode

    def __init__(self, link: Link, stream_id: int, mtu: int) -> None:
        self.link = link
        self.stream_id = stream_id
        self.mtu = mtu

    def room(self) -> int:
        """The largest IP packet that can leave now."""
        raise NotImplementedError

    def send(self, packets: list[bytes], counters: TrafficCounters) -> int:
        """Send a batch: drops counted; returns how many were queued."""
        raise NotImplementedError

    def send_one(self, packet: bytes) -> str:
        """One packet outside a batch (an ICMP error): "" or the drop reason."""
        raise NotImplementedError

    def stream_bound(self) -> BacklogBound:
        """The bound of what the request stream may hold unacknowledged."""
        raise NotImplementedError

    def send_control(self, data: bytes) -> bool:
        """Control bytes for the request stream (capsules answering the peer), within
        the stream's bound like packets; False, and nothing queued, when they do not
        fit: a peer that asks without taking the answers."""
        sid = self.stream_id
        if self.link.stream_backlog(sid) + len(data) > self.stream_bound().limit:
            return False
        self.link.send_data(sid, data)
        return True


def send_on_stream(
    link: Link,
    stream_id: int,
    bound: BacklogBound,
    packets: list[bytes],
    counters: TrafficCounters,
    mtu: int,
    encode: Callable[[list[bytes]], bytes],
    overhead: int,
) -> int:
    """Queue a batch on the request stream in one write, within ``bound`` (each packet
    costs its size plus ``overhead`` framing bytes); drops counted; returns how many
    were queued."""
    now = time.monotonic()
    acked = link.stream_acked(stream_id)
    limit = bound.limit if acked is None else bound.follow(link, acked, now)
    budget = bound.room(limit, link.stream_backlog(stream_id), now)
    batch: list[bytes] = []
    nbytes = 0
    drops = counters.drops
    for pkt in packets:
        size = len(pkt)
        if size > mtu:
            drops[DROP_OVERSIZED] += 1
            continue
        if nbytes + size + overhead > budget:
            drops[DROP_QUEUE_FULL] += 1
            bound.limited = True
            continue
        batch.append(pkt)
        nbytes += size + overhead
    if not batch:
        return 0
    counters.sent(len(batch), nbytes - overhead * len(batch))
    link.send_data(stream_id, encode(batch))
    return len(batch)


class StreamPlane(DataPlane):
    """Stream mode: ``u16 length || packet`` records in DATA on the request stream."""

    mode = Mode.STREAM

    def __init__(self, link: Link, stream_id: int, mtu: int) -> None:
        super().__init__(link, stream_id, mtu)
        self.bound = BacklogBound()

    def room(self) -> int:
        return self.mtu

    def send(self, packets: list[bytes], counters: TrafficCounters) -> int:
        return send_on_stream(
            self.link, self.stream_id, self.bound, packets, counters, self.mtu, encode_frames, 2
        )

    def send_one(self, packet: bytes) -> str:
        if self.link.stream_backlog(self.stream_id) > self.bound.limit:
            return DROP_QUEUE_FULL
        self.link.send_data(self.stream_id, encode_frame(packet))
        return ""

    def stream_bound(self) -> BacklogBound:
        return self.bound


def encode_capsules(packets: list[bytes]) -> bytes:
    """IP packets as DATAGRAM capsules (RFC 9297 §3.5) with context ID 0."""
    return b"".join([encode_datagram_capsule(encode_ip_datagram(p)) for p in packets])


# A DATAGRAM capsule around an IP packet below 16 KiB: type, length, context ID.
CAPSULE_OVERHEAD = 1 + 2 + 1


class DatagramPlane(DataPlane):
    """Datagram mode: one HTTP Datagram per packet (context ID 0), or DATAGRAM
    capsules on the stream when the link takes no datagrams (RFC 9297 §3.5: HTTP/2,
    or an HTTP/3 peer without them), bounded in time like stream mode."""

    mode = Mode.DATAGRAM

    def __init__(self, link: Link, stream_id: int, mtu: int) -> None:
        super().__init__(link, stream_id, mtu)
        self.capsule_bound = BacklogBound()  # the stream's, for capsules

    def room(self) -> int:
        if not self.link.accepts_datagrams():
            return self.mtu
        # Largest IP packet one datagram carries (context ID 0 takes a byte).
        return self.link.datagram_room(self.stream_id) - 1

    def send(self, packets: list[bytes], counters: TrafficCounters) -> int:
        link, sid = self.link, self.stream_id
        if not link.accepts_datagrams():
            return send_on_stream(
                link,
                sid,
                self.capsule_bound,
                packets,
                counters,
                self.mtu,
                encode_capsules,
                CAPSULE_OVERHEAD,
            )
        drops = counters.drops
        bound = _bounds(link)
        bound.refresh(link, time.monotonic())
        sent = nbytes = 0
        for pkt in packets:
            reason = bound.queue(link, sid, encode_ip_datagram(pkt))
            if reason:
                drops[reason] += 1
                continue
            sent += 1
            nbytes += len(pkt)
        if sent:
            counters.sent(sent, nbytes)
        return sent

    def send_one(self, packet: bytes) -> str:
        link = self.link
        if not link.accepts_datagrams():
            if link.stream_backlog(self.stream_id) > self.capsule_bound.limit:
                return DROP_QUEUE_FULL
            link.send_data(self.stream_id, encode_capsules([packet]))
            return ""
        bound = _bounds(link)
        # A lone packet refreshes the budget: one spent long ago must not stick.
        bound.refresh(link, time.monotonic())
        return bound.queue(link, self.stream_id, encode_ip_datagram(packet))

    def stream_bound(self) -> BacklogBound:
        return self.capsule_bound


def plane_for(mode: Mode, link: Link, stream_id: int, mtu: int) -> DataPlane:
    return (StreamPlane if mode is Mode.STREAM else DatagramPlane)(link, stream_id, mtu)
