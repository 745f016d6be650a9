"""Why a packet was dropped: the one list of reasons, used as counter and metric labels."""

from __future__ import annotations

DROP_SPOOFED = "spoofed_source"  # a client's source is not its address (BCP 38)
DROP_MALFORMED = "malformed"  # not an IP packet we can parse
DROP_NO_SESSION = "no_session"  # from the TUN to an address no session holds
DROP_QUEUE_FULL = "queue_full"  # the tunnel's send bound was reached (tail drop)
DROP_TUN_WRITE = "tun_write"  # the kernel refused the TUN write
DROP_OVERSIZED = "oversized"  # larger than the tunnel carries (Packet Too Big sent)
DROP_DISCONNECTED = "disconnected"  # client: no tunnel at the moment
DROP_ACL = "acl"  # the client's ACL denies it (ICMP prohibited sent)
DROP_OUT_OF_SCOPE = "out_of_scope"  # outside a scoped request's target or protocol
DROP_LINK_LOCAL = "link_local"  # link-local destination: never forwarded (RFC 9484 §7)
DROP_TTL_EXPIRED = "ttl_expired"  # TTL / hop limit would reach 0 on encapsulation
DROP_UNKNOWN_CONTEXT = "unknown_context"  # an HTTP Datagram context we never registered
DROP_UNKNOWN_STREAM = "unknown_stream"  # an HTTP Datagram for no open tunnel

# Reasons shown (as 0) before the first drop, so dashboards have the series.
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
