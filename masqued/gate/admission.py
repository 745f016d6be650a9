"""Admission of one CONNECT-IP request: the one place that decides who gets a tunnel.

``Admitter.admit`` runs, for whichever transport took the request: the relay's
limits (tunnels per connection, clients), authentication (identity), the client's
policy (ACL), the scope of the request against what the relay routes, and a lease
from the pool (the identity's previous address when it has one). It answers with an
``Admission`` or raises ``Refused`` carrying the HTTP status, extra response headers
and the result to count.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from masqued.gate.access import AccessControl, Identity, LeaseStore
from masqued.gate.auth import AuthError
from masqued.gate.ipam import AddressPool, Lease, PoolExhausted
from masqued.gate.policy import CompiledAcl
from masqued.proto.errors import RequestError
from masqued.proto.request import ConnectIpRequest

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
ANONYMOUS = Identity(None, "none")


class Refused(RequestError):
    """A request the relay answers with ``status``; ``result`` is what it counts as."""

    def __init__(
        self,
        status: int,
        reason: str,
        result: str,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(status, reason)
        self.result = result
        self.headers = tuple(headers)


@dataclass(frozen=True)
class Admission:
    """What the relay gives an admitted request."""

    identity: Identity
    acl: CompiledAcl | None  # None: everything the relay routes
    lease: Lease
    routes: tuple[IPNetwork, ...]  # to advertise: the relay's, narrowed to the scope


@dataclass(frozen=True)
class Caller:
    """Who sent the request, as the transport saw it."""

    peer_ip: str
    owner: str  # a name for the lease, unique per tunnel
    certificate: Any = None
    chain: tuple[Any, ...] = ()
    tunnels_on_connection: int = 0


class Admitter:
    """Admission for one relay (worker): its access control, pool and leases."""

    def __init__(
        self,
        access: AccessControl | None,
        pool: AddressPool,
        leases: LeaseStore,
        *,
        routes: Sequence[IPNetwork],
        max_clients: int | None,
        max_tunnels_per_connection: int,
    ) -> None:
        self.access = access
        self.pool = pool
        self.leases = leases
        self.routes = tuple(routes)
        self.max_clients = max_clients
        self.max_tunnels_per_connection = max_tunnels_per_connection
        if access is not None:
            pool.set_reservations(access.reservations())

    def update(
        self,
        access: AccessControl | None,
        routes: Sequence[IPNetwork],
        max_clients: int | None,
    ) -> None:
        """After a reload: new credentials, policies and routes for new requests."""
        if access is not None and self.access is not None:
            access.carry_over(self.access)
        self.access = access
        self.routes = tuple(routes)
        self.max_clients = max_clients
        self.pool.set_reservations(access.reservations() if access is not None else {})

    def admit(
        self,
        request: ConnectIpRequest,
        caller: Caller,
        clients: int,
        replace: Callable[[str], None],
    ) -> Admission:
        """Admit ``request`` or raise Refused. ``clients``: tunnels the relay serves
        now; ``replace(identity)`` ends that identity's other tunnels (one per
        identity), called before the lease is taken so its address can be reused."""
        routes = self.scope_routes(request)
        if caller.tunnels_on_connection >= self.max_tunnels_per_connection:
            raise Refused(429, "too many tunnels on one connection", "rejected")
        if self.max_clients is not None and clients >= self.max_clients:
            raise Refused(503, "client limit reached", "rejected")
        identity = ANONYMOUS
        acl: CompiledAcl | None = None
        access = self.access
        if access is not None:
            try:
                identity = access.authenticate(
                    caller.peer_ip, request.headers, caller.certificate, caller.chain
                )
            except AuthError as exc:
                extra: list[tuple[bytes, bytes]] = []
                if exc.status == 401 and access.tokens is not None:
                    extra.append((b"www-authenticate", b'Bearer realm="masqued"'))
                result = "rate_limited" if exc.status == 429 else "auth_failed"
                raise Refused(exc.status, exc.reason, result, extra) from None
            acl = self.acl_for(identity)
        if identity.name is not None:
            replace(identity.name)
        prefer = self.leases.previous(identity.name) if identity.name else ()
        try:
            lease = self.pool.allocate(caller.owner, identity=identity.name, prefer=prefer)
        except PoolExhausted:
            raise Refused(
                503,
                f"address pool exhausted ({self.pool.used()}/{self.pool.capacity()} in use)",
                "pool_exhausted",
            ) from None
        if identity.name is not None:
            self.leases.remember(identity.name, [a.ip for a in lease.addresses])
        return Admission(identity, acl, lease, routes)

    def acl_for(self, identity: Identity) -> CompiledAcl | None:
        """The identity's compiled ACL; None when nothing needs checking per packet."""
        if self.access is None:
            return None
        policy, acl = self.access.policy_for(identity)
        if policy is None and acl.acl.default_allow and not acl.acl.rules:
            return None
        return acl

    def scope_routes(self, request: ConnectIpRequest) -> tuple[IPNetwork, ...]:
        """Routes to advertise: the relay's, narrowed to a scoped request's target
        (RFC 9484 §4.6); a target outside them is refused with 403."""
        if request.target is None:
            return self.routes
        narrowed: list[IPNetwork] = []
        for target in request.target:
            covering = [
                r
                for r in self.routes
                if r.version == target.version and target.subnet_of(r)  # type: ignore[arg-type]
            ]
            if not covering:
                raise Refused(403, f"target {target} is outside what this relay routes", "rejected")
            narrowed.append(target)
        return tuple(narrowed)

    def still_valid(self, identity: Identity, certificate: Any) -> bool:
        """After a reload: may a live tunnel of ``identity`` stay up?"""
        return self.access is None or self.access.still_valid(identity, certificate)

    def release(self, owner: str) -> None:
        self.pool.release(owner)
