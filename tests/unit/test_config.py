"""masqued.config: every way a config can be wrong gives one clear ``PATH: WHAT`` line."""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from masqued import config
from masqued.config import (
    CLIENT_KEYS,
    RELAY_KEYS,
    ClientConfig,
    ConfigError,
    RelayConfig,
    check_permissions,
    config_dir,
    config_path,
    load_config,
    parse_host_port,
    parse_network,
)
from masqued.gate import pki
from masqued.gate.auth import new_token
from masqued.host.naming import InvalidInstanceName

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "etc" / "masque"

net = ipaddress.ip_network


@pytest.fixture(scope="module")
def pkidir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    pki.init_ca(d)
    pki.issue(d, "relay", "relay", sans=["relay.example", "198.18.1.1"])
    pki.issue(d, "other", "relay")
    pki.issue(d, "alice", "client")
    pki.issue(d, "mallory", "client")
    pki.revoke(d, "mallory")
    (d / "garbage.pem").write_text("this is not a certificate\n")
    # files the example configs name under /etc/masque/ (see example())
    token, line = new_token("alice")
    (d / "relay.tokens").write_text(line + "\n")
    (d / "client.token").write_text(token + "\n")
    (d / "relay.clients.d").mkdir()
    (d / "relay.clients.d" / "bob.conf").write_text(
        'acl = ["allow 198.19.0.0/24"]\nacl_default = "deny"\n'
    )
    return d


def toml_str(value: str | Path) -> str:
    return json.dumps(str(value), ensure_ascii=False)


def relay_text(pkidir: Path, **overrides: str | None) -> str:
    """A valid relay config; overrides are raw TOML values (None removes the key)."""
    keys: dict[str, str | None] = {
        "mode": '"relay"',
        "certificate": toml_str(pkidir / "relay.pem"),
        "private_key": toml_str(pkidir / "relay.key"),
        "pool": '["198.18.200.0/24", "2001:db8:200::/64"]',
    }
    keys.update(overrides)
    return "".join(f"{k} = {v}\n" for k, v in keys.items() if v is not None)


def client_text(pkidir: Path, **overrides: str | None) -> str:
    keys: dict[str, str | None] = {
        "mode": '"client"',
        "relay": '"relay.example"',
        "ca": toml_str(pkidir / "ca.pem"),
        "routes": '["198.19.0.0/24"]',
    }
    keys.update(overrides)
    return "".join(f"{k} = {v}\n" for k, v in keys.items() if v is not None)


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str], Path]:
    def write(text: str, name: str = "test.conf") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


@pytest.fixture
def relay(pkidir: Path, write: Callable[[str], Path]) -> Callable[..., RelayConfig]:
    def load(**overrides: str | None) -> RelayConfig:
        cfg = load_config(write(relay_text(pkidir, **overrides)))
        assert isinstance(cfg, RelayConfig)
        return cfg

    return load


@pytest.fixture
def client(pkidir: Path, write: Callable[[str], Path]) -> Callable[..., ClientConfig]:
    def load(**overrides: str | None) -> ClientConfig:
        cfg = load_config(write(client_text(pkidir, **overrides)))
        assert isinstance(cfg, ClientConfig)
        return cfg

    return load


def problems(load: Callable[..., Any], **overrides: str | None) -> list[str]:
    """The problem lines a config gives (each without the path prefix)."""
    with pytest.raises(ConfigError) as info:
        load(**overrides)
    err = info.value
    lines = str(err).splitlines()
    assert len(lines) == len(err.problems)
    for line, problem in zip(lines, err.problems, strict=True):
        assert line == f"{err.path}: {problem}"
    return list(err.problems)


def one_problem(load: Callable[..., Any], **overrides: str | None) -> str:
    found = problems(load, **overrides)
    assert len(found) == 1, found
    return found[0]


# --- valid configs and defaults ---


def test_relay_defaults(relay: Callable[..., RelayConfig], pkidir: Path, tmp_path: Path) -> None:
    cfg = relay()
    assert cfg == RelayConfig(
        name="test",
        path=tmp_path / "test.conf",
        listen_host="0.0.0.0",
        listen_port=443,
        certificate=pkidir / "relay.pem",
        private_key=pkidir / "relay.key",
        pool=(net("198.18.200.0/24"), net("2001:db8:200::/64")),
        routes=(net("0.0.0.0/0"), net("::/0")),
        egress="auto",
        nat="auto",
        mtu=1300,
        log_level="info",
        listen_tcp=("0.0.0.0", 443),  # HTTP/2 on the same address and port
        max_clients=None,
    )
    assert cfg.mode == "relay"


def test_relay_default_routes_follow_pool_families(relay: Callable[..., RelayConfig]) -> None:
    assert relay(pool='["198.18.200.0/24"]').routes == (net("0.0.0.0/0"),)
    assert relay(pool='["2001:db8:200::/64"]').routes == (net("::/0"),)


def test_relay_all_keys(relay: Callable[..., RelayConfig]) -> None:
    cfg = relay(
        listen='"[2001:db8::1]:8443"',
        routes='["198.19.0.0/24", "2001:db8:19::/48"]',
        egress='"eth0"',
        nat='"nftables"',
        mtu="1400",
        log_level='"debug"',
        max_clients="50",
    )
    assert (cfg.listen_host, cfg.listen_port) == ("2001:db8::1", 8443)
    assert cfg.listen_tcp == ("2001:db8::1", 8443)
    assert cfg.routes == (net("198.19.0.0/24"), net("2001:db8:19::/48"))
    assert (cfg.egress, cfg.nat, cfg.mtu, cfg.log_level) == ("eth0", "nftables", 1400, "debug")
    assert cfg.max_clients == 50


def test_client_defaults(client: Callable[..., ClientConfig], pkidir: Path, tmp_path: Path) -> None:
    cfg = client()
    assert cfg == ClientConfig(
        name="test",
        path=tmp_path / "test.conf",
        relay_host="relay.example",
        relay_port=443,
        server_name="relay.example",
        ca=pkidir / "ca.pem",
        routes=(net("198.19.0.0/24"),),
        transport="auto",
        mtu=1300,
        fwmark=None,
        log_level="info",
        keepalive=1.0,
        reconnect_max=4.0,
    )
    assert cfg.mode == "client"
    assert not cfg.full_tunnel


def test_client_all_keys(client: Callable[..., ClientConfig]) -> None:
    cfg = client(
        relay='"[2001:db8::1]:8443"',
        server_name='"relay.example"',
        routes='["0.0.0.0/0", "::/0"]',
        transport='"stream"',
        mtu="1280",
        fwmark="51820",
        log_level='"warning"',
        keepalive="0.5",
        reconnect_max="30",
    )
    assert (cfg.relay_host, cfg.relay_port, cfg.server_name) == (
        "2001:db8::1",
        8443,
        "relay.example",
    )
    assert cfg.full_tunnel
    assert (cfg.mtu, cfg.fwmark, cfg.log_level) == (1280, 51820, "warning")
    assert cfg.keepalive == 0.5
    assert cfg.reconnect_max == 30.0
    assert isinstance(cfg.reconnect_max, float)


def test_configs_are_frozen(relay: Callable[..., RelayConfig]) -> None:
    cfg = relay()
    with pytest.raises(AttributeError):
        cfg.mtu = 1500  # type: ignore[misc]


# --- names and paths ---


def test_name_defaults_to_stem_and_can_be_given(pkidir: Path, write: Callable[..., Path]) -> None:
    path = write(relay_text(pkidir), "relay-1.conf")
    assert load_config(path).name == "relay-1"
    assert load_config(path, name="other").name == "other"


