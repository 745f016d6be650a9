"""Stream-mode framing: each record is ``u16 big-endian length || IP packet``.

This is the data plane of our stream transport (docs/architecture.md §3): after a 2xx response
the CONNECT stream carries nothing but these records, in both directions.

The decoder is incremental (any split of the byte stream yields the same packets),
bounded (it never buffers more than one partial record) and on the hot path, so the
common case -- a chunk holding many whole records -- is index arithmetic over the
chunk itself with one slice per packet and no intermediate copies.
"""

from __future__ import annotations

from collections.abc import Iterable

from masqued.proto.errors import FramingError

#: Largest packet a u16 length can describe.
MAX_FRAME_PACKET = 0xFFFF

_HEADER = 2


def encode_frame(packet: bytes) -> bytes:
    """Return one stream-mode record carrying ``packet``.

    Raises ValueError for an empty packet or one longer than 65535 bytes: both are
    bugs on our side (the peer would reject the record), not peer errors.
    """
    n = len(packet)
    if not 0 < n <= MAX_FRAME_PACKET:
        raise ValueError(f"cannot frame a packet of {n} bytes")
    return n.to_bytes(2, "big") + packet


def encode_frames(packets: Iterable[bytes]) -> bytes:
    """Return the records for all ``packets`` concatenated (one join, no re-copying)."""
    parts: list[bytes] = []
    append = parts.append
    for packet in packets:
        n = len(packet)
        if not 0 < n <= MAX_FRAME_PACKET:
            raise ValueError(f"cannot frame a packet of {n} bytes")
        append(n.to_bytes(2, "big"))
        append(packet)
    return b"".join(parts)


class FrameDecoder:
    """Incremental decoder for stream-mode records.

    ``feed()`` returns every packet completed by the new data. A record length of 0
    or above ``max_packet`` raises FramingError as soon as the two length bytes have
    arrived; the decoder is then failed and every later ``feed()`` raises again.
    """

    __slots__ = ("_buf", "_failed", "_max")

    def __init__(self, max_packet: int) -> None:
        if not 0 < max_packet <= MAX_FRAME_PACKET:
            raise ValueError(f"max_packet must be in 1..{MAX_FRAME_PACKET}, not {max_packet}")
        self._max = max_packet
        # At most one partial record: ≤ max_packet + 2 bytes.
        self._buf = bytearray()
        self._failed = False

    @property
    def max_packet(self) -> int:
        return self._max

    @property
    def buffered(self) -> int:
        """Bytes held of a record that is not complete yet."""
        return len(self._buf)

    @property
    def failed(self) -> bool:
        return self._failed

    def _fail(self, length: int) -> FramingError:
        self._failed = True
        self._buf.clear()
        if length == 0:
            return FramingError("stream record of length 0")
        return FramingError(f"stream record of {length} bytes exceeds the limit of {self._max}")

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Consume ``data``; return the packets it completes, in order."""
        if self._failed:
            raise FramingError("stream framing already failed")
        if not isinstance(data, bytes):
            data = bytes(data)
        out: list[bytes] = []
        n = len(data)
        pos = 0
        buf = self._buf
        limit = self._max

        if buf:
            # Finish the partial record from the previous call first.
            if len(buf) < _HEADER:
                pos = _HEADER - len(buf)
                buf += data[:pos]
                if len(buf) < _HEADER:
                    return out
            length = (buf[0] << 8) | buf[1]
            if length == 0 or length > limit:
                raise self._fail(length)
            need = length + _HEADER - len(buf)
            if need > n - pos:
                buf += data[pos:]
                return out
            buf += data[pos : pos + need]
            pos += need
            out.append(bytes(buf[_HEADER:]))
            buf.clear()

        # Fast path: whole records straight out of ``data``.
        while n - pos >= _HEADER:
            length = (data[pos] << 8) | data[pos + 1]
            if length == 0 or length > limit:
                raise self._fail(length)
            end = pos + _HEADER + length
            if end > n:
                break
            out.append(data[pos + _HEADER : end])
            pos = end
        if pos < n:
            buf += data[pos:]
        return out
