"""AccessControl: authentication decisions, rate limiting, policy lookup, lease file."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509

from masqued.gate import pki
from masqued.gate.access import AccessControl, FailureLimiter, Identity, LeaseStore
from masqued.gate.auth import AuthError, new_token
from masqued.gate.clients import ClientPolicy
from masqued.gate.policy import Acl
from masqued.proto.packet import build_tcp, build_udp
from tests.inproc import relay_config


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ca")
    pki.init_ca(d)
    pki.issue(d, "relay.example", "relay")
    pki.issue(d, "alice", "client")
    pki.issue(d, "bob", "client")
    return d


def cert(ca: Path, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((ca / f"{name}.pem").read_bytes())


def test_open_relay_lets_everyone_in(ca: Path) -> None:
    access = AccessControl(relay_config(ca))
    assert access.authenticate("198.18.1.2", {}, None) == Identity(None, "none")


def test_mtls_and_token(ca: Path, tmp_path: Path) -> None:
    token, line = new_token("carol")
    (tmp_path / "tokens").write_text(line + "\n")
    access = AccessControl(
        relay_config(
            ca, auth=("mtls", "token"), client_ca=ca / "ca.pem", tokens_file=tmp_path / "tokens"
        )
    )
    assert access.authenticate("198.18.1.2", {}, cert(ca, "alice")) == Identity("alice", "mtls")
    headers = {"authorization": f"Bearer {token}"}
    assert access.authenticate("198.18.1.2", headers, None) == Identity("carol", "token")
    with pytest.raises(AuthError) as exc:
        access.authenticate("198.18.1.3", {}, None)
    assert exc.value.status == 401
    with pytest.raises(AuthError) as exc:
        access.authenticate("198.18.1.3", {"authorization": "Bearer carol.wrong"}, None)
    assert exc.value.status == 403


def test_repeated_failures_are_rate_limited_per_address(ca: Path) -> None:
    access = AccessControl(relay_config(ca, auth=("mtls",), client_ca=ca / "ca.pem"))
    statuses = []
    for _ in range(13):
        try:
            access.authenticate("198.18.1.66", {}, None)
        except AuthError as exc:
            statuses.append(exc.status)
    assert statuses[:10] == [401] * 10 and set(statuses[10:]) == {429}
    # another address is not affected, and a good certificate still works from it
    assert access.authenticate("198.18.1.67", {}, cert(ca, "bob")).name == "bob"


def test_failure_limiter_refills() -> None:
    lim = FailureLimiter(burst=2, rate=1.0)
    lim.failed("a", now=0.0)
    lim.failed("a", now=0.0)
    assert lim.blocked("a", now=0.5)
    assert not lim.blocked("a", now=1.0)
    assert not lim.blocked("b", now=0.0)


def test_still_valid_after_reload(ca: Path, tmp_path: Path) -> None:
    token, line = new_token("carol")
    (tmp_path / "tokens").write_text(line + "\n")
    cfg = relay_config(
        ca, auth=("mtls", "token"), client_ca=ca / "ca.pem", tokens_file=tmp_path / "tokens"
    )
    before = AccessControl(cfg)
    alice = before.authenticate("198.18.1.2", {}, cert(ca, "alice"))
    carol = before.authenticate("198.18.1.2", {"authorization": f"Bearer {token}"}, None)
    (tmp_path / "tokens").write_text("")  # carol's token revoked
    after = AccessControl(replace(cfg, revoked=("alice",)))  # alice on the deny list
    assert not after.still_valid(alice, cert(ca, "alice"))
    assert not after.still_valid(carol, None)
    bob = before.authenticate("198.18.1.2", {}, cert(ca, "bob"))
    assert after.still_valid(bob, cert(ca, "bob"))


def test_policy_for_identity(ca: Path) -> None:
    alice = ClientPolicy(
        "alice",
        (ipaddress.ip_address("198.18.200.50"),),
        Acl.parse(["allow 198.19.0.2/32 tcp 8080"], "deny"),
    )
    access = AccessControl(relay_config(ca, clients={"alice": alice}, acl_default="deny"))
    policy, acl = access.policy_for(Identity("alice", "mtls"))
    assert policy is alice
    assert acl.allows(build_tcp("198.18.200.50", "198.19.0.2", 1, 8080))
    assert not acl.allows(build_udp("198.18.200.50", "198.19.0.2", 1, 8080, b""))
    policy, acl = access.policy_for(Identity("zed", "token"))
    assert policy is None and not acl.allows(build_tcp("198.18.200.9", "198.19.0.2", 1, 8080))
    assert access.reservations() == {"alice": (ipaddress.ip_address("198.18.200.50"),)}


def test_lease_store_round_trip_and_atomic_file(tmp_path: Path) -> None:
    path = tmp_path / "state" / "leases.json"
    store = LeaseStore(path)
    a = ipaddress.ip_address("198.18.200.7")
    store.remember("alice", [a])
    assert json.loads(path.read_text())["leases"] == {"alice": ["198.18.200.7"]}
    assert LeaseStore(path).previous("alice") == (a,)
    assert LeaseStore(path).previous("bob") == ()
    assert not list(path.parent.glob(".leases.*"))  # no temporary files left


def test_lease_store_survives_garbage(tmp_path: Path) -> None:
    path = tmp_path / "leases.json"
    for junk in ("not json", "[]", '{"version": 9}', '{"version": 1, "leases": {"a": ["x"]}}'):
        path.write_text(junk)
        assert LeaseStore(path).previous("a") == ()