def test_invalid_instance_name(pkidir: Path, write: Callable[..., Path]) -> None:
    path = write(relay_text(pkidir), "bad name.conf")
    with pytest.raises(ConfigError, match="invalid instance name 'bad name'"):
        load_config(path)
    with pytest.raises(ConfigError, match="invalid instance name"):
        load_config(write(relay_text(pkidir)), name="-x")


def test_relative_paths_resolve_against_config_dir(
    pkidir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    shutil.copytree(pkidir, etc / "pki")
    (etc / "relay.conf").write_text(
        relay_text(pkidir, certificate='"pki/relay.pem"', private_key='"./pki/relay.key"')
    )
    (etc / "client.conf").write_text(client_text(pkidir, ca='"pki/ca.pem"'))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # neither the cwd nor a relative config path matters

    relay_cfg = load_config(Path("../etc/relay.conf"))
    assert isinstance(relay_cfg, RelayConfig)
    assert relay_cfg.certificate == etc / "pki" / "relay.pem"
    assert relay_cfg.private_key.resolve() == etc / "pki" / "relay.key"
    assert relay_cfg.certificate.is_absolute()
    client_cfg = load_config(etc / "client.conf")
    assert isinstance(client_cfg, ClientConfig)
    assert client_cfg.ca == etc / "pki" / "ca.pem"


def test_config_dir_and_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MASQUED_CONFIG_DIR", raising=False)
    assert config_dir() == Path("/etc/masque")
    assert config_path("relay") == Path("/etc/masque/relay.conf")
    monkeypatch.setenv("MASQUED_CONFIG_DIR", str(tmp_path))
    assert config_dir() == tmp_path
    assert config_path("relay") == tmp_path / "relay.conf"
    with pytest.raises(InvalidInstanceName):
        config_path("../../etc/passwd")


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.conf")
    assert (
        str(info.value)
        == f"{tmp_path / 'nope.conf'}: cannot read config: No such file or directory"
    )


# --- TOML and mode ---


def test_toml_syntax_error_names_the_line(write: Callable[..., Path]) -> None:
    path = write('mode = "relay"\nmtu = 1300\npool = ["198.18.200.0/24"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: TOML syntax error: ")
    assert "line 3" in msg
    assert "\n" not in msg


def test_toml_syntax_error_mid_file(write: Callable[..., Path]) -> None:
    path = write('mode = "relay"\nmtu = = 1300\npool = []\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems[0].startswith("TOML syntax error: ")
    assert "(at line 2, column" in info.value.problems[0]


def test_toml_duplicate_key(write: Callable[..., Path]) -> None:
    with pytest.raises(ConfigError, match=r"TOML syntax error: .*line 2"):
        load_config(write("mtu = 1300\nmtu = 1400\n"))


def test_invalid_utf8(write: Callable[..., Path], tmp_path: Path) -> None:
    path = tmp_path / "x.conf"
    path.write_bytes(b'mode = "relay"\n# caf\xe9\n')
    with pytest.raises(ConfigError, match=r"not valid UTF-8 \(at line 2\)"):
        load_config(path)


def test_missing_mode(write: Callable[..., Path]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write("mtu = 1300\n"))
    assert info.value.problems == ('missing required key \'mode\' ("relay" or "client")',)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"relai"', "mode: 'relai' is not \"relay\" or \"client\" (did you mean 'relay'?)"),
        ('"server"', 'mode: \'server\' is not "relay" or "client"'),
        ("1", 'mode: expected "relay" or "client", got integer 1'),
    ],
)
def test_bad_mode(write: Callable[..., Path], value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(f"mode = {value}\n"))
    assert info.value.problems == (expected,)


def test_unknown_key_with_suggestion(pkidir: Path, write: Callable[..., Path]) -> None:
    path = write(relay_text(pkidir, pol='["198.18.200.0/24"]'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: invalid key 'pol' (did you mean 'pool'?)"


def test_unknown_key_without_suggestion(relay: Callable[..., RelayConfig]) -> None:
    assert one_problem(relay, zzzzz="1") == "invalid key 'zzzzz'"


def test_unknown_key_suggested_even_without_mode(write: Callable[..., Path]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write("relya = 'x'\n"))
    assert "invalid key 'relya' (did you mean 'relay'?)" in info.value.problems


def test_key_of_the_other_mode(
    relay: Callable[..., RelayConfig], client: Callable[..., ClientConfig]
) -> None:
    assert one_problem(client, pool='["198.18.200.0/24"]') == (
        "key 'pool' is only valid in a relay config (mode = 'client')"
    )
    assert one_problem(relay, fwmark='"off"') == (
        "key 'fwmark' is only valid in a client config (mode = 'relay')"
    )


def test_tables_are_not_allowed(pkidir: Path, write: Callable[..., Path]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(relay_text(pkidir) + "[poool]\nx = 1\n"))
    assert info.value.problems == (
        "invalid table [poool] (did you mean 'pool'?); masqued configs use top-level keys only",
    )


def test_all_problems_are_reported_together(relay: Callable[..., RelayConfig]) -> None:
    found = problems(relay, pol="1", mtu="100", nat='"ufw"', pool='["198.18.200.0/33"]')
    assert found == [
        "invalid key 'pol' (did you mean 'pool'?)",
        "pool: '198.18.200.0/33' is not a valid CIDR",
        'nat: \'ufw\' is not one of "auto", "nftables", "iptables", "off"',
        "mtu: 100 is out of range 576..9000",
    ]


def test_checks_run_on_the_good_entries_of_a_partly_bad_list(
    client: Callable[..., ClientConfig],
) -> None:
    found = problems(
        client,
        relay='"198.18.1.1"',
        routes='["0.0.0.0/0", "2001:db8::1/64", "::/0"]',
        fwmark='"off"',
        mtu="1200",
    )
    assert found[0].startswith("routes: '2001:db8::1/64' has host bits set")
    assert found[1] == "mtu: 1200 is below 1280, the minimum for IPv6 (routes has ::/0)"
    assert "routing loop" in found[2]
    assert len(found) == 3


# --- wrong types ---


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("listen", "443", "listen: expected a string, got integer 443"),
        ("certificate", "true", "certificate: expected a string, got boolean True"),
        ("pool", '"198.18.200.0/24"', "pool: expected an array of CIDR strings, got string "),
        ("pool", "[24]", "pool: expected CIDR strings, got integer 24"),
        ("routes", "{ a = 1 }", "routes: expected an array of CIDR strings, got table "),
        ("egress", "[]", "egress: expected a string, got array []"),
        ("mtu", '"1300"', "mtu: expected an integer, got string '1300'"),
        ("mtu", "1300.0", "mtu: expected an integer, got float 1300.0"),
        ("mtu", "true", "mtu: expected an integer, got boolean True"),
        ("max_clients", "1979-05-27", "max_clients: expected an integer, got date "),
        ("log_level", "1", "log_level: expected a string, got integer 1"),
    ],
)
def test_relay_wrong_types(
    relay: Callable[..., RelayConfig], key: str, value: str, expected: str
) -> None:
    assert one_problem(relay, **{key: value}).startswith(expected)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("relay", "443", "relay: expected a string, got integer 443"),
        ("ca", "1", "ca: expected a string, got integer 1"),
        ("routes", '"0.0.0.0/0"', "routes: expected an array of CIDR strings, got string "),
        ("keepalive", '"1s"', "keepalive: expected a number, got string '1s'"),
        ("keepalive", "false", "keepalive: expected a number, got boolean False"),
        ("reconnect_max", "[]", "reconnect_max: expected a number, got array []"),
        ("fwmark", "true", 'fwmark: expected "auto", "off" or an integer, got boolean True'),
        ("fwmark", '"on"', 'fwmark: expected "auto", "off" or an integer, got string \'on\''),
        ("fwmark", "1.5", 'fwmark: expected "auto", "off" or an integer, got float 1.5'),
        ("transport", "1", "transport: expected a string, got integer 1"),
        ("server_name", "[]", "server_name: expected a string, got array []"),
    ],
)
def test_client_wrong_types(
    client: Callable[..., ClientConfig], key: str, value: str, expected: str
) -> None:
    assert one_problem(client, **{key: value}).startswith(expected)


