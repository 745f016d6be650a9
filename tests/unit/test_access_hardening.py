"""Issue 14: a rotated token ends its old sessions on reload (item 6), mTLS sessions
through an intermediate CA survive a reload, and failed attempts are charged to what
failed, never locking out a valid credential."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from masqued.gate import pki
from masqued.gate.access import AccessControl
from masqued.gate.auth import AuthError, new_token
from tests.inproc import relay_config


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ca")
    pki.init_ca(d)
    pki.issue(d, "relay.example", "relay")
    pki.issue(d, "alice", "client")
    now = dt.datetime.now(dt.UTC)
    # Expired a minute after our CA issued it (the CA is valid from 5 minutes ago).
    pki.issue(
        d,
        "old",
        "client",
        not_before=now - dt.timedelta(minutes=2),
        not_after=now - dt.timedelta(minutes=1),
    )
    other = d / "other"
    pki.init_ca(other)
    pki.issue(other, "alice", "client")  # alice's name from a CA we do not trust
    return d


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_rotating_a_token_ends_the_sessions_of_the_old_secret(ca: Path, tmp_path: Path) -> None:
    old_token, old_line = new_token("carol")
    tokens = tmp_path / "tokens"
    tokens.write_text(old_line + "\n")
    cfg = relay_config(ca, auth=("token",), tokens_file=tokens)
    before = AccessControl(cfg)
    carol_old = before.authenticate("198.18.1.2", bearer(old_token), None)
    new_token_text, new_line = new_token("carol")  # same name, new secret
    tokens.write_text(new_line + "\n")
    after = AccessControl(cfg)
    assert not after.still_valid(carol_old, None)
    carol_new = after.authenticate("198.18.1.2", bearer(new_token_text), None)
    assert after.still_valid(carol_new, None)
    # An unrelated reload (same file) keeps the new session.
    assert AccessControl(cfg).still_valid(carol_new, None)


_LEAF_KEYS: dict[int, bytes] = {}


def _chain(d: Path) -> tuple[Path, x509.Certificate, x509.Certificate]:
    """root (path length 1) -> intermediate -> leaf "dave" (clientAuth)."""
    now = dt.datetime.now(dt.UTC)

    def cert(
        subject: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: str,
        signer: ec.EllipticCurvePrivateKey,
        ca_len: int | None,
    ) -> x509.Certificate:
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
                critical=False,
            )
        )
        if ca_len is not None:
            b = b.add_extension(x509.BasicConstraints(ca=True, path_length=ca_len), critical=True)
            b = b.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
        else:
            b = b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            b = b.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
            b = b.add_extension(
                x509.SubjectAlternativeName([x509.DNSName("dave.example")]), critical=False
            )
        return b.sign(signer, hashes.SHA256())

    root_key, mid_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = cert("root", root_key, "root", root_key, 1)
    mid = cert("intermediate", mid_key, "root", root_key, 0)
    leaf = cert("dave", leaf_key, "intermediate", mid_key, None)
    _LEAF_KEYS[leaf.serial_number] = leaf_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = d / "root.pem"
    path.write_bytes(root.public_bytes(serialization.Encoding.PEM))
    return path, leaf, mid


def test_mtls_session_through_an_intermediate_survives_reload(tmp_path: Path, ca: Path) -> None:
    root, leaf, mid = _chain(tmp_path)
    cfg = relay_config(ca, auth=("mtls",), client_ca=root)
    before = AccessControl(cfg)
    dave = before.authenticate("198.18.1.2", {}, leaf, [mid])
    assert dave.name == "dave"
    after = AccessControl(cfg)
    assert after.still_valid(dave, leaf)
    assert not AccessControl(replace(cfg, revoked=("dave",))).still_valid(dave, leaf)


def _fail(access: AccessControl, ip: str, headers: dict[str, str], cert: object = None) -> int:
    try:
        access.authenticate(ip, headers, cert)  # type: ignore[arg-type]
    except AuthError as exc:
        return exc.status
    return 200


def test_failures_never_lock_out_a_valid_credential(ca: Path, tmp_path: Path) -> None:
    token, line = new_token("carol")
    (tmp_path / "tokens").write_text(line + "\n")
    access = AccessControl(
        relay_config(
            ca, auth=("mtls", "token"), client_ca=ca / "ca.pem", tokens_file=tmp_path / "tokens"
        )
    )
    nat = "198.18.1.66"  # many users behind one address
    for _ in range(30):
        _fail(access, nat, {})
        _fail(access, nat, bearer("nobody.secret"))
        _fail(access, nat, bearer("carol.wrong"))
        _fail(access, nat, {}, load(ca / "other" / "alice.pem"))
    assert _fail(access, nat, {}) == 429  # the credential-less neighbour is limited
    # ... but carol's and alice's real credentials still get in from the same address.
    assert access.authenticate(nat, bearer(token), None).name == "carol"
    assert access.authenticate(nat, {}, load(ca / "alice.pem")).name == "alice"


def test_failures_are_charged_to_what_failed(ca: Path, tmp_path: Path) -> None:
    _, line = new_token("carol")
    (tmp_path / "tokens").write_text(line + "\n")
    access = AccessControl(
        relay_config(
            ca, auth=("mtls", "token"), client_ca=ca / "ca.pem", tokens_file=tmp_path / "tokens"
        )
    )
    # Wrong secrets for a known name, each from another address: charged to the name.
    got = [_fail(access, f"198.18.2.{i}", bearer("carol.wrong")) for i in range(1, 13)]
    assert got[:10] == [403] * 10 and set(got[10:]) == {429}
    # A certificate of our CA that failed (expired) is charged to its identity ...
    got = [_fail(access, f"198.18.3.{i}", {}, load(ca / "old.pem")) for i in range(1, 13)]
    assert got[:10] == [403] * 10 and set(got[10:]) == {429}
    # ... one we never issued, and an unknown name, to the address they came from.
    assert _fail(access, "198.18.4.1", {}, load(ca / "other" / "alice.pem")) == 403
    assert _fail(access, "198.18.4.2", bearer("mallory.x")) == 403
    assert _fail(access, "198.18.4.2", bearer("carol.wrong")) == 429  # carol's bucket
    for _ in range(9):
        _fail(access, "198.18.4.2", bearer("mallory.x"))
    assert _fail(access, "198.18.4.2", bearer("mallory.x")) == 429
    assert _fail(access, "198.18.4.3", bearer("mallory.x")) == 403


# -- the same through a live relay: update_access after a reload ---------------------------


async def _live(
    access: AccessControl, ca: Path, client_settings: dict[str, object]
) -> tuple[object, object, object]:
    import asyncio
    import socket

    from masqued.gate.ipam import AddressPool
    from masqued.host.tun import FakeTun
    from masqued.transport.client import ClientSettings, ClientTunnel
    from masqued.transport.relay import RelayServer, RelaySettings

    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    server = RelayServer(
        loop,
        sock,
        FakeTun("mq-relay", 1300),
        AddressPool([ipaddress.ip_network("198.18.200.0/24")]),
        RelaySettings(
            mtu=1300,
            routes=(ipaddress.ip_network("198.19.0.0/24"),),
            certificate=str(ca / "relay.example.pem"),
            private_key=str(ca / "relay.example.key"),
        ),
        access=access,
    )
    server.start()
    settings = ClientSettings(
        relay_host="127.0.0.1",
        relay_port=sock.getsockname()[1],
        server_name="relay.example",
        ca=str(ca / "ca.pem"),
        mtu=1300,
        fwmark=0,
        keepalive=0.5,
        reconnect_max=0.5,
        **client_settings,  # type: ignore[arg-type]
    )
    tunnel = ClientTunnel(loop, settings, FakeTun("mq-c", 1300), lambda params: None)
    up: asyncio.Future[None] = loop.create_future()
    task = loop.create_task(tunnel.run(up))
    await asyncio.wait_for(up, 5)
    return server, tunnel, task


async def test_live_relay_closes_a_rotated_token_and_keeps_an_intermediate_chain(
    ca: Path, tmp_path: Path
) -> None:
    import asyncio

    from tests.inproc import until

    # A token session, then its secret rotated and the relay reloaded.
    old_token, old_line = new_token("carol")
    tokens = tmp_path / "tokens"
    tokens.write_text(old_line + "\n")
    (tmp_path / "carol.token").write_text(old_token)
    cfg = relay_config(ca, auth=("token",), tokens_file=tokens)
    server, tunnel, task = await _live(
        AccessControl(cfg), ca, {"token_file": str(tmp_path / "carol.token")}
    )
    try:
        session = next(iter(server.sessions))  # type: ignore[attr-defined]
        tokens.write_text(new_token("carol")[1] + "\n")
        server.update_access(AccessControl(cfg))  # type: ignore[attr-defined]
        assert session not in server.sessions  # type: ignore[attr-defined]
        await until(lambda: tunnel.status.state != "connected")  # type: ignore[attr-defined]
    finally:
        tunnel.stop()  # type: ignore[attr-defined]
        await asyncio.wait_for(task, 5)  # type: ignore[arg-type]
        server.close()  # type: ignore[attr-defined]

    # A certificate chained through an intermediate: still authorized after a reload.
    root, leaf, mid = _chain(tmp_path)
    key = tmp_path / "dave.key"
    chain_file = tmp_path / "dave.pem"
    chain_file.write_bytes(
        leaf.public_bytes(serialization.Encoding.PEM) + mid.public_bytes(serialization.Encoding.PEM)
    )
    key.write_bytes(_LEAF_KEYS[leaf.serial_number])
    cfg = relay_config(ca, auth=("mtls",), client_ca=root)
    server, tunnel, task = await _live(
        AccessControl(cfg), ca, {"certificate": str(chain_file), "private_key": str(key)}
    )
    try:
        session = next(iter(server.sessions))  # type: ignore[attr-defined]
        assert session.identity.name == "dave"
        server.update_access(AccessControl(cfg))  # type: ignore[attr-defined]
        assert session in server.sessions  # type: ignore[attr-defined]
        assert tunnel.status.state == "connected"  # type: ignore[attr-defined]
    finally:
        tunnel.stop()  # type: ignore[attr-defined]
        await asyncio.wait_for(task, 5)  # type: ignore[arg-type]
        server.close()  # type: ignore[attr-defined]
