"""One family of errors for everything a peer can get wrong.

Core code raises these; the transport adapter turns them into an HTTP status
(``RequestError``) or a stream/connection abort carrying ``wire_code``.
"""

from __future__ import annotations

# HTTP/3 error codes (RFC 9114 §8.1) used when we abort a stream or close a
# connection; an HTTP/2 link maps them to its own (RFC 9114 §A.4).
H3_NO_ERROR = 0x100
H3_GENERAL_PROTOCOL_ERROR = 0x101
H3_INTERNAL_ERROR = 0x102
H3_EXCESSIVE_LOAD = 0x107
H3_REQUEST_REJECTED = 0x10B
H3_REQUEST_CANCELLED = 0x10C
H3_MESSAGE_ERROR = 0x10E
H3_DATAGRAM_ERROR = 0x33  # RFC 9297 §5.2


class ProtocolError(Exception):
    """A peer violated the wire protocol; abort the stream with ``wire_code``."""

    wire_code: int = H3_MESSAGE_ERROR

    def __init__(self, reason: str, wire_code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if wire_code is not None:
            self.wire_code = wire_code


class FramingError(ProtocolError):
    """Stream mode: a bad ``u16 length || packet`` record."""


class CapsuleError(ProtocolError):
    """A malformed capsule (RFC 9297 §3.2)."""


class PacketError(ProtocolError):
    """An IP packet we cannot parse (dropped and counted, never fatal to the session)."""


class RequestError(ProtocolError):
    """A CONNECT-IP request we refuse: answer with HTTP ``status``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class ResponseError(ProtocolError):
    """The relay's response is not something a client can use."""