def test_long_values_are_cut_short_in_messages(relay: Callable[..., RelayConfig]) -> None:
    msg = one_problem(relay, mtu=toml_str("x" * 1000))
    assert len(msg) < 120
    assert msg.endswith("...")


# --- required keys ---


@pytest.mark.parametrize("key", ["certificate", "private_key", "pool"])
def test_relay_required_keys(relay: Callable[..., RelayConfig], key: str) -> None:
    assert one_problem(relay, **{key: None}) == f"missing required key {key!r}"


@pytest.mark.parametrize("key", ["relay", "ca", "routes"])
def test_client_required_keys(client: Callable[..., ClientConfig], key: str) -> None:
    assert one_problem(client, **{key: None}) == f"missing required key {key!r}"


# --- addresses and ports ---


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("0.0.0.0:443", "0.0.0.0", 443),
        ("[::]:443", "::", 443),
        ("[::]", "::", 443),
        ("198.18.1.1:1", "198.18.1.1", 1),
        ("[2001:db8::1]:65535", "2001:db8::1", 65535),
        ("198.18.1.1", "198.18.1.1", 443),
        ("::", "::", 443),
    ],
)
def test_listen_forms(relay: Callable[..., RelayConfig], text: str, host: str, port: int) -> None:
    cfg = relay(listen=toml_str(text))
    assert (cfg.listen_host, cfg.listen_port) == (host, port)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:0", "listen: '0.0.0.0:0': port 0 is out of range 1..65535"),
        ("0.0.0.0:65536", "listen: '0.0.0.0:65536': port 65536 is out of range 1..65535"),
        ("0.0.0.0:https", "listen: '0.0.0.0:https': port 'https' is not a number"),
        ("0.0.0.0:", "listen: '0.0.0.0:': port '' is not a number"),
        ("0.0.0.0:-1", "listen: '0.0.0.0:-1': port '-1' is not a number"),
        ("relay.example:443", "listen: 'relay.example' is not an IP address"),
        ("[198.18.1.1]:443", "listen: '[198.18.1.1]:443': only IPv6 addresses go in brackets"),
        ("[::1:443", "listen: '[::1:443': missing ']' after the IPv6 address"),
        ("[::1]443", "listen: '[::1]443': expected ':PORT' after ']'"),
        ("2001:db8::1::443", "listen: '2001:db8::1::443': put an IPv6 address in brackets"),
        (":443", "listen: ':443': missing host"),
    ],
)
def test_bad_listen(relay: Callable[..., RelayConfig], text: str, expected: str) -> None:
    assert one_problem(relay, listen=toml_str(text)).startswith(expected)


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("relay.example", "relay.example", 443),
        ("relay.example:8443", "relay.example", 8443),
        ("RELAY.example.:443", "RELAY.example.", 443),
        ("198.18.1.1:443", "198.18.1.1", 443),
        ("[2001:db8::1]:443", "2001:db8::1", 443),
        ("[2001:db8::1]", "2001:db8::1", 443),
    ],
)
def test_relay_address_forms(
    client: Callable[..., ClientConfig], text: str, host: str, port: int
) -> None:
    cfg = client(relay=toml_str(text))
    assert (cfg.relay_host, cfg.relay_port, cfg.server_name) == (host, port, host)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("relay.example:0", "port 0 is out of range 1..65535"),
        ("relay.example:99999", "port 99999 is out of range 1..65535"),
        ("relay.example:x", "port 'x' is not a number"),
        ("relay_1.example", "'relay_1.example' is neither a valid host name nor an IP address"),
        ("-relay.example", "is neither a valid host name nor an IP address"),
        ("", "'': missing host"),
        ("2001:db8::1::443", "put an IPv6 address in brackets"),
    ],
)
def test_bad_relay_address(client: Callable[..., ClientConfig], text: str, expected: str) -> None:
    msg = one_problem(client, relay=toml_str(text))
    assert msg.startswith("relay: ")
    assert expected in msg


def test_server_name(client: Callable[..., ClientConfig]) -> None:
    cfg = client(relay='"198.18.1.1"', server_name='"relay.example"')
    assert (cfg.relay_host, cfg.server_name) == ("198.18.1.1", "relay.example")
    assert one_problem(client, server_name='"a b"') == (
        "server_name: 'a b' is neither a valid host name nor an IP address"
    )


# --- networks ---


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('["198.18.200.0/33"]', "pool: '198.18.200.0/33' is not a valid CIDR"),
        ('["198.18.300.0/24"]', "pool: '198.18.300.0/24' is not a valid CIDR"),
        ('["2001:db8:200::/129"]', "pool: '2001:db8:200::/129' is not a valid CIDR"),
        ('["relay.example/24"]', "pool: 'relay.example/24' is not a valid CIDR"),
        ('["198.18.200.0"]', "pool: '198.18.200.0' is not a valid CIDR (missing '/PREFIX')"),
        (
            '["198.18.200.1/24"]',
            "pool: '198.18.200.1/24' has host bits set (did you mean '198.18.200.0/24'?)",
        ),
        (
            '["2001:db8:200::1/64"]',
            "pool: '2001:db8:200::1/64' has host bits set (did you mean '2001:db8:200::/64'?)",
        ),
        ("[]", "pool: must not be empty"),
        ('["198.18.200.0/24", "198.18.200.0/24"]', "pool: 198.18.200.0/24 is listed twice"),
        ('["198.18.0.0/16", "198.18.200.0/24"]', "pool: 198.18.200.0/24 overlaps 198.18.0.0/16"),
        ('["198.18.200.0/24", "198.18.0.0/15"]', "pool: 198.18.0.0/15 overlaps 198.18.200.0/24"),
        ('["198.18.200.0/31"]', "pool: 198.18.200.0/31 is too small (no client addresses)"),
        ('["198.18.200.1/32"]', "pool: 198.18.200.1/32 is too small (no client addresses)"),
        ('["2001:db8:200::/127"]', "pool: 2001:db8:200::/127 is too small (no client addresses)"),
        ('["2001:db8:200::/128"]', "pool: 2001:db8:200::/128 is too small (no client addresses)"),
    ],
)
def test_bad_pool(relay: Callable[..., RelayConfig], value: str, expected: str) -> None:
    assert one_problem(relay, pool=value) == expected


def test_smallest_pools(relay: Callable[..., RelayConfig]) -> None:
    cfg = relay(pool='["198.18.200.0/30", "2001:db8:200::/126"]')
    assert cfg.pool == (net("198.18.200.0/30"), net("2001:db8:200::/126"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('["198.19.0.1/24"]', "routes: '198.19.0.1/24' has host bits set"),
        ('["198.19.0.0/24", "198.19.0.0/24"]', "routes: 198.19.0.0/24 is listed twice"),
        ("[]", "routes: must not be empty"),
    ],
)
def test_bad_routes(
    relay: Callable[..., RelayConfig],
    client: Callable[..., ClientConfig],
    value: str,
    expected: str,
) -> None:
    assert one_problem(relay, routes=value).startswith(expected)
    assert one_problem(client, routes=value).startswith(expected)


