"""Issue 14: any config text is either a config or a ConfigError naming the file and
the key, never a bare exception (Hypothesis over generated relay and client configs,
plus the cases a review found)."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from masqued.config import CLIENT_KEYS, RELAY_KEYS, ConfigError, load_config
from masqued.gate import pki
from masqued.gate.policy import PolicyError, parse_rule

# Characters that have tripped parsers: digits int() accepts but str.isdigit() also
# claims (or the reverse), NUL, separators, a BOM, fullwidth forms.
ODD = ["²", "¹²", "٣", "٨٠", "\uff18\uff10", "\U0001d7d9", "\x00", "\u2028", "\ufeff", "\x7f"]
ODD += ["\t", " ", "/", ".."]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cfg")
    pki.init_ca(d)
    pki.issue(d, "relay.example", "relay")
    pki.issue(d, "alice", "client")
    (d / "token").write_text("alice.secret\n")
    (d / "clients").mkdir()
    return d


def words(d: Path) -> st.SearchStrategy[str]:
    """Plausible values, mutated with the odd characters."""
    plain = st.sampled_from(
        [
            "198.19.0.0/24",
            "2001:db8:19::/64",
            "198.18.200.50",
            "allow 198.19.0.0/24 tcp 80",
            "deny 2001:db8:19::/64 udp 53,5000-5010",
            "allow 0.0.0.0/0 icmp",
            "relay.example",
            "0.0.0.0:443",
            "[::1]:9810",
            "auto",
            "off",
            "none",
            "mtls",
            "token",
            "allow",
            "deny",
            "eth0",
            "serial:1f",
            "clients",
            "token",
            "ca.pem",
        ]
    )

    def mutate(text: str, data: Any) -> str:
        how = data.draw(st.integers(0, 3))
        if how == 0:
            return text
        odd = data.draw(st.sampled_from(ODD))
        if how == 1:
            i = data.draw(st.integers(0, len(text)))
            return text[:i] + odd + text[i:]
        parts = text.split(" ")
        parts[data.draw(st.integers(0, len(parts) - 1))] = odd
        return " ".join(parts)

    return st.one_of(
        st.builds(mutate, plain, st.data()), st.text(max_size=12), st.sampled_from(ODD)
    )


def values(d: Path) -> st.SearchStrategy[Any]:
    text = words(d)
    scalar = st.one_of(
        text,
        text,
        text,
        st.integers(-(2**63), 2**63 - 1),
        st.sampled_from([0, 1, 443, 1300, 65535, 65536, 70000]),
        st.booleans(),
        st.floats(allow_nan=True),
    )
    client = st.dictionaries(
        st.sampled_from(["address", "acl", "acl_default", "other"]),
        st.one_of(scalar, st.lists(text, max_size=3)),
        max_size=3,
    )
    return st.one_of(
        scalar,
        st.lists(text, max_size=4),
        st.lists(scalar, max_size=4),
        st.dictionaries(st.sampled_from(["alice", "bob", "b²", "x y"]), client, max_size=2),
    )


def toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        body = "".join(
            c if c.isprintable() and c not in '"\\' else f"\\U{ord(c):08x}" for c in value
        )
        return f'"{body}"'
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{toml(k)} = {toml(v)}" for k, v in value.items()) + "}"


BASE = {
    "relay": {"certificate": "relay.example.pem", "private_key": "relay.example.key",
              "pool": ["198.18.200.0/24", "2001:db8:200::/64"]},
    "client": {"relay": "198.18.1.1:443", "ca": "ca.pem", "routes": ["198.19.0.0/24"]},
}  # fmt: skip


@settings(
    max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_config_text_loads_or_is_a_config_error(files: Path, data: Any) -> None:
    mode = data.draw(st.sampled_from(["relay", "client"]))
    keys = RELAY_KEYS if mode == "relay" else CLIENT_KEYS
    doc: dict[str, Any] = dict(BASE[mode])
    doc.update(data.draw(st.dictionaries(st.sampled_from(keys), values(files), max_size=4)))
    doc["mode"] = mode
    text = "".join(f"{toml(k)} = {toml(v)}\n" for k, v in doc.items())
    tomllib.loads(text)  # the generator writes valid TOML
    path = files / "t.conf"
    path.write_text(text)
    try:
        load_config(path, "t")
    except ConfigError as exc:
        assert exc.problems and all(exc.problems) and str(exc).startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ('acl_default = "deny"\n[clients.a]\nacl = ["allow 198.19.0.0/24 ²"]\n', "protocol"),
        ('acl_default = "deny"\n[clients.a]\nacl = ["allow 198.19.0.0/24 ¹²"]\n', "protocol"),
        ('acl_default = "deny"\n[clients.a]\nacl = ["allow 198.19.0.0/24 udp ٨٠"]\n', "port"),
        ('clients_dir = "a\\u0000b"\n', "clients_dir"),
        ('state_dir = "a\\u0000b"\n', "state_dir"),
        ('egress = "eth\\u0000"\n', "egress"),
    ],
)
def test_review_cases_are_config_errors(files: Path, extra: str, words: str) -> None:
    path = files / "r.conf"
    path.write_text(
        'mode = "relay"\ncertificate = "relay.example.pem"\nprivate_key = "relay.example.key"\n'
        'pool = ["198.18.200.0/24"]\n' + extra
    )
    with pytest.raises(ConfigError) as exc:
        load_config(path, "r")
    assert str(exc.value).startswith(f"{path}: ") and words in str(exc.value), str(exc.value)


def test_a_clients_dir_file_with_a_bad_rule_is_a_config_error(files: Path) -> None:
    (files / "clients" / "bob.conf").write_text(
        'acl = ["allow 198.19.0.0/24 ²"]\nacl_default = "deny"\n'
    )
    path = files / "d.conf"
    path.write_text(
        'mode = "relay"\ncertificate = "relay.example.pem"\nprivate_key = "relay.example.key"\n'
        'pool = ["198.18.200.0/24"]\nclients_dir = "clients"\n'
    )
    try:
        with pytest.raises(ConfigError, match=r"bob\.conf: acl: .*protocol"):
            load_config(path, "d")
    finally:
        (files / "clients" / "bob.conf").unlink()


@pytest.mark.parametrize(
    "rule", ["allow 198.19.0.0/24 ²", "allow 198.19.0.0/24 tcp \u0668\u0660,8\uff10"]
)
def test_rules_take_ascii_numbers_only(rule: str) -> None:
    with pytest.raises(PolicyError):
        parse_rule(rule)
