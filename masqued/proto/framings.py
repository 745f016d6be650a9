"""The two framings of a CONNECT-IP request stream, as small strategy objects.

``stream`` (masqued's own: only ``u16 length || packet`` records) and ``datagram``
(RFC 9484: capsules; IP packets in HTTP Datagrams or DATAGRAM capsules, context 0).
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable

from masqued.proto.capsule import DATAGRAM, Capsule, CapsuleDecoder, encode_datagram_capsule
from masqued.proto.connect_ip import decode_datagram_payload, encode_ip_datagram
from masqued.proto.drops import DROP_MALFORMED, DROP_OVERSIZED, DROP_UNKNOWN_CONTEXT
from masqued.proto.errors import CapsuleError, ProtocolError
from masqued.proto.framing import FrameDecoder, encode_frames

# Largest IP packet without jumbograms (RFC 791, RFC 8200 §3).
MAX_IP_PACKET = 65535
# Largest control capsule either side accepts (a few hundred addresses or ranges);
# a longer one aborts the stream without being buffered.
MAX_CONTROL_CAPSULE = 16384


class Mode(enum.Enum):
    """How packets and control share the request stream."""

    STREAM = "stream"  # u16-length records; parameters in response headers
    DATAGRAM = "datagram"  # RFC 9484 capsules; packets in HTTP Datagrams

    def __str__(self) -> str:
        return self.value


class Framing:
    """The request stream's framing for one tunnel: what arrives, what we write."""

    def decode(self, data: bytes) -> tuple[list[bytes], list[Capsule]]:
        """Packets and control capsules that ``data`` completes; ProtocolError if bad."""
        raise NotImplementedError

    def end(self) -> None:
        """The peer finished the stream; ProtocolError if it stopped mid-record."""
        raise NotImplementedError

    def encode_packets(self, packets: Iterable[bytes]) -> bytes:
        """``packets`` as bytes for the request stream."""
        raise NotImplementedError


class RecordFraming(Framing):
    """Stream mode: nothing but ``u16 length || packet`` records (masqued.proto.framing)."""

    def __init__(self, mtu: int) -> None:
        self._decoder = FrameDecoder(mtu)

    def decode(self, data: bytes) -> tuple[list[bytes], list[Capsule]]:
        return self._decoder.feed(data), []

    def end(self) -> None:
        if self._decoder.buffered:
            raise ProtocolError("stream ended inside a record")

    def encode_packets(self, packets: Iterable[bytes]) -> bytes:
        return encode_frames(packets)


class CapsuleFraming(Framing):
    """Datagram mode: capsules (RFC 9297 §3); IP packets may come in DATAGRAM capsules
    (§3.5, context ID 0), which a peer without QUIC datagrams sends."""

    def __init__(self, mtu: int, drops: Counter[str]) -> None:
        # A DATAGRAM capsule holds a context ID (≤ 8 bytes) and one IP packet: one
        # above the MTU is kept (and answered with Packet Too Big, as a QUIC
        # datagram would be, RFC 9484 §7.2); a longer capsule holds no IP packet and
        # is skipped as it streams by, never buffered.
        self._decoder = CapsuleDecoder(
            max_value=MAX_CONTROL_CAPSULE, max_datagram=max(mtu, MAX_IP_PACKET) + 8
        )
        self._drops = drops

    def decode(self, data: bytes) -> tuple[list[bytes], list[Capsule]]:
        packets: list[bytes] = []
        control: list[Capsule] = []
        decoder = self._decoder
        oversized = decoder.oversized
        capsules = decoder.feed(data)
        if decoder.oversized != oversized:
            self._drops[DROP_OVERSIZED] += decoder.oversized - oversized
        for capsule in capsules:
            if capsule.type != DATAGRAM:
                control.append(capsule)
                continue
            context_id, payload = decode_datagram_payload(capsule.value)
            if context_id == 0:
                packets.append(payload)
            else:
                self._drops[DROP_UNKNOWN_CONTEXT] += 1  # RFC 9484 §6
        return packets, control

    def end(self) -> None:
        self._decoder.end()

    def encode_packets(self, packets: Iterable[bytes]) -> bytes:
        return b"".join(encode_datagram_capsule(encode_ip_datagram(p)) for p in packets)


def datagram_packet(payload: bytes, drops: Counter[str]) -> bytes | None:
    """The IP packet of an HTTP Datagram payload (RFC 9484 §6), None if dropped."""
    try:
        context_id, packet = decode_datagram_payload(payload)
    except CapsuleError:
        drops[DROP_MALFORMED] += 1
        return None
    if context_id != 0:
        drops[DROP_UNKNOWN_CONTEXT] += 1
        return None
    return packet