def test_relay_routes_must_match_pool_families(relay: Callable[..., RelayConfig]) -> None:
    assert one_problem(relay, pool='["198.18.200.0/24"]', routes='["::/0"]') == (
        "routes: ::/0 is IPv6 but the pool has no IPv6 network"
    )


# --- mtu ---


@pytest.mark.parametrize("mtu", ["575", "9001", "0", "-1"])
def test_mtu_out_of_range(
    relay: Callable[..., RelayConfig], client: Callable[..., ClientConfig], mtu: str
) -> None:
    assert one_problem(relay, pool='["198.18.200.0/24"]', mtu=mtu) == (
        f"mtu: {mtu} is out of range 576..9000"
    )
    assert one_problem(client, mtu=mtu) == f"mtu: {mtu} is out of range 576..9000"


def test_mtu_limits_ipv4(
    relay: Callable[..., RelayConfig], client: Callable[..., ClientConfig]
) -> None:
    assert relay(pool='["198.18.200.0/24"]', mtu="576").mtu == 576
    assert relay(pool='["198.18.200.0/24"]', mtu="9000").mtu == 9000
    assert client(mtu="576").mtu == 576


def test_mtu_ipv6_needs_1280(
    relay: Callable[..., RelayConfig], client: Callable[..., ClientConfig]
) -> None:
    assert one_problem(relay, mtu="1279") == (
        "mtu: 1279 is below 1280, the minimum for IPv6 (pool has 2001:db8:200::/64)"
    )
    assert relay(mtu="1280").mtu == 1280
    assert one_problem(client, routes='["198.19.0.0/24", "2001:db8:19::/48"]', mtu="1200") == (
        "mtu: 1200 is below 1280, the minimum for IPv6 (routes has 2001:db8:19::/48)"
    )
    assert client(routes='["::/0"]', mtu="1280").mtu == 1280


# --- files: certificate, key, ca ---


