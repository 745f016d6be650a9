"""Who is this client? Bearer tokens and client certificates.

Both methods produce an *identity* (a name) that per-client policy is keyed by, or an
``AuthError`` carrying the HTTP status to answer the CONNECT with: 401 when the client
presented no credentials at all, 403 when it presented bad ones.

Tokens: ``NAME.SECRET`` where SECRET is 256 random bits. The relay's tokens file holds
one line per client, ``NAME:sha256$SALT$HASH`` (base64), never the secret itself.
A salted SHA-256 is enough for secrets of this entropy (they cannot be guessed, so a
slow password hash would only cost CPU per CONNECT); comparison is constant-time.

Client certificates: aioquic's TLS layer checks that the client holds the key of the
certificate it sent but never verifies the chain, so ``verify_client_certificate`` does
that: chain to ``client_ca``, validity period, clientAuth usage, then a CRL (if
configured) and a deny list of names or serial numbers.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_HASH_SCHEME = "sha256"


class AuthError(Exception):
    """Authentication failed; ``status`` is what the CONNECT gets (401 or 403).

    ``subject`` names the credential that failed when its claim is genuine (a token
    name the tokens file holds, a certificate our CA issued): the failure is charged
    to it rather than to the peer's address (masqued.access.FailureLimiter).
    """

    def __init__(self, status: int, reason: str, subject: str | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.subject = subject


class TokenFileError(ValueError):
    pass


# -- tokens ----------------------------------------------------------------------------------


def _hash(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


def new_token(name: str) -> tuple[str, str]:
    """Return ``(token, tokens_file_line)`` for a new client ``name``."""
    if not _NAME_RE.match(name) or "." in name:
        raise ValueError(f"invalid client name {name!r}: use letters, digits, _ @ - (no dots)")
    secret = secrets.token_urlsafe(32)
    salt = os.urandom(16)
    b64 = base64.urlsafe_b64encode
    line = f"{name}:{_HASH_SCHEME}${b64(salt).decode()}${b64(_hash(salt, secret)).decode()}"
    return f"{name}.{secret}", line


@dataclass(frozen=True)
class TokenStore:
    """The relay's view of a tokens file: name -> (salt, hash)."""

    entries: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)
    path: Path | None = None

    @classmethod
    def load(cls, path: Path) -> TokenStore:
        try:
            text = path.read_text()
        except OSError as exc:
            raise TokenFileError(f"{path}: cannot read: {exc.strerror}") from None
        return cls.parse(text, path)

    @classmethod
    def parse(cls, text: str, path: Path | None = None) -> TokenStore:
        where = str(path) if path else "tokens"
        entries: dict[str, tuple[bytes, bytes]] = {}
        errors: list[str] = []
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, rest = line.partition(":")
            parts = rest.split("$")
            if not sep or len(parts) != 3 or parts[0] != _HASH_SCHEME:
                errors.append(f"{where}:{lineno}: expected NAME:{_HASH_SCHEME}$SALT$HASH")
                continue
            if not _NAME_RE.match(name) or "." in name:
                errors.append(f"{where}:{lineno}: invalid client name {name!r}")
                continue
            try:
                salt = base64.urlsafe_b64decode(parts[1])
                digest = base64.urlsafe_b64decode(parts[2])
            except ValueError:
                errors.append(f"{where}:{lineno}: salt or hash is not base64")
                continue
            if len(digest) != 32 or len(salt) < 8:
                errors.append(f"{where}:{lineno}: salt or hash has the wrong length")
                continue
            if name in entries:
                errors.append(f"{where}:{lineno}: duplicate name {name!r}")
                continue
            entries[name] = (salt, digest)
        if errors:
            raise TokenFileError("\n".join(errors))
        return cls(entries, path)

    def verify(self, token: str) -> str:
        """Return the identity for ``token`` or raise AuthError(403)."""
        name, sep, secret = token.partition(".")
        entry = self.entries.get(name) if sep else None
        # Hash even for unknown names, so timing does not reveal which names exist.
        salt, expected = entry if entry is not None else (b"\0" * 16, b"\0" * 32)
        ok = hmac.compare_digest(_hash(salt, secret), expected)
        if entry is None or not ok:
            raise AuthError(403, "invalid token", f"token:{name}" if entry is not None else None)
        return name

    def entry(self, name: str) -> tuple[bytes, bytes] | None:
        """The stored (salt, hash) of ``name``: what a session's token is checked
        against after a reload (a rotated secret changes it)."""
        return self.entries.get(name)

    def names(self) -> frozenset[str]:
        return frozenset(self.entries)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (RFC 6750 §2.1)."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


# -- client certificates ---------------------------------------------------------------------


@dataclass(frozen=True)
class CertPolicy:
    """What a client certificate must satisfy."""

    roots: tuple[x509.Certificate, ...]
    crl: x509.CertificateRevocationList | None = None
    revoked: frozenset[str] = frozenset()  # identities, or "serial:<hex>"

    @classmethod
    def load(
        cls, client_ca: Path, crl: Path | None = None, revoked: Iterable[str] = ()
    ) -> CertPolicy:
        roots = tuple(x509.load_pem_x509_certificates(client_ca.read_bytes()))
        crl_obj = None
        if crl is not None:
            data = crl.read_bytes()
            crl_obj = (
                x509.load_pem_x509_crl(data)
                if b"-----BEGIN" in data
                else x509.load_der_x509_crl(data)
            )
            if not any(crl_obj.is_signature_valid(r.public_key()) for r in roots):  # type: ignore[arg-type]
                raise ValueError(f"{crl}: CRL is not signed by the client CA")
        return cls(roots, crl_obj, frozenset(_norm_revoked(r) for r in revoked))


