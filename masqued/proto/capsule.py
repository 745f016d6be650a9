"""RFC 9297 capsules: ``Capsule Type (i) || Capsule Length (i) || Capsule Value``.

The capsule protocol is the data stream of a CONNECT-IP request in datagram mode
(docs/architecture.md §3): control capsules (RFC 9484 §4.7) and DATAGRAM capsules (RFC 9297
§3.5) travel there, in DATA frames of the request stream.

``CapsuleDecoder`` is incremental (any split of the stream yields the same
capsules) and bounded: it holds at most one capsule header (≤ 16 bytes) plus the
value of one known capsule no longer than its limit. Capsules of unknown types are
skipped as their bytes go by, never buffered (RFC 9297 §3.2), as are DATAGRAM
capsules too large to be usable (RFC 9297 §3.5). Any other problem raises
``CapsuleError`` (a malformed message, RFC 9297 §3.3 -> H3_MESSAGE_ERROR).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from masqued.proto.errors import CapsuleError

# Capsule types (IANA "HTTP Capsule Types").
DATAGRAM = 0x00  # RFC 9297 §3.5
ADDRESS_ASSIGN = 0x01  # RFC 9484 §4.7.1
ADDRESS_REQUEST = 0x02  # RFC 9484 §4.7.2
ROUTE_ADVERTISEMENT = 0x03  # RFC 9484 §4.7.3

DNS_ASSIGN = 0x1ACE79EC  # draft-ietf-masque-connect-ip-dns-06 (provisional), proto/dns.py

CONNECT_IP_TYPES = frozenset(
    (DATAGRAM, ADDRESS_ASSIGN, ADDRESS_REQUEST, ROUTE_ADVERTISEMENT, DNS_ASSIGN)
)

#: Largest value of a QUIC variable-length integer (RFC 9000 §16).
VARINT_MAX = (1 << 62) - 1
#: Default limit for one known capsule's value: control capsules are small, and a
#: DATAGRAM capsule holds one IP packet.
DEFAULT_MAX_VALUE = 65535 + 16


def encode_varint(value: int) -> bytes:
    """Minimal QUIC varint encoding of ``value`` (ValueError outside 0..2^62-1)."""
    if value < 0x40:
        if value < 0:
            raise ValueError(f"varint {value} is negative")
        return bytes((value,))
    if value < 0x4000:
        return (value | 0x4000).to_bytes(2, "big")
    if value < 0x4000_0000:
        return (value | 0x8000_0000).to_bytes(4, "big")
    if value <= VARINT_MAX:
        return (value | 0xC000_0000_0000_0000).to_bytes(8, "big")
    raise ValueError(f"varint {value} exceeds 2^62-1")


def varint_size(value: int) -> int:
    """Bytes the minimal encoding of ``value`` takes."""
    if value < 0x40:
        return 1
    if value < 0x4000:
        return 2
    if value < 0x4000_0000:
        return 4
    return 8


def decode_varint(data: bytes | bytearray | memoryview, pos: int = 0) -> tuple[int, int] | None:
    """Decode the varint at ``data[pos]``: ``(value, next_pos)``, or None if incomplete.

    Non-minimal encodings are accepted (RFC 9000 §16 allows them).
    """
    if pos >= len(data):
        return None
    first = data[pos]
    size = 1 << (first >> 6)
    end = pos + size
    if end > len(data):
        return None
    value = first & 0x3F
    for i in range(pos + 1, end):
        value = (value << 8) | data[i]
    return value, end


def _decode_header(data: bytes | bytearray, pos: int) -> tuple[int, int, int] | None:
    """``(type, length, end)`` of the capsule header at ``pos``, or None if incomplete."""
    got_type = decode_varint(data, pos)
    if got_type is None:
        return None
    got_len = decode_varint(data, got_type[1])
    if got_len is None:
        return None
    return got_type[0], got_len[0], got_len[1]


def read_varint(data: bytes, pos: int, what: str) -> tuple[int, int]:
    """Like ``decode_varint`` for data that must be complete: truncation is a CapsuleError."""
    got = decode_varint(data, pos)
    if got is None:
        raise CapsuleError(f"truncated {what}")
    return got


@dataclass(frozen=True, slots=True)
class Capsule:
    """One decoded capsule of a known type."""

    type: int
    value: bytes


def encode_capsule(capsule_type: int, value: bytes) -> bytes:
    """Return one capsule: type, length and ``value``."""
    return encode_varint(capsule_type) + encode_varint(len(value)) + value


def encode_datagram_capsule(payload: bytes) -> bytes:
    """A DATAGRAM capsule (RFC 9297 §3.5) carrying the HTTP Datagram ``payload``."""
    return encode_capsule(DATAGRAM, payload)


class CapsuleDecoder:
    """Incremental capsule decoder for one request stream.

    ``feed()`` returns every capsule of a type in ``known_types`` that the new
    data completes; other capsules are skipped (``skipped`` counts them), as are
    DATAGRAM capsules longer than ``max_datagram`` (``oversized`` counts them). A
    known non-DATAGRAM capsule longer than ``max_value`` raises CapsuleError: we
    cannot process it and will not buffer it. After an error the decoder is failed
    and every later call raises again. ``end()`` checks, at the end of the stream,
    that it did not stop inside a capsule (RFC 9297 §3.3).
    """

    __slots__ = (
        "_buf",
        "_failed",
        "_known",
        "_max_datagram",
        "_max_value",
        "_need",
        "_skip",
        "_type",
        "oversized",
        "skipped",
    )

    def __init__(
        self,
        known_types: Collection[int] = CONNECT_IP_TYPES,
        max_value: int = DEFAULT_MAX_VALUE,
        max_datagram: int | None = None,
    ) -> None:
        if max_value < 0:
            raise ValueError("max_value must not be negative")
        self._known = frozenset(known_types)
        self._max_value = max_value
        self._max_datagram = max_value if max_datagram is None else max_datagram
        self._buf = bytearray()  # a partial header, or the value being collected
        self._type: int | None = None  # type of the capsule whose value is collected
        self._need = 0  # value bytes still missing
        self._skip = 0  # bytes of a skipped capsule still to discard
        self._failed = False
        self.skipped = 0
        self.oversized = 0

    @property
    def buffered(self) -> int:
        """Bytes held for a capsule that is not complete yet."""
        return len(self._buf)

    @property
    def failed(self) -> bool:
        return self._failed

    @property
    def in_capsule(self) -> bool:
        """True while the stream is inside a capsule (header, value or skipped value)."""
        return bool(self._buf) or self._type is not None or self._skip > 0

    def _fail(self, reason: str) -> CapsuleError:
        self._failed = True
        self._buf.clear()
        self._type = None
        return CapsuleError(reason)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Capsule]:
        """Consume ``data``; return the capsules it completes, in order."""
        if self._failed:
            raise CapsuleError("capsule stream already failed")
        if not isinstance(data, bytes):
            data = bytes(data)
        out: list[Capsule] = []
        n = len(data)
        pos = 0
        while pos < n:
            if self._skip:
                take = min(self._skip, n - pos)
                self._skip -= take
                pos += take
                continue
            if self._type is not None:
                take = min(self._need, n - pos)
                self._buf += data[pos : pos + take]
                self._need -= take
                pos += take
                if not self._need:
                    out.append(Capsule(self._type, bytes(self._buf)))
                    self._buf.clear()
                    self._type = None
                continue
            # A header: type and length, possibly split across calls (≤ 16 bytes).
            buf = self._buf
            if buf:
                before = len(buf)
                buf += data[pos : pos + 16]
                header = _decode_header(buf, 0)
                if header is None:
                    pos += len(buf) - before
                    continue
                capsule_type, length, header_end = header
                pos += header_end - before
                buf.clear()
            else:
                header = _decode_header(data, pos)
                if header is None:
                    buf += data[pos:]
                    return out
                capsule_type, length, pos = header
            if capsule_type not in self._known:
                self.skipped += 1
                self._skip = length
                continue
            limit = self._max_datagram if capsule_type == DATAGRAM else self._max_value
            if length > limit:
                if capsule_type == DATAGRAM:
                    # RFC 9297 §3.5: discard without buffering.
                    self.oversized += 1
                    self._skip = length
                    continue
                raise self._fail(
                    f"capsule type {capsule_type:#x} of {length} bytes exceeds the limit "
                    f"of {self._max_value}"
                )
            if length == 0:
                out.append(Capsule(capsule_type, b""))
                continue
            self._type = capsule_type
            self._need = length
        return out

    def end(self) -> None:
        """The stream ended cleanly: raise CapsuleError if a capsule was cut short."""
        if self._failed:
            raise CapsuleError("capsule stream already failed")
        if self.in_capsule:
            raise self._fail("stream ended inside a capsule")


def encode_capsules(capsules: Iterable[tuple[int, bytes]]) -> bytes:
    """Concatenate several capsules."""
    return b"".join(encode_capsule(t, v) for t, v in capsules)