def test_missing_certificate(pkidir: Path, write: Callable[..., Path]) -> None:
    path = write(relay_text(pkidir, certificate='"/x/y.pem"'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: certificate: file /x/y.pem does not exist"


def test_missing_key_and_ca(
    relay: Callable[..., RelayConfig], client: Callable[..., ClientConfig], tmp_path: Path
) -> None:
    assert one_problem(relay, private_key='"nope.key"') == (
        f"private_key: file {tmp_path / 'nope.key'} does not exist"
    )
    assert one_problem(client, ca='"/x/ca.pem"') == "ca: file /x/ca.pem does not exist"


def test_file_below_a_file(relay: Callable[..., RelayConfig], pkidir: Path) -> None:
    below = pkidir / "relay.pem" / "x"
    assert one_problem(relay, certificate=toml_str(below)) == (
        f"certificate: file {below} does not exist"
    )


def test_certificate_is_a_directory(relay: Callable[..., RelayConfig], pkidir: Path) -> None:
    assert one_problem(relay, certificate=toml_str(pkidir)) == (
        f"certificate: {pkidir} is a directory, not a file"
    )


def test_unreadable_certificate(
    relay: Callable[..., RelayConfig], pkidir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = open

    def deny(path: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(path).name == "relay.pem":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(config.reader, "open", deny, raising=False)
    assert one_problem(relay) == (
        f"certificate: file {pkidir / 'relay.pem'} is not readable (permission denied)"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_key_for_real(
    relay: Callable[..., RelayConfig], pkidir: Path, tmp_path: Path
) -> None:
    key = tmp_path / "locked.key"
    shutil.copy(pkidir / "relay.key", key)
    key.chmod(0)
    assert one_problem(relay, private_key=toml_str(key)) == (
        f"private_key: file {key} is not readable (permission denied)"
    )


def test_other_os_error(relay: Callable[..., RelayConfig], monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(path: Any, *args: Any, **kwargs: Any) -> Any:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(config.reader, "open", broken, raising=False)
    found = problems(relay)
    assert len(found) == 2
    assert found[0].startswith("certificate: cannot read ")
    assert found[0].endswith(": Input/output error")


def test_garbage_certificate(
    relay: Callable[..., RelayConfig], client: Callable[..., ClientConfig], pkidir: Path
) -> None:
    garbage = pkidir / "garbage.pem"
    assert one_problem(relay, certificate=toml_str(garbage)) == (
        f"certificate: {garbage} is not a PEM X.509 certificate"
    )
    assert one_problem(client, ca=toml_str(garbage)) == (
        f"ca: {garbage} is not a PEM X.509 certificate"
    )
    # a key is not a certificate
    key = pkidir / "relay.key"
    assert one_problem(client, ca=toml_str(key)) == f"ca: {key} is not a PEM X.509 certificate"


def test_truncated_certificate(
    relay: Callable[..., RelayConfig], pkidir: Path, tmp_path: Path
) -> None:
    text = (pkidir / "relay.pem").read_text()
    cut = tmp_path / "cut.pem"
    cut.write_text(text[: len(text) // 2] + text[-30:])
    assert one_problem(relay, certificate=toml_str(cut)) == (
        f"certificate: {cut} is not a PEM X.509 certificate"
    )


def test_huge_file(relay: Callable[..., RelayConfig], tmp_path: Path) -> None:
    big = tmp_path / "big.pem"
    big.write_bytes(b"x" * (config.MAX_PEM_BYTES + 1))
    assert one_problem(relay, certificate=toml_str(big)) == (
        f"certificate: file {big} is too large for a PEM file"
    )


def test_garbage_key(relay: Callable[..., RelayConfig], pkidir: Path) -> None:
    garbage = pkidir / "garbage.pem"
    assert one_problem(relay, private_key=toml_str(garbage)) == (
        f"private_key: {garbage} is not a PEM private key"
    )
    cert = pkidir / "relay.pem"
    assert one_problem(relay, private_key=toml_str(cert)) == (
        f"private_key: {cert} is not a PEM private key"
    )


def test_encrypted_key(relay: Callable[..., RelayConfig], pkidir: Path, tmp_path: Path) -> None:
    key = serialization.load_pem_private_key((pkidir / "relay.key").read_bytes(), password=None)
    enc = tmp_path / "enc.key"
    enc.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    assert one_problem(relay, private_key=toml_str(enc)) == (
        f"private_key: {enc} is encrypted; masqued needs an unencrypted PEM key"
    )


def test_mismatched_key(relay: Callable[..., RelayConfig], pkidir: Path, tmp_path: Path) -> None:
    other = pkidir / "other.key"
    assert one_problem(relay, private_key=toml_str(other)) == (
        f"private_key: {other} does not match certificate {pkidir / 'relay.pem'}"
    )
    # same curve, fresh key, traditional OpenSSL format: still parsed, still refused
    fresh = tmp_path / "fresh.key"
    fresh.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    assert "does not match certificate" in one_problem(relay, private_key=toml_str(fresh))


def test_certificate_chain_file(
    relay: Callable[..., RelayConfig], pkidir: Path, tmp_path: Path
) -> None:
    chain = tmp_path / "chain.pem"
    chain.write_bytes((pkidir / "relay.pem").read_bytes() + (pkidir / "ca.pem").read_bytes())
    assert relay(certificate=toml_str(chain)).certificate == chain
    # the leaf comes first: the CA certificate does not match the relay key
    wrong = tmp_path / "wrong.pem"
    wrong.write_bytes((pkidir / "ca.pem").read_bytes() + (pkidir / "relay.pem").read_bytes())
    assert "does not match" in one_problem(relay, certificate=toml_str(wrong))


# --- other relay keys ---


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('""', "egress: '' is not a valid interface name (1-15 characters)"),
        ('"a-very-long-ifname"', "egress: 'a-very-long-ifname' is not a valid interface name"),
        ('"eth/0"', "egress: 'eth/0' is not a valid interface name (no '/', ':' or spaces)"),
        ('"eth0:1"', "egress: 'eth0:1' is not a valid interface name"),
        ('"eth 0"', "egress: 'eth 0' is not a valid interface name"),
        ('".."', "egress: '..' is not a valid interface name"),
    ],
)
def test_bad_egress(relay: Callable[..., RelayConfig], value: str, expected: str) -> None:
    assert one_problem(relay, egress=value).startswith(expected)


def test_egress_names(relay: Callable[..., RelayConfig]) -> None:
    for name in ("auto", "eth0", "enp0s31f6", "veth-relay.100", "x" * 15):
        assert relay(egress=toml_str(name)).egress == name


@pytest.mark.parametrize("nat", ["auto", "nftables", "iptables", "off"])
def test_nat_modes(relay: Callable[..., RelayConfig], nat: str) -> None:
    assert relay(nat=toml_str(nat)).nat == nat


def test_bad_log_level(client: Callable[..., ClientConfig]) -> None:
    assert one_problem(client, log_level='"verbose"') == (
        'log_level: \'verbose\' is not one of "debug", "info", "warning", "error"'
    )


def test_max_clients(relay: Callable[..., RelayConfig]) -> None:
    assert relay(max_clients="1").max_clients == 1
    assert one_problem(relay, max_clients="0") == "max_clients: 0 is out of range 1..16777216"


def test_workers(relay: Callable[..., RelayConfig]) -> None:
    import os

    assert relay().workers == 1
    assert relay(workers="4").workers == 4
    assert relay(workers='"auto"').workers == min(64, len(os.sched_getaffinity(0)))
    assert (
        one_problem(relay, workers="0")
        == 'workers: expected an integer 1..64 or "auto", got integer 0'
    )
    assert one_problem(relay, workers='"many"').startswith("workers: expected an integer 1..64")
    # Every worker needs a share of each pool network with client addresses in it.
    assert one_problem(relay, workers="32", pool='["198.18.200.0/26"]') == (
        "workers: 32 workers: pool too small: 198.18.200.0/31 has no client addresses"
    )


def test_workers_refuse_fixed_client_addresses(pkidir: Path, write: Callable[..., Path]) -> None:
    text = relay_text(pkidir, workers="2") + (
        '[clients.alice]\naddress = "198.18.200.50"\n[clients.bob]\nacl_default = "allow"\n'
    )
    auto = relay_text(pkidir, workers='"auto"') + '[clients.alice]\naddress = "198.18.200.50"\n'
    cfg = load_config(write(auto, "auto.conf"))
    assert isinstance(cfg, RelayConfig) and cfg.workers == 1  # "auto" settles for one
    with pytest.raises(ConfigError) as exc:
        load_config(write(text, "relay.conf"))
    assert list(exc.value.problems) == [
        "workers: 2 workers but alice has a fixed address: each worker hands out "
        "addresses from its own share of the pool, so fixed addresses need workers = 1"
    ]


# --- client keys ---


@pytest.mark.parametrize(
    ("value", "expected"),
    [('"auto"', None), ('"off"', 0), ("1", 1), ("0xca6c", 0xCA6C), ("4294967295", 2**32 - 1)],
)
def test_fwmark(client: Callable[..., ClientConfig], value: str, expected: int | None) -> None:
    assert client(fwmark=value).fwmark == expected


@pytest.mark.parametrize("value", ["0", "-1", "4294967296"])
def test_fwmark_out_of_range(client: Callable[..., ClientConfig], value: str) -> None:
    assert one_problem(client, fwmark=value) == f"fwmark: {value} is out of range 1..4294967295"


@pytest.mark.parametrize(
    ("relay_addr", "routes"),
    [
        ('"198.18.1.1:443"', '["0.0.0.0/0"]'),
        ('"198.18.1.1"', '["198.18.0.0/15"]'),
        ('"[2001:db8::1]:443"', '["198.19.0.0/24", "::/0"]'),
    ],
)
def test_fwmark_off_with_route_covering_relay_is_a_loop(
    client: Callable[..., ClientConfig], relay_addr: str, routes: str
) -> None:
    msg = one_problem(client, relay=relay_addr, routes=routes, fwmark='"off"', mtu="1280")
    assert msg.startswith("routes: ")
    assert 'would route the relay into the tunnel (routing loop); remove fwmark = "off"' in msg


def test_fwmark_off_without_loop(client: Callable[..., ClientConfig]) -> None:
    # the route does not cover the relay
    assert client(relay='"198.18.1.1"', routes='["198.19.0.0/24"]', fwmark='"off"').fwmark == 0
    # other family
    assert client(relay='"198.18.1.1"', routes='["::/0"]', fwmark='"off"').fwmark == 0
    # a name: cannot know where it resolves; the daemon checks at run time
    assert client(routes='["0.0.0.0/0"]', fwmark='"off"').fwmark == 0
    # marking on: the mark keeps the relay out of the tunnel
    assert client(relay='"198.18.1.1"', routes='["0.0.0.0/0"]').fwmark is None


@pytest.mark.parametrize("value", ["stream", "datagram", "auto"])
def test_transports(client: Callable[..., ClientConfig], value: str) -> None:
    cfg = client(transport=f'"{value}"')
    assert cfg.transport == value
    assert cfg.address_request is False


def test_address_request(client: Callable[..., ClientConfig]) -> None:
    assert client(transport='"datagram"', address_request="true").address_request is True
    assert one_problem(client, address_request='"yes"') == (
        "address_request: expected true or false, got string 'yes'"
    )


def test_bad_transport(client: Callable[..., ClientConfig]) -> None:
    assert one_problem(client, transport='"tcp"') == (
        'transport: \'tcp\' is not one of "stream", "datagram", "auto"'
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"0.0.0.0:8443"', ("0.0.0.0", 8443)),
        ('"[::]:443"', ("::", 443)),
        ('"198.18.1.1"', ("198.18.1.1", 443)),  # the port of listen
        ('"off"', None),
    ],
)
def test_listen_tcp(
    relay: Callable[..., RelayConfig], value: str, expected: tuple[str, int] | None
) -> None:
    assert relay(listen_tcp=value).listen_tcp == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"relay.example:443"', "listen_tcp: 'relay.example' is not an IP address"),
        ('"0.0.0.0:0"', "listen_tcp: '0.0.0.0:0': port 0 is out of range 1..65535"),
        ("443", "listen_tcp: expected a string, got integer 443"),
    ],
)
def test_bad_listen_tcp(relay: Callable[..., RelayConfig], value: str, expected: str) -> None:
    assert one_problem(relay, listen_tcp=value).startswith(expected)


def test_http_version_keys(client: Callable[..., ClientConfig]) -> None:
    cfg = client()
    assert (cfg.http_version, cfg.fallback_after, cfg.h3_retry, cfg.h2_port) == (
        "auto",
        2.0,
        30.0,
        None,
    )
    cfg = client(http_version='"h2"', fallback_after="0.5", h3_retry="5", h2_port="8443")
    assert (cfg.http_version, cfg.fallback_after, cfg.h3_retry, cfg.h2_port) == (
        "h2",
        0.5,
        5.0,
        8443,
    )
    assert client(http_version='"h3"', transport='"stream"').http_version == "h3"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"http_version": '"h1"'}, 'http_version: \'h1\' is not one of "auto", "h3", "h2"'),
        ({"fallback_after": "0"}, "fallback_after: 0 is out of range 0.1..10.0"),
        ({"h3_retry": "0.5"}, "h3_retry: 0.5 is out of range 1.0..3600.0"),
        ({"h2_port": "70000"}, "h2_port: 70000 is out of range 1..65535"),
        (
            {"http_version": '"h2"', "transport": '"stream"'},
            'transport: "stream" needs HTTP/3, and http_version = "h2"',
        ),
    ],
)
def test_bad_http_version_keys(
    client: Callable[..., ClientConfig], overrides: dict[str, str], expected: str
) -> None:
    assert one_problem(client, **overrides).startswith(expected)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("keepalive", "0.1", "keepalive: 0.1 is out of range 0.2..60.0"),
        ("keepalive", "61", "keepalive: 61 is out of range 0.2..60.0"),
        ("keepalive", "nan", "keepalive: nan is out of range 0.2..60.0"),
        ("keepalive", "inf", "keepalive: inf is out of range 0.2..60.0"),
        ("reconnect_max", "0", "reconnect_max: 0 is out of range 0.1..3600.0"),
        ("reconnect_max", "-inf", "reconnect_max: -inf is out of range 0.1..3600.0"),
    ],
)
def test_bad_timers(
    client: Callable[..., ClientConfig], key: str, value: str, expected: str
) -> None:
    assert one_problem(client, **{key: value}) == expected


