"""Name lookups that leave by the main table: DNS queries from sockets with a fwmark.

glibc's resolver sends its queries from unmarked sockets. With a full tunnel (or
routes covering the nameserver) those go into the tunnel, which is exactly what is
down when a reconnecting client needs the relay's address again. ``resolve_marked``
sends them from sockets carrying the instance's fwmark, which the tunnel's policy
rules leave to the main table (as the QUIC socket), to the nameservers of
/etc/resolv.conf. dnspython reads that file and builds and parses the messages;
this module only owns the sockets. Blocking, bounded by ``timeout`` per server and
query: call it from a thread.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rdatatype
import dns.resolver

RESOLV_CONF = "/etc/resolv.conf"
Address = tuple[str, int] | tuple[str, int, int, int]


class DnsError(Exception):
    """No address for the name from any nameserver; the message says what was tried."""


def _marked(family: int, kind: int, mark: int) -> socket.socket:
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    except OSError:
        sock.close()
        raise
    return sock


def _query(
    query: dns.message.Message, server: str, mark: int, timeout: float
) -> dns.message.Message:
    """One query to ``server`` over UDP, and over TCP when the answer was truncated."""
    family = socket.AF_INET6 if ipaddress.ip_address(server).version == 6 else socket.AF_INET
    with _marked(family, socket.SOCK_DGRAM, mark) as udp:
        answer = dns.query.udp(query, server, timeout=timeout, sock=udp)
    if not answer.flags & dns.flags.TC:
        return answer
    with _marked(family, socket.SOCK_STREAM, mark) as tcp:
        tcp.settimeout(timeout)
        tcp.connect((server, 53))
        return dns.query.tcp(query, server, timeout=timeout, sock=tcp)


def _candidates(host: str, resolver: dns.resolver.Resolver) -> list[dns.name.Name]:
    """The name as given when it has a dot, else with each search domain first."""
    name = dns.name.from_text(host)  # absolute
    if "." in host.rstrip("."):
        return [name]
    relative = dns.name.from_text(host, origin=None)
    return [relative.concatenate(domain) for domain in resolver.search] + [name]


def resolve_marked(
    host: str,
    port: int,
    mark: int,
    *,
    prefer: int = socket.AF_INET,
    timeout: float = 2.0,
    conf: str = RESOLV_CONF,
    servers: Sequence[str] | None = None,
) -> list[tuple[int, Address]]:
    """``(family, sockaddr)`` of ``host``: A and AAAA records, family ``prefer`` first,
    asked of each nameserver in turn from sockets with SO_MARK ``mark``. Raises
    DnsError when none answers with an address."""
    resolver = dns.resolver.Resolver(filename=conf, configure=servers is None)
    nameservers = list(servers) if servers is not None else [str(s) for s in resolver.nameservers]
    problems: list[str] = []
    for name in _candidates(host, resolver):
        found: dict[int, list[str]] = {int(socket.AF_INET): [], int(socket.AF_INET6): []}
        for rdtype, family in (
            (dns.rdatatype.A, int(socket.AF_INET)),
            (dns.rdatatype.AAAA, int(socket.AF_INET6)),
        ):
            query = dns.message.make_query(name, rdtype)
            for server in nameservers:
                try:
                    answer = _query(query, server, mark, timeout)
                except (OSError, dns.exception.DNSException, ValueError) as exc:
                    problems.append(f"{server}: {exc or type(exc).__name__}")
                    continue
                for rrset in answer.answer:
                    if rrset.rdtype == rdtype:
                        found[family] += [rr.address for rr in rrset]
                break  # that server answered (maybe with nothing): next type
        if found[socket.AF_INET] or found[socket.AF_INET6]:
            order = sorted(found, key=lambda f: f != prefer)
            out: list[tuple[int, Address]] = []
            for fam in order:
                for addr in found[fam]:
                    out.append(
                        (fam, (addr, port) if fam == socket.AF_INET else (addr, port, 0, 0))
                    )
            return out
    tried = ", ".join(nameservers) or "no nameserver in " + conf
    detail = f" ({'; '.join(problems[:3])})" if problems else ""
    raise DnsError(f"no address for {host} from {tried}{detail}")
