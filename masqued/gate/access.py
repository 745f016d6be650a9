"""The relay's gatekeeper: who may connect, what each client may reach, which address
it gets back.

``AccessControl`` is built from the relay config and rebuilt on reload. The transport
calls ``authenticate`` once per CONNECT, ``policy_for`` to get the client's compiled
ACL, and ``LeaseStore`` to give a reconnecting identity its previous address.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from masqued.config import RelayConfig
from masqued.gate.auth import (
    AuthError,
    CertPolicy,
    TokenStore,
    bearer_token,
    verify_client_certificate,
)
from masqued.gate.clients import ClientPolicy
from masqued.gate.policy import Acl, CompiledAcl

log = logging.getLogger("masqued.gate.access")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Authentication failures tolerated per failing credential (a token name, a client
# certificate's identity) or, without a genuine one, per source address, before
# further failures of it are answered 429, and how fast that budget refills.
FAIL_BURST = 10
FAIL_REFILL_PER_SECOND = 0.5  # one more attempt every 2 s
MAX_TRACKED_PEERS = 4096


@dataclass(frozen=True)
class Identity:
    """Who a session belongs to. ``name`` is None on an open relay (auth = none).

    ``evidence`` is what proved it, kept to check it again after a reload: the
    token's stored (salt, hash), or the client certificate and its chain.
    """

    name: str | None
    method: str  # "mtls", "token" or "none"
    evidence: tuple[Any, ...] = field(default=(), compare=False, repr=False)

    def __str__(self) -> str:
        return self.name or "anonymous"


class FailureLimiter:
    """A token bucket per key (``token:NAME``, ``cert:ID`` or ``addr:IP``), charged
    only by failed authentications."""

    def __init__(self, burst: float = FAIL_BURST, rate: float = FAIL_REFILL_PER_SECOND) -> None:
        self.burst = burst
        self.rate = rate
        self._buckets: dict[str, tuple[float, float]] = {}  # ip -> (tokens, at)

    def _tokens(self, ip: str, now: float) -> float:
        tokens, at = self._buckets.get(ip, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate)

    def blocked(self, ip: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return self._tokens(ip, now) < 1.0

    def failed(self, ip: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if len(self._buckets) >= MAX_TRACKED_PEERS and ip not in self._buckets:
            # Forget peers whose buckets are full again (they cost nothing to recreate).
            for key in [k for k in self._buckets if self._tokens(k, now) >= self.burst]:
                del self._buckets[key]
            if len(self._buckets) >= MAX_TRACKED_PEERS:
                self._buckets.pop(next(iter(self._buckets)))
        self._buckets[ip] = (self._tokens(ip, now) - 1.0, now)


class AccessControl:
    """Authentication and per-client policy for one relay configuration."""

    def __init__(self, config: RelayConfig) -> None:
        self.methods = config.auth
        self.tokens: TokenStore | None = None
        self.certs: CertPolicy | None = None
        if "token" in self.methods and config.tokens_file is not None:
            self.tokens = TokenStore.load(config.tokens_file)
        if "mtls" in self.methods and config.client_ca is not None:
            self.certs = CertPolicy.load(config.client_ca, config.crl, config.revoked)
        self.clients: Mapping[str, ClientPolicy] = dict(config.clients)
        default = config.acl_default or "allow"
        self._default_acl = Acl((), default == "allow").compile()
        self._compiled: dict[str, CompiledAcl] = {
            name: p.acl.compile() for name, p in self.clients.items()
        }
        self.limiter = FailureLimiter()

    @property
    def requests_client_certificate(self) -> bool:
        return "mtls" in self.methods

    @property
    def open(self) -> bool:
        return not self.methods

    def carry_over(self, old: AccessControl) -> None:
        """Keep rate-limit state across a reload."""
        self.limiter = old.limiter

    def authenticate(
        self,
        peer_ip: str,
        headers: Mapping[str, str],
        peer_certificate: x509.Certificate | None,
        peer_chain: Sequence[x509.Certificate] = (),
    ) -> Identity:
        """Who is this CONNECT from? Raises AuthError (401, 403 or 429).

        A valid credential always gets in. A failure is charged to what failed: the
        token name or certificate identity when that claim is genuine (a name the
        tokens file holds, a certificate our CA issued), else the peer's address
        (no credentials, unknown names, foreign certificates). Once that budget is
        spent, its failures are answered 429.
        """
        if self.open:
            return Identity(None, "none")
        errors: list[AuthError] = []
        if self.certs is not None and peer_certificate is not None:
            chain = tuple(peer_chain)
            try:
                name = verify_client_certificate(peer_certificate, chain, self.certs)
                return Identity(name, "mtls", (peer_certificate, chain))
            except AuthError as exc:
                errors.append(exc)
        token = bearer_token(headers.get("authorization"))
        if self.tokens is not None and token is not None:
            try:
                name = self.tokens.verify(token)
                return Identity(name, "token", (self.tokens.entry(name),))
            except AuthError as exc:
                errors.append(exc)
        if not errors:
            wanted = " or ".join(
                {"mtls": "a client certificate", "token": "a bearer token"}[m]
                for m in self.methods
            )
            errors.append(AuthError(401, f"no credentials (this relay wants {wanted})"))
        now = time.monotonic()
        keys = list(dict.fromkeys(e.subject or f"addr:{peer_ip}" for e in errors))
        blocked = [k for k in keys if self.limiter.blocked(k, now)]
        for key in keys:
            self.limiter.failed(key, now)
        if blocked:
            what = blocked[0].partition(":")
            whom = "from this address" if what[0] == "addr" else f"for {what[2]}"
            raise AuthError(429, f"too many failed attempts {whom}", blocked[0])
        raise errors[0]

    def still_valid(
        self, identity: Identity, peer_certificate: x509.Certificate | None = None
    ) -> bool:
        """After a reload: may a live session of ``identity`` stay up?

        Checked against what proved the identity (``Identity.evidence``): the same
        certificate and chain, or the same token entry (a rotated secret, same name,
        ends the sessions of the old one).
        """
        if self.open:
            return True
        if identity.method == "mtls":
            if self.certs is None:
                return False
            cert, chain = identity.evidence or (peer_certificate, ())
            try:
                verify_client_certificate(cert, chain, self.certs)
            except AuthError:
                return False
            return True
        if identity.method == "token":
            if self.tokens is None or identity.name is None:
                return False
            entry = self.tokens.entry(identity.name)
            return entry is not None and (not identity.evidence or identity.evidence[0] == entry)
        return False  # an anonymous session on a relay that now wants credentials

    def policy_for(self, identity: Identity) -> tuple[ClientPolicy | None, CompiledAcl]:
        name = identity.name
        if name is not None and name in self.clients:
            return self.clients[name], self._compiled[name]
        return None, self._default_acl

    def reservations(self) -> dict[str, tuple[IPAddress, ...]]:
        return {name: p.addresses for name, p in self.clients.items() if p.addresses}


class LeaseStore:
    """Addresses last held per identity, in a JSON file written atomically.

    Lets a client that reconnects (after a network change or a relay restart) get
    its previous address back, so its long-lived flows survive.
    """

    VERSION = 1
    MAX_ENTRIES = 100_000

    def __init__(self, path: Path | None) -> None:
        self.path = path
        # Where writes run: None writes at once; a relay passes a function that runs
        # its argument off the event loop (an fsync on a busy disk took seconds and
        # stalled every client's handshake), coalescing changes made meanwhile.
        self.schedule: Callable[[Callable[[], None]], object] | None = None
        self.run_blocking: Callable[[Callable[[], None]], object] | None = None
        self._dirty = False
        self._leases: dict[str, list[str]] = {}
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("lease file %s unreadable (%s): starting with no leases", path, exc)
            return
        if not isinstance(data, dict) or data.get("version") != self.VERSION:
            log.warning("lease file %s has an unknown format: ignoring it", path)
            return
        leases = data.get("leases", {})
        if isinstance(leases, dict):
            for name, addrs in leases.items():
                if isinstance(name, str) and isinstance(addrs, list):
                    self._leases[name] = [a for a in addrs if isinstance(a, str)]

    def previous(self, identity: str) -> tuple[IPAddress, ...]:
        out: list[IPAddress] = []
        for text in self._leases.get(identity, ()):
            with contextlib.suppress(ValueError):
                out.append(ipaddress.ip_address(text))
        return tuple(out)

    def remember(self, identity: str, addresses: Sequence[IPAddress]) -> None:
        value = [str(a) for a in addresses]
        if self._leases.get(identity) == value:
            return
        self._leases.pop(identity, None)  # re-insert: most recent last
        self._leases[identity] = value
        while len(self._leases) > self.MAX_ENTRIES:
            self._leases.pop(next(iter(self._leases)))
        if self.path is None:
            return
        if self.schedule is None or self.run_blocking is None:
            self._write(self._dump())
            return
        if not self._dirty:
            self._dirty = True
            self.schedule(self._flush)

    def _flush(self) -> None:
        """On the owner's loop: one write for every change since the last, done by
        ``run_blocking`` (one ordered worker thread) with what the map holds now."""
        if not self._dirty:
            return  # written meanwhile (save at shutdown)
        self._dirty = False
        data = self._dump()
        if self.run_blocking is None:
            self._write(data)
            return
        self.run_blocking(lambda: self._write(data))

    def save(self) -> None:
        """Write the file now (atomically, fsynced): the caller's thread may block."""
        self._dirty = False
        self._write(self._dump())

    def _dump(self) -> str:
        return json.dumps({"version": self.VERSION, "leases": self._leases}, indent=1)

    def _write(self, data: str) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(prefix=".leases.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            log.warning("cannot write lease file %s: %s", self.path, exc)


def state_dir_for(config: RelayConfig) -> Path:
    """``state_dir``, else systemd's $STATE_DIRECTORY, else /var/lib/masqued/NAME."""
    if config.state_dir is not None:
        return config.state_dir
    env = os.environ.get("STATE_DIRECTORY")
    if env:
        return Path(env.split(":")[0])
    return Path("/var/lib/masqued") / config.name
