"""A small certificate authority, so operators never need easy-rsa.

One directory holds the CA (``ca.pem``, ``ca.key``) and every certificate it
issues (``NAME.pem``, ``NAME.key``). Keys are ECDSA P-256, written unencrypted
with mode 0600; certificates are PEM. Relay certificates carry the serverAuth
EKU and the relay's DNS names / IP addresses as SANs (RFC 5280 §4.2.1.6; TLS
clients ignore the CN); client certificates carry clientAuth and CN=name.

Nothing here touches the network; every function is a pure-enough file writer
that tests drive with ``tmp_path``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Kind = Literal["relay", "client"]

CA_CERT = "ca.pem"
CA_KEY = "ca.key"

# Backdate notBefore a little so a peer whose clock lags ours still accepts it.
_CLOCK_SKEW = dt.timedelta(minutes=5)

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class PkiError(Exception):
    """A PKI operation that cannot be done (bad name, missing CA, would overwrite)."""


class WouldOverwrite(PkiError):
    """``paths`` exist and ``force`` was not given."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = tuple(paths)
        super().__init__(f"{', '.join(self.paths)} already exist(s); pass force=True to replace")


class NoCa(PkiError):
    """``dir`` holds no CA (``missing`` is the file not found)."""

    def __init__(self, dir: Path, missing: str) -> None:
        self.dir = dir
        self.missing = missing
        super().__init__(f"no CA in {dir} ({missing} is missing); run init_ca first")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _is_dns_name(name: str, *, wildcard: bool = False) -> bool:
    if wildcard and name.startswith("*."):
        name = name[2:]
    name = name.removesuffix(".")
    if not name or len(name) > 253:
        return False
    return all(_LABEL.match(label) for label in name.split("."))


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def _general_name(value: str) -> x509.GeneralName:
    """A SAN entry: an IP address if ``value`` parses as one, else a DNS name."""
    ip = _ip(value)
    if ip is not None:
        return x509.IPAddress(ip)
    if not _is_dns_name(value, wildcard=True):
        raise PkiError(f"{value!r} is neither an IP address nor a valid DNS name")
    return x509.DNSName(value)


def _check_name(name: str) -> None:
    """``name`` becomes a file name and a SAN: keep it to DNS names and IP literals."""
    if name in ("ca", "ca.pem", "ca.key"):
        raise PkiError(f"{name!r} is reserved for the CA")
    if _ip(name) is None and not _is_dns_name(name):
        raise PkiError(
            f"invalid name {name!r}: use a DNS name (letters, digits, '-', '.') or an IP address"
        )


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically with ``mode`` set before any data lands (no window where a
    private key is readable by others)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits we want (0644 certs)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _refuse_overwrite(paths: Sequence[Path], force: bool) -> None:
    if force:
        return
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise WouldOverwrite(existing)


def _validity(
    days: int, not_before: dt.datetime | None, not_after: dt.datetime | None
) -> tuple[dt.datetime, dt.datetime]:
    start = not_before if not_before is not None else _now() - _CLOCK_SKEW
    end = not_after if not_after is not None else start + _CLOCK_SKEW + dt.timedelta(days=days)
    if end <= start:
        raise PkiError(f"not_after ({end}) must be later than not_before ({start})")
    return start, end


def init_ca(
    dir: Path,
    name: str = "masqued CA",
    days: int = 3650,
    *,
    force: bool = False,
) -> tuple[Path, Path]:
    """Create a self-signed CA in ``dir``: returns (``dir/ca.pem``, ``dir/ca.key``).

    The key is ECDSA P-256 with mode 0600. Refuses to replace an existing CA
    unless ``force`` (replacing it invalidates every certificate it issued).
    """
    dir = Path(dir)
    cert_path, key_path = dir / CA_CERT, dir / CA_KEY
    _refuse_overwrite((cert_path, key_path), force)
    if days < 1:
        raise PkiError(f"days must be at least 1, not {days}")
    dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start, end = _validity(days, None, None)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def _load_ca(dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = dir / CA_CERT, dir / CA_KEY
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError as e:
        raise NoCa(dir, str(e.filename)) from e
    except (ValueError, TypeError) as e:
        raise PkiError(f"cannot load the CA in {dir}: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{key_path} is not an ECDSA key")
    return cert, key


def issue(
    dir: Path,
    name: str,
    kind: Kind,
    days: int = 825,
    sans: Sequence[str] = (),
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    *,
    force: bool = False,
) -> tuple[Path, Path]:
    """Issue a certificate signed by the CA in ``dir``.

    Returns (``dir/NAME.pem``, ``dir/NAME.key``).

    ``kind="relay"``: serverAuth; SANs are ``name`` plus ``sans`` (each a DNS name
    or an IP address). ``kind="client"``: clientAuth, CN=name, SAN DNS name plus
    ``sans``. ``not_before``/``not_after`` override ``days`` (tests use them to
    make expired certificates). Refuses to overwrite unless ``force``.
    """
    dir = Path(dir)
    if kind not in ("relay", "client"):
        raise PkiError(f"kind must be 'relay' or 'client', not {kind!r}")
    _check_name(name)
    if kind == "client" and _ip(name) is not None:
        raise PkiError(f"client name {name!r} must be a name, not an IP address")
    if days < 1 and not_after is None:
        raise PkiError(f"days must be at least 1, not {days}")
    cert_path, key_path = dir / f"{name}.pem", dir / f"{name}.key"
    _refuse_overwrite((cert_path, key_path), force)

    san_entries: list[x509.GeneralName] = []
    for value in (name, *sans):
        entry = _general_name(value)
        if entry not in san_entries:
            san_entries.append(entry)
    start, end = _validity(days, not_before, not_after)
    ca_cert, ca_key = _load_ca(dir)

    key = _new_key()
    eku = ExtendedKeyUsageOID.SERVER_AUTH if kind == "relay" else ExtendedKeyUsageOID.CLIENT_AUTH
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san_entries), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def revoke(dir: Path, name: str, days: int = 30) -> Path:
    """Add ``dir/NAME.pem`` to the CA's revocation list ``dir/crl.pem`` (re-signed).

    Earlier entries are kept; the CRL's nextUpdate is ``days`` from now. Point the
    relay's ``crl`` key at the file and reload the relay.
    """
    dir = Path(dir)
    cert_path = dir / f"{name}.pem"
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except FileNotFoundError:
        raise PkiError(f"{cert_path}: no such certificate") from None
    ca_cert, ca_key = _load_ca(dir)
    crl_path = dir / "crl.pem"
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(days=days))
    )
    serials = {cert.serial_number}
    if crl_path.exists():
        old = x509.load_pem_x509_crl(crl_path.read_bytes())
        for entry in old:
            if entry.serial_number not in serials:
                builder = builder.add_revoked_certificate(entry)
                serials.add(entry.serial_number)
        if old.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            serials.discard(cert.serial_number)  # already listed: re-sign only
            builder = builder.add_revoked_certificate(
                old.get_revoked_certificate_by_serial_number(cert.serial_number)  # type: ignore[arg-type]
            )
    if cert.serial_number in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(now)
            .build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    _write(crl_path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    return crl_path
