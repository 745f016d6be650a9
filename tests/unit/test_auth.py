"""Tokens and client-certificate checks (masqued.gate.auth)."""

from __future__ import annotations

import contextlib
import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from hypothesis import given
from hypothesis import strategies as st

from masqued.gate import pki
from masqued.gate.auth import (
    AuthError,
    CertPolicy,
    TokenFileError,
    TokenStore,
    bearer_token,
    certificate_identity,
    new_token,
    verify_client_certificate,
)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ca")
    pki.init_ca(d)
    pki.issue(d, "alice", "client")
    pki.issue(d, "bob", "client")
    pki.issue(d, "relay.example", "relay")
    now = dt.datetime.now(dt.UTC)
    pki.issue(
        d,
        "old",
        "client",
        not_before=now - dt.timedelta(days=9),
        not_after=now - dt.timedelta(days=1),
    )
    return d


# -- tokens ------------------------------------------------------------------------------------


def test_token_round_trip_and_file_holds_no_secret() -> None:
    token, line = new_token("alice")
    assert token.startswith("alice.") and len(token) > 40
    secret = token.split(".", 1)[1]
    assert secret not in line and line.startswith("alice:sha256$")
    store = TokenStore.parse(line + "\n# comment\n\n")
    assert store.verify(token) == "alice"


def test_wrong_unknown_and_malformed_tokens_are_403() -> None:
    token, line = new_token("alice")
    other, other_line = new_token("bob")
    store = TokenStore.parse(line)
    for bad in (token + "x", "alice.", "bob." + token.split(".", 1)[1], other, "nodot", ""):
        with pytest.raises(AuthError) as exc:
            store.verify(bad)
        assert exc.value.status == 403
    # the same secret under another name does not work either
    assert TokenStore.parse(other_line).verify(other) == "bob"


def test_token_file_errors_name_the_line(tmp_path: Path) -> None:
    _, good = new_token("alice")
    text = f"{good}\nbroken line\n{good}\ncarol:md5$x$y\n"
    with pytest.raises(TokenFileError) as exc:
        TokenStore.parse(text, tmp_path / "tokens")
    msg = str(exc.value)
    assert "tokens:2:" in msg and "tokens:3: duplicate name" in msg and "tokens:4:" in msg
    with pytest.raises(TokenFileError):
        TokenStore.load(tmp_path / "missing")


@given(st.text(max_size=200))
def test_any_token_file_text_parses_or_raises_token_file_error(text: str) -> None:
    with contextlib.suppress(TokenFileError):
        TokenStore.parse(text)


@given(st.text(max_size=100))
def test_any_presented_token_is_accepted_or_403(token: str) -> None:
    _, line = new_token("alice")
    with pytest.raises(AuthError):
        TokenStore.parse(line).verify(token)


def test_bearer_header() -> None:
    assert bearer_token("Bearer abc.def") == "abc.def"
    assert bearer_token("bearer  abc ") == "abc"
    for bad in (None, "", "Basic abc", "Bearer", "Bearer   "):
        assert bearer_token(bad) is None


def test_invalid_names_refused() -> None:
    for bad in ("", "a.b", "-x", "a b"):
        with pytest.raises(ValueError):
            new_token(bad)


# -- certificates ---------------------------------------------------------------------------------


def test_valid_client_certificate_gives_its_cn(ca: Path) -> None:
    policy = CertPolicy.load(ca / "ca.pem")
    assert verify_client_certificate(load(ca / "alice.pem"), [], policy) == "alice"
    assert certificate_identity(load(ca / "bob.pem")) == "bob"


def test_no_certificate_is_401(ca: Path) -> None:
    with pytest.raises(AuthError) as exc:
        verify_client_certificate(None, [], CertPolicy.load(ca / "ca.pem"))
    assert exc.value.status == 401


def test_wrong_ca_expired_and_server_cert_are_403(ca: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    pki.init_ca(other)
    cases = [
        (load(ca / "alice.pem"), CertPolicy.load(other / "ca.pem"), "not trusted"),
        (load(ca / "old.pem"), CertPolicy.load(ca / "ca.pem"), "expired"),
        (load(ca / "relay.example.pem"), CertPolicy.load(ca / "ca.pem"), "client authentication"),
    ]
    for cert, policy, words in cases:
        with pytest.raises(AuthError) as exc:
            verify_client_certificate(cert, [], policy)
        assert exc.value.status == 403 and words in exc.value.reason


def test_deny_list_by_name_and_serial(ca: Path) -> None:
    alice = load(ca / "alice.pem")
    for entry in ("alice", f"serial:{alice.serial_number:X}", f"Serial: 0{alice.serial_number:x}"):
        policy = CertPolicy.load(ca / "ca.pem", revoked=[entry])
        with pytest.raises(AuthError, match="revoked"):
            verify_client_certificate(alice, [], policy)
        assert verify_client_certificate(load(ca / "bob.pem"), [], policy) == "bob"


def test_crl_revocation(ca: Path, tmp_path: Path) -> None:
    crl = pki.revoke(ca, "bob")
    policy = CertPolicy.load(ca / "ca.pem", crl=crl)
    with pytest.raises(AuthError, match="CRL"):
        verify_client_certificate(load(ca / "bob.pem"), [], policy)
    assert verify_client_certificate(load(ca / "alice.pem"), [], policy) == "alice"
    # revoking again keeps earlier entries
    pki.revoke(ca, "alice")
    policy = CertPolicy.load(ca / "ca.pem", crl=crl)
    for name in ("alice", "bob"):
        with pytest.raises(AuthError):
            verify_client_certificate(load(ca / f"{name}.pem"), [], policy)
    # a CRL signed by another CA is refused at load time
    other = tmp_path / "o"
    pki.init_ca(other)
    with pytest.raises(ValueError):
        CertPolicy.load(other / "ca.pem", crl=crl)