def test_timer_limits(client: Callable[..., ClientConfig]) -> None:
    cfg = client(keepalive="0.2", reconnect_max="3600")
    assert (cfg.keepalive, cfg.reconnect_max) == (0.2, 3600.0)
    cfg = client(keepalive="60", reconnect_max="0.1")
    assert (cfg.keepalive, cfg.reconnect_max) == (60.0, 0.1)
    assert isinstance(cfg.keepalive, float)


# --- permissions ---


def test_permission_warnings(pkidir: Path, tmp_path: Path) -> None:
    key = tmp_path / "relay.key"
    shutil.copy(pkidir / "relay.key", key)
    conf = tmp_path / "relay.conf"
    conf.write_text(relay_text(pkidir, private_key=toml_str(key)))

    conf.chmod(0o600)
    key.chmod(0o600)
    cfg = load_config(conf)
    assert check_permissions(conf, cfg) == []

    conf.chmod(0o644)
    assert check_permissions(conf, cfg) == [f"{conf}: config file is world-readable (chmod o-r)"]

    conf.chmod(0o640)
    key.chmod(0o644)
    warnings = check_permissions(conf, cfg)
    assert len(warnings) == 1
    assert warnings[0].startswith(f"{key}: private key is world-readable (holding secrets)")

    key.chmod(0o602)
    conf.chmod(0o602)
    warnings = check_permissions(conf, cfg)
    assert warnings == [
        f"{conf}: config file is world-writable; anyone can change it (chmod o-w)",
        f"{key}: private key is world-writable; anyone can change it (chmod o-w)",
    ]


def test_permission_warnings_client(pkidir: Path, tmp_path: Path) -> None:
    conf = tmp_path / "client.conf"
    conf.write_text(client_text(pkidir))
    conf.chmod(0o600)
    cfg = load_config(conf)
    # the CA certificate is public: no warning for it
    (pkidir / "ca.pem").chmod(0o644)
    assert check_permissions(conf, cfg) == []


def test_permission_check_of_vanished_file(
    relay: Callable[..., RelayConfig], tmp_path: Path
) -> None:
    cfg = relay()
    warnings = check_permissions(tmp_path / "gone.conf", cfg)
    assert (
        warnings[0]
        == f"{tmp_path / 'gone.conf'}: cannot check permissions: No such file or directory"
    )


# --- the example configs ---


def example(name: str, pkidir: Path) -> str:
    text = (EXAMPLES / name).read_text()
    assert "/etc/masque/pki/" in text
    return text.replace("/etc/masque/pki/", f"{pkidir}/").replace("/etc/masque/", f"{pkidir}/")


def documented_keys(text: str) -> set[str]:
    return set(re.findall(r"^#? ?([a-z][a-z0-9_]*) = ", text, re.MULTILINE))


def test_example_relay_config(pkidir: Path, write: Callable[..., Path]) -> None:
    text = example("relay.conf", pkidir)
    cfg = load_config(write(text, "relay.conf"))
    assert isinstance(cfg, RelayConfig)
    assert (cfg.listen_host, cfg.listen_port) == ("0.0.0.0", 443)
    assert cfg.pool == (net("198.18.200.0/24"), net("2001:db8:200::/64"))
    assert (cfg.egress, cfg.nat, cfg.mtu) == ("auto", "auto", 1300)
    assert cfg.certificate == pkidir / "relay.pem"
    assert cfg.private_key == pkidir / "relay.key"
    assert documented_keys(text) == set(RELAY_KEYS)


def test_example_client_config(pkidir: Path, write: Callable[..., Path]) -> None:
    text = example("client.conf", pkidir)
    cfg = load_config(write(text, "client.conf"))
    assert isinstance(cfg, ClientConfig)
    assert (cfg.relay_host, cfg.relay_port) == ("relay.example", 443)
    assert cfg.routes == (net("198.19.0.0/24"),)
    assert cfg.ca == pkidir / "ca.pem"
    assert documented_keys(text) == set(CLIENT_KEYS)


PAIRED = {
    "certificate": "private_key",
    "private_key": "certificate",
    # these need the other one, not the other way round
    "dns_search": "dns",
    "kill_switch_allow": "kill_switch",
}


@pytest.mark.parametrize("name", ["relay.conf", "client.conf"])
def test_example_commented_alternatives_parse(
    pkidir: Path, write: Callable[..., Path], name: str
) -> None:
    """Uncommenting any '# key = value' line (replacing the active one) still parses."""
    text = example(name, pkidir)
    lines = text.splitlines()
    alternatives = [i for i, line in enumerate(lines) if re.match(r"^# [a-z][a-z0-9_]* = ", line)]
    assert alternatives
    for i in alternatives:
        key = lines[i][2:].split(" ", 1)[0]
        # a client certificate and its key only make sense together
        keys = {key, PAIRED[key]} if key in PAIRED else {key}
        group = [j for j in alternatives if lines[j][2:].split(" ", 1)[0] in keys]
        variant = [line for line in lines if not any(line.startswith(f"{k} = ") for k in keys)]
        chosen = {lines[j] for j in group if j == i or lines[j][2:].split(" ", 1)[0] != key}
        variant = [line[2:] if line in chosen else line for line in variant]
        cfg = load_config(write("\n".join(variant) + "\n", name))
        assert cfg.mode == name.removesuffix(".conf")


def test_example_full_tunnel(pkidir: Path, write: Callable[..., Path]) -> None:
    text = (
        example("client.conf", pkidir)
        .replace('routes = ["198.19.0.0/24"]', "")
        .replace('# routes = ["0.0.0.0/0", "::/0"]', 'routes = ["0.0.0.0/0", "::/0"]')
    )
    cfg = load_config(write(text, "client.conf"))
    assert isinstance(cfg, ClientConfig)
    assert cfg.full_tunnel
    assert cfg.routes == (net("0.0.0.0/0"), net("::/0"))


