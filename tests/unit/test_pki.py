"""masqued.gate.pki: the CA helper writes certificates that verify and keys nobody else reads."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from masqued.gate import pki


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    pki.init_ca(tmp_path)
    return tmp_path


def test_init_ca_writes_a_ca(tmp_path: Path) -> None:
    cert_path, key_path = pki.init_ca(tmp_path / "pki", name="Test CA", days=10)
    assert cert_path == tmp_path / "pki" / "ca.pem"
    assert key_path == tmp_path / "pki" / "ca.key"
    assert mode(key_path) == 0o600
    assert mode(cert_path) == 0o644
    cert = load(cert_path)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Test CA"
    assert cert.issuer == cert.subject
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(days=10, minutes=10)
    # self-signed: its own key verifies it
    cert.verify_directly_issued_by(cert)
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)


def test_init_ca_refuses_to_overwrite(ca_dir: Path) -> None:
    before = (ca_dir / "ca.pem").read_bytes()
    with pytest.raises(pki.PkiError, match="already exist"):
        pki.init_ca(ca_dir)
    assert (ca_dir / "ca.pem").read_bytes() == before
    pki.init_ca(ca_dir, force=True)
    assert (ca_dir / "ca.pem").read_bytes() != before
    assert mode(ca_dir / "ca.key") == 0o600


def test_key_mode_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    import os

    old = os.umask(0)
    try:
        pki.init_ca(tmp_path)
        _, key = pki.issue(tmp_path, "relay.example", "relay")
    finally:
        os.umask(old)
    assert mode(tmp_path / "ca.key") == 0o600
    assert mode(key) == 0o600
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"


def test_relay_certificate_verifies_as_server(ca_dir: Path) -> None:
    cert_path, key_path = pki.issue(ca_dir, "relay.example", "relay", sans=["198.18.1.1"])
    assert cert_path == ca_dir / "relay.example.pem"
    assert key_path == ca_dir / "relay.example.key"
    assert mode(key_path) == 0o600
    ca, leaf = load(ca_dir / "ca.pem"), load(cert_path)
    leaf.verify_directly_issued_by(ca)

    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["relay.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("198.18.1.1")]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    # full RFC 5280 path validation, as a TLS client would do it, by name and by IP
    store = Store([ca])
    PolicyBuilder().store(store).build_server_verifier(x509.DNSName("relay.example")).verify(
        leaf, []
    )
    PolicyBuilder().store(store).build_server_verifier(
        x509.IPAddress(ipaddress.ip_address("198.18.1.1"))
    ).verify(leaf, [])
    with pytest.raises(VerificationError):
        PolicyBuilder().store(store).build_server_verifier(x509.DNSName("other.example")).verify(
            leaf, []
        )

    # and the key is the certificate's
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert key.public_key().public_bytes(der, spki) == leaf.public_key().public_bytes(der, spki)


def test_relay_named_by_ip_address(ca_dir: Path) -> None:
    cert_path, _ = pki.issue(ca_dir, "2001:db8::1", "relay", sans=["relay.example"])
    san = load(cert_path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("2001:db8::1")]
    assert san.get_values_for_type(x509.DNSName) == ["relay.example"]


def test_client_certificate_verifies_as_client(ca_dir: Path) -> None:
    cert_path, key_path = pki.issue(ca_dir, "alice", "client")
    assert mode(key_path) == 0o600
    ca, leaf = load(ca_dir / "ca.pem"), load(cert_path)
    leaf.verify_directly_issued_by(ca)
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["alice"]
    verified = PolicyBuilder().store(Store([ca])).build_client_verifier().verify(leaf, [])
    assert verified.chain[0] == leaf
    # a client certificate is no good as a server certificate
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName("alice")).verify(
            leaf, []
        )


def test_certificate_from_another_ca_does_not_verify(tmp_path: Path) -> None:
    pki.init_ca(tmp_path / "a")
    pki.init_ca(tmp_path / "b")
    cert_path, _ = pki.issue(tmp_path / "a", "relay.example", "relay")
    other_ca = load(tmp_path / "b" / "ca.pem")
    with pytest.raises((ValueError, InvalidSignature)):
        load(cert_path).verify_directly_issued_by(other_ca)
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([other_ca])).build_server_verifier(
            x509.DNSName("relay.example")
        ).verify(load(cert_path), [])


def test_expired_certificate(ca_dir: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    cert_path, _ = pki.issue(
        ca_dir,
        "old.example",
        "relay",
        not_before=now - dt.timedelta(days=10),
        not_after=now - dt.timedelta(days=1),
    )
    leaf = load(cert_path)
    assert leaf.not_valid_after_utc < now
    leaf.verify_directly_issued_by(load(ca_dir / "ca.pem"))  # signature fine, dates not
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([load(ca_dir / "ca.pem")])).build_server_verifier(
            x509.DNSName("old.example")
        ).verify(leaf, [])


def test_validity_from_days(ca_dir: Path) -> None:
    leaf = load(pki.issue(ca_dir, "relay.example", "relay", days=30)[0])
    now = dt.datetime.now(dt.UTC)
    assert leaf.not_valid_before_utc <= now
    assert now + dt.timedelta(days=29) < leaf.not_valid_after_utc <= now + dt.timedelta(days=31)


def test_not_after_before_not_before_is_refused(ca_dir: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    with pytest.raises(pki.PkiError, match="later than"):
        pki.issue(ca_dir, "x.example", "relay", not_before=now, not_after=now)


def test_issue_refuses_to_overwrite(ca_dir: Path) -> None:
    cert_path, key_path = pki.issue(ca_dir, "relay.example", "relay")
    before = cert_path.read_bytes(), key_path.read_bytes()
    with pytest.raises(pki.PkiError, match="force=True"):
        pki.issue(ca_dir, "relay.example", "relay")
    assert (cert_path.read_bytes(), key_path.read_bytes()) == before
    pki.issue(ca_dir, "relay.example", "relay", force=True)
    assert cert_path.read_bytes() != before[0]
    assert key_path.read_bytes() != before[1]


def test_issue_refuses_when_only_the_key_exists(ca_dir: Path) -> None:
    (ca_dir / "relay.example.key").write_text("precious")
    with pytest.raises(pki.PkiError, match="already exist"):
        pki.issue(ca_dir, "relay.example", "relay")
    assert (ca_dir / "relay.example.key").read_text() == "precious"


def test_issue_without_ca(tmp_path: Path) -> None:
    with pytest.raises(pki.PkiError, match="init_ca"):
        pki.issue(tmp_path, "relay.example", "relay")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["", "ca", "../evil", "a/b", "-x", "a b", "x" * 64, "a..b"])
def test_bad_names_are_refused(ca_dir: Path, name: str) -> None:
    with pytest.raises(pki.PkiError):
        pki.issue(ca_dir, name, "relay")


def test_bad_san_is_refused(ca_dir: Path) -> None:
    with pytest.raises(pki.PkiError, match="neither"):
        pki.issue(ca_dir, "relay.example", "relay", sans=["not a name"])
    assert not (ca_dir / "relay.example.pem").exists()


def test_wildcard_san(ca_dir: Path) -> None:
    cert_path, _ = pki.issue(ca_dir, "relay.example", "relay", sans=["*.relay.example"])
    san = load(cert_path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["relay.example", "*.relay.example"]


def test_client_name_must_not_be_an_ip(ca_dir: Path) -> None:
    with pytest.raises(pki.PkiError):
        pki.issue(ca_dir, "198.18.1.2", "client")


def test_bad_kind(ca_dir: Path) -> None:
    with pytest.raises(pki.PkiError):
        pki.issue(ca_dir, "x.example", "server")  # type: ignore[arg-type]