def _norm_revoked(entry: str) -> str:
    entry = entry.strip()
    if entry.lower().startswith("serial:"):
        return "serial:" + entry[7:].strip().lower().replace(":", "").lstrip("0")
    return entry


def certificate_identity(cert: x509.Certificate) -> str:
    """The client's name: subject CN, else the first DNS name of its SAN."""
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if cns and isinstance(cns[0].value, str) and cns[0].value:
        return cns[0].value
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        raise AuthError(403, "client certificate has no CN or SAN name") from None
    names = san.value.get_values_for_type(x509.DNSName)
    if not names:
        raise AuthError(403, "client certificate has no CN or SAN name")
    return names[0]


def verify_client_certificate(
    leaf: x509.Certificate | None,
    chain: Sequence[x509.Certificate],
    policy: CertPolicy,
    now: dt.datetime | None = None,
) -> str:
    """Verify a client certificate; return its identity or raise AuthError.

    A certificate the TLS layer accepted may still hold fields cryptography refuses
    to parse (a malformed or duplicated extension): that is a 403 like any other
    bad credential, never an exception for the caller. A certificate our CA issued
    that fails (expired, revoked, ...) carries its identity as the error's
    ``subject``; one we never issued carries none.
    """
    if leaf is None:
        raise AuthError(401, "no client certificate")
    try:
        return _verify(leaf, chain, policy, now)
    except AuthError:
        raise
    except Exception as exc:
        raise AuthError(403, f"malformed client certificate ({type(exc).__name__})") from None


def _verify(
    leaf: x509.Certificate,
    chain: Sequence[x509.Certificate],
    policy: CertPolicy,
    now: dt.datetime | None,
) -> str:
    now = now or dt.datetime.now(dt.UTC)
    try:
        return _verify_client_certificate(leaf, chain, policy, now)
    except AuthError as exc:
        exc.subject = _issued_identity(leaf, chain, policy, now)
        raise


def _client_verifier(policy: CertPolicy, at: dt.datetime) -> Any:
    return (
        PolicyBuilder()
        .store(Store(list(policy.roots)))
        .time(at.replace(tzinfo=None))
        .build_client_verifier()
    )


def _issued_identity(
    leaf: x509.Certificate, chain: Sequence[x509.Certificate], policy: CertPolicy, now: dt.datetime
) -> str | None:
    """``cert:IDENTITY`` if our CA issued ``leaf``: its chain verifies at some moment
    inside the validity of the leaf, its chain and a root (the closest to now),
    whatever made it fail now. Else None."""
    certs = [leaf, *chain]
    lo = max(c.not_valid_before_utc for c in certs)
    hi = min(c.not_valid_after_utc for c in certs)
    for root in policy.roots:
        start, end = max(lo, root.not_valid_before_utc), min(hi, root.not_valid_after_utc)
        if start > end:
            continue
        try:
            _client_verifier(policy, min(max(now, start), end)).verify(leaf, list(chain))
            return f"cert:{certificate_identity(leaf)}"
        except Exception:  # untrusted, or unparseable: not a claim of ours
            continue
    return None


def _verify_client_certificate(
    leaf: x509.Certificate,
    chain: Sequence[x509.Certificate],
    policy: CertPolicy,
    now: dt.datetime,
) -> str:
    not_after = leaf.not_valid_after_utc
    not_before = leaf.not_valid_before_utc
    if now > not_after:
        raise AuthError(403, f"client certificate expired on {not_after:%Y-%m-%d %H:%M} UTC")
    if now < not_before:
        raise AuthError(403, "client certificate is not valid yet")
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
            raise AuthError(403, "client certificate is not for client authentication")
    except x509.ExtensionNotFound:
        pass
    try:
        _client_verifier(policy, now).verify(leaf, list(chain))
    except VerificationError as exc:
        raise AuthError(403, f"client certificate not trusted: {exc}") from None
    identity = certificate_identity(leaf)
    serial = f"serial:{leaf.serial_number:x}"
    if identity in policy.revoked or serial in policy.revoked:
        raise AuthError(403, f"client certificate of {identity} is revoked (deny list)")
    if policy.crl is not None:
        entry = policy.crl.get_revoked_certificate_by_serial_number(leaf.serial_number)
        if entry is not None:
            raise AuthError(403, f"client certificate of {identity} is revoked (CRL)")
    return identity


# -- the relay's certificate (checked by the client) ----------------------------------------


def server_auth_problem(cert: x509.Certificate | None) -> str | None:
    """Why the relay's certificate may not serve as one, or None.

    aioquic's TLS layer has checked the chain, the validity and the name, but not
    what the certificate is for: an extended key usage that is present must allow
    serverAuth (RFC 5280 §4.2.1.12; without the extension any use is allowed, as
    OpenSSL's TLS server purpose check has it). A client certificate of the same CA
    must not pass for the relay.
    """
    if cert is None:
        return "the relay presented no certificate"
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return None
    except Exception as exc:  # a malformed extension: not a usable certificate
        return f"the relay's certificate has a malformed extension ({type(exc).__name__})"
    if ExtendedKeyUsageOID.SERVER_AUTH in eku or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in eku:
        return None
    return "the relay's certificate is not for server authentication (no serverAuth usage)"