def in_documentation_range(n: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    if n.prefixlen == 0 or (n.version == 4 and n.network_address.packed == bytes(4)):
        return True  # default routes and the 0.0.0.0 wildcard
    if n.network_address.is_loopback:
        return True  # local-only endpoints (metrics)
    if isinstance(n, ipaddress.IPv4Network):
        return n.subnet_of(ipaddress.IPv4Network("198.18.0.0/15"))
    return n.subnet_of(ipaddress.IPv6Network("2001:db8::/32")) or n == net("::/128")


def test_example_addresses_are_documentation_ranges() -> None:
    for name in ("relay.conf", "client.conf"):
        text = (EXAMPLES / name).read_text()
        tokens = re.findall(r"\[([0-9a-fA-F:]+)\]|([0-9a-fA-F:.]+/\d+|\d+\.\d+\.\d+\.\d+)", text)
        assert tokens
        for token in (a or b for a, b in tokens):
            assert in_documentation_range(ipaddress.ip_network(token, strict=False)), token


# --- parsers and fuzzing: junk gives ConfigError, never anything else ---


@given(st.text(max_size=60))
def test_parse_network_raises_only_valueerror(text: str) -> None:
    try:
        n = parse_network(text)
    except ValueError:
        return
    assert str(n) == text or ipaddress.ip_network(text) == n


@given(st.text(max_size=60))
def test_parse_host_port_raises_only_valueerror(text: str) -> None:
    try:
        host, port = parse_host_port(text)
    except ValueError:
        return
    assert host
    assert 1 <= port <= 65535


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


SCALARS = (
    st.text(max_size=30)
    | st.sampled_from(
        ["auto", "off", "stream", "relay", "client", "0.0.0.0/0", "::/0", "[::]:443", "a:b:c"]
    )
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats()
    | st.booleans()
)
JUNK = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    mode=st.sampled_from(["relay", "client"]),
    key=st.sampled_from([*sorted(set(RELAY_KEYS + CLIENT_KEYS)), "bogus", ""]),
    value=JUNK,
)
def test_junk_value_gives_config_error(
    pkidir: Path, tmp_path: Path, mode: str, key: str, value: Any
) -> None:
    base = relay_text(pkidir) if mode == "relay" else client_text(pkidir)
    lines = [line for line in base.splitlines() if not line.startswith(f"{key} = ")]
    lines.append(f"{json.dumps(key)} = {toml_value(value)}")
    path = tmp_path / "fuzz.conf"
    path.write_text("\n".join(lines) + "\n")
    try:
        load_config(path)
    except ConfigError as e:
        assert all(line.startswith(f"{path}: ") for line in str(e).splitlines())


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_junk_file_gives_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.conf"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        load_config(path)
    except ConfigError as e:
        assert str(e).startswith(f"{path}: ")


# --- metrics endpoint ---


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"127.0.0.1:9810"', "127.0.0.1:9810"),
        ('"[::1]:9810"', "[::1]:9810"),
        ('"/run/masqued/relay.metrics"', "/run/masqued/relay.metrics"),
    ],
)
def test_metrics_endpoint(
    relay: Callable[..., RelayConfig],
    client: Callable[..., ClientConfig],
    value: str,
    expected: str,
) -> None:
    r = relay(metrics=value)
    assert str(r.metrics) == expected and not r.metrics_per_client
    assert str(client(metrics=value).metrics) == expected


def test_metrics_off_by_default(
    relay: Callable[..., RelayConfig], client: Callable[..., ClientConfig]
) -> None:
    assert relay().metrics is None and client().metrics is None
    assert relay(metrics='"off"').metrics is None


def test_metrics_unix_and_tcp_fields(relay: Callable[..., RelayConfig]) -> None:
    tcp = relay(metrics='"127.0.0.1:9810"').metrics
    assert tcp is not None and (tcp.host, tcp.port, tcp.path) == ("127.0.0.1", 9810, None)
    unix = relay(metrics='"/run/m.sock"', metrics_per_client="true")
    assert unix.metrics is not None and unix.metrics.path == Path("/run/m.sock")
    assert unix.metrics_per_client


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"127.0.0.1"', "missing ':PORT'"),
        ('"localhost:9810"', "use an IP address and port"),
        ('"127.0.0.1:0"', "out of range"),
        ('"relative/path"', "must be absolute"),
        (f'"/{"x" * 120}"', "not a usable unix socket path"),
        ("9810", "expected a string"),
    ],
)
def test_bad_metrics(relay: Callable[..., RelayConfig], value: str, expected: str) -> None:
    assert expected in one_problem(relay, metrics=value)


def test_metrics_per_client_is_relay_only_and_boolean(
    relay: Callable[..., RelayConfig], client: Callable[..., ClientConfig]
) -> None:
    assert "expected true or false" in one_problem(relay, metrics_per_client='"yes"')
    assert "only valid in a relay config" in one_problem(client, metrics_per_client="true")


# -- authentication and per-client policy (issue 6) -----------------------------------------


def test_auth_mtls_and_token(pkidir: Path, write: Callable[..., Path]) -> None:
    text = relay_text(pkidir) + (
        f'auth = ["mtls", "token"]\nclient_ca = {toml_str(pkidir / "ca.pem")}\n'
        f"tokens_file = {toml_str(pkidir / 'relay.tokens')}\n"
        f'crl = {toml_str(pkidir / "crl.pem")}\nrevoked = ["mallory", "serial:ab"]\n'
    )
    cfg = load_config(write(text, "relay.conf"))
    assert isinstance(cfg, RelayConfig)
    assert cfg.auth == ("mtls", "token")
    assert cfg.client_ca == pkidir / "ca.pem" and cfg.crl == pkidir / "crl.pem"
    assert cfg.tokens_file == pkidir / "relay.tokens"
    assert cfg.revoked == ("mallory", "serial:ab")


def test_auth_defaults_to_none(pkidir: Path, write: Callable[..., Path]) -> None:
    cfg = load_config(write(relay_text(pkidir), "relay.conf"))
    assert isinstance(cfg, RelayConfig) and cfg.auth == ()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('auth = "mtsl"', "unknown method 'mtsl' (did you mean 'mtls'?)"),
        ('auth = "mtls"', "client_ca: required with auth = mtls"),
        ('auth = "token"', "tokens_file: required with auth = token"),
        ('auth = ["none", "mtls"]', '"none" cannot be combined'),
        ("auth = 3", "auth: expected"),
        ('auth = "token"\ntokens_file = "{pki}/garbage.pem"', "tokens_file: "),
        (
            'auth = "mtls"\nclient_ca = "{pki}/ca.pem"\ncrl = "{pki}/garbage.pem"',
            "not a PEM or DER",
        ),
        ('auth = "mtls"\nclient_ca = "{pki}/other.pem"\ncrl = "{pki}/crl.pem"', "not signed by"),
        ('auth = "mtls"\nclient_ca = "{pki}/ca.pem"\nrevoked = "alice"', "revoked: expected"),
    ],
)
def test_auth_errors(pkidir: Path, write: Callable[..., Path], extra: str, message: str) -> None:
    text = relay_text(pkidir) + extra.replace("{pki}", str(pkidir)) + "\n"
    with pytest.raises(ConfigError) as exc:
        load_config(write(text, "relay.conf"))
    assert message in str(exc.value)


def test_clients_tables_and_dir(pkidir: Path, write: Callable[..., Path]) -> None:
    text = relay_text(pkidir) + (
        'acl_default = "deny"\n'
        f"clients_dir = {toml_str(pkidir / 'relay.clients.d')}\n"
        "[clients.alice]\n"
        'address = ["198.18.200.50", "2001:db8:200::50"]\n'
        'acl = ["allow 198.19.0.2/32 tcp 8080"]\n'
        "[clients.carol]\n"
        'acl_default = "allow"\n'
    )
    cfg = load_config(write(text, "relay.conf"))
    assert isinstance(cfg, RelayConfig)
    assert set(cfg.clients) == {"alice", "bob", "carol"}
    alice = cfg.clients["alice"]
    assert [str(a) for a in alice.addresses] == ["198.18.200.50", "2001:db8:200::50"]
    assert not alice.acl.default_allow and str(alice.acl.rules[0]) == "allow 198.19.0.2/32 tcp 8080"
    assert cfg.clients["carol"].acl.default_allow


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('[clients.a]\nadress = "198.18.200.9"', "invalid key 'adress' (did you mean 'address'?)"),
        ('[clients.a]\naddress = "198.18.201.9"', "is not inside the pool"),
        ('[clients.a]\naddress = "198.18.200.1"', "gateway"),
        ('[clients.a]\naddress = "nope"', "is not an IP address"),
        ('[clients.a]\naddress = ["198.18.200.9", "198.18.200.10"]', "more than one IPv4"),
        (
            '[clients.a]\naddress = "198.18.200.9"\n[clients.b]\naddress = "198.18.200.9"',
            "also given to a",
        ),
        ('[clients.a]\nacl = ["allow 198.19.0.0/24"]', "set acl_default"),
        ('[clients.a]\nacl = ["alow 198.19.0.0/24"]\nacl_default = "deny"', "action must be"),
        ('[clients.a]\nacl_default = "maybe"', "acl_default: expected"),
        ('[clients."bad name"]', "invalid client name"),
    ],
)
def test_client_policy_errors(
    pkidir: Path, write: Callable[..., Path], table: str, message: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(relay_text(pkidir) + table + "\n", "relay.conf"))
    assert message in str(exc.value)


def test_client_credentials(pkidir: Path, write: Callable[..., Path]) -> None:
    base = example("client.conf", pkidir)
    text = base + (
        f"certificate = {toml_str(pkidir / 'alice.pem')}\n"
        f"private_key = {toml_str(pkidir / 'alice.key')}\n"
        f"token_file = {toml_str(pkidir / 'client.token')}\n"
    )
    cfg = load_config(write(text, "client.conf"))
    assert isinstance(cfg, ClientConfig)
    assert cfg.certificate == pkidir / "alice.pem" and cfg.token_file == pkidir / "client.token"
    bad = base + (
        f"certificate = {toml_str(pkidir / 'alice.pem')}\n"
        f"private_key = {toml_str(pkidir / 'relay.key')}\n"
        f"token_file = {toml_str(pkidir / 'garbage.pem')}\n"
    )
    with pytest.raises(ConfigError) as exc:
        load_config(write(bad, "client.conf"))
    assert "does not match certificate" in str(exc.value)
    assert "does not hold a token" in str(exc.value)


# -- issue 20: DNS, kill switch, hooks -------------------------------------------------------


def test_client_dns_kill_switch_and_hooks(client: Callable[..., ClientConfig]) -> None:
    cfg = client(
        dns='["198.19.0.53", "2001:db8:19::53"]',
        dns_search='["Corp.Example."]',
        kill_switch="true",
        kill_switch_allow='["198.18.1.0/24"]',
        pre_up='"echo %i"',
        post_down='["a", "b"]',
        hook_timeout="5",
    )
    host = cfg.host
    assert [str(a) for a in host.dns] == ["198.19.0.53", "2001:db8:19::53"]
    assert host.dns_search == ("corp.example",) and not host.dns_from_relay
    assert host.kill_switch and [str(n) for n in host.kill_switch_allow] == ["198.18.1.0/24"]
    assert host.hooks.pre_up == ("echo %i",) and host.hooks.post_down == ("a", "b")
    assert host.hooks.timeout == 5.0 and host.dns_backend == "auto"
    assert client(dns='"relay"').host.dns_from_relay
    assert not client().host.dns and not client().host.hooks


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"dns": "[]"}, "dns: must not be empty"),
        ({"dns": '"8.8.8.8"'}, 'expected an array of IP addresses or "relay"'),
        ({"dns": '["resolver.example"]'}, "is not an IP address"),
        ({"dns": '["198.19.0.53", "198.19.0.53"]'}, "listed twice"),
        ({"dns": '["0.0.0.0"]'}, "cannot be a resolver"),
        ({"dns_search": '["corp.example"]'}, "dns_search: needs dns"),
        ({"dns": '["198.19.0.53"]', "dns_search": '["bad name"]'}, "not a domain name"),
        ({"dns": '["198.19.0.53"]', "dns_backend": '"nm"'}, "is not one of"),
        ({"kill_switch_allow": '["198.18.1.0/24"]'}, "has no effect without kill_switch"),
        ({"kill_switch": "true", "fwmark": '"off"'}, "kill_switch: needs the fwmark"),
        ({"pre_up": "[1]"}, "expected a string or an array of strings"),
        ({"pre_up": '"  "'}, "is not a command"),
        ({"hook_timeout": "0"}, "out of range"),
    ],
)
def test_client_dns_and_hook_errors(
    pkidir: Path, write: Callable[[str], Path], overrides: dict[str, str], problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_config(write(client_text(pkidir, **overrides)))


def test_relay_dns(
    relay: Callable[..., RelayConfig], pkidir: Path, write: Callable[[str], Path]
) -> None:
    cfg = relay(dns='["198.19.0.53"]', dns_search='["corp.example"]')
    assert [str(a) for a in cfg.dns] == ["198.19.0.53"] and cfg.dns_search == ("corp.example",)
    with pytest.raises(ConfigError, match="dns_search: needs dns"):
        load_config(write(relay_text(pkidir, dns_search='["corp.example"]')))


# --- quic_engine, event_loop ---


def test_quic_engine_and_event_loop(
    relay: Callable[..., RelayConfig], client: Callable[..., ClientConfig]
) -> None:
    assert (relay().quic_engine, relay().event_loop) == ("aioquic", "asyncio")
    cfg = relay(quic_engine='"qh3"', event_loop='"uvloop"')
    assert (cfg.quic_engine, cfg.event_loop) == ("qh3", "uvloop")
    cfg2 = client(quic_engine='"qh3"', event_loop='"uvloop"')
    assert (cfg2.quic_engine, cfg2.event_loop) == ("qh3", "uvloop")
    assert problems(relay, quic_engine='"quiche"') == [
        'quic_engine: \'quiche\' is not one of "aioquic", "qh3"'
    ]
    assert problems(client, event_loop='"trio"') == [
        'event_loop: \'trio\' is not one of "asyncio", "uvloop"'
    ]


def test_a_qh3_relay_refuses_mtls(relay: Callable[..., RelayConfig], pkidir: Path) -> None:
    (problem,) = problems(
        relay,
        quic_engine='"qh3"',
        auth='["mtls"]',
        client_ca=toml_str(pkidir / "ca.pem"),
    )
    assert problem.startswith("quic_engine:") and "mtls" in problem
