"""What status and doctor say about the client's DNS and kill switch (issue 20)."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from masqued.config import ClientConfig
from masqued.config.host import ClientHost
from masqued.doctor import check_dns, check_kill_switch
from masqued.observe.status import render_text
from tests.unit.test_status import SCHEMA

BASE = ClientConfig(
    name="c1",
    path=Path("/etc/masque/c1.conf"),
    relay_host="198.18.1.1",
    relay_port=443,
    server_name="relay.example",
    ca=Path("/etc/masque/ca.pem"),
    routes=(ipaddress.ip_network("198.19.0.0/24"),),
)
R = ipaddress.ip_address("198.19.0.53")


def config(**host: Any) -> ClientConfig:
    return dataclasses.replace(BASE, host=ClientHost(**host))


def applied(**extra: Any) -> dict[str, Any]:
    return {
        "dns": {
            "configured": ["198.19.0.53"],
            "state": "applied",
            "backend": "resolved",
            "why": "systemd-resolved manages /etc/resolv.conf",
            "source": "config",
            "servers": ["198.19.0.53"],
            "search": ["corp.example"],
            "all_names": False,
            "error": None,
            **extra,
        },
        "kill_switch": {"enabled": True, "installed": True, "table": "inet masqued_c1"},
    }


def never(*args: object) -> str | None:
    raise AssertionError("no live check expected")


def test_dns_that_took_is_ok_and_one_that_did_not_is_explained() -> None:
    (f,) = check_dns(config(dns=(R,)), applied(), lambda kind, tun, servers: None, "mq-c1")
    assert f.level == "ok" and "198.19.0.53 through resolved" in f.message
    (f,) = check_dns(
        config(dns=(R,)),
        applied(),
        lambda kind, tun, servers: "systemd-resolved is not running",
        "mq-c1",
    )
    assert f.level == "fail" and "not in use: systemd-resolved is not running" in f.message
    assert "systemctl enable --now systemd-resolved" in f.fix
    failed = applied(state="failed", error="resolvectl dns mq-c1 failed: Link not known")
    (f,) = check_dns(config(dns=(R,)), failed, never, "mq-c1")
    assert f.level == "fail" and "Link not known" in f.message


def test_dns_advice() -> None:
    full = dataclasses.replace(config(), routes=(ipaddress.ip_network("0.0.0.0/0"),))
    (f,) = check_dns(full, None, never, "mq-c1")
    assert f.level == "warn" and "outside the tunnel" in f.message
    (f,) = check_dns(config(), None, never, "mq-c1")
    assert f.level == "ok"
    waiting = {"dns": {"configured": "relay", "state": "waiting", "source": "relay"}}
    (f,) = check_dns(config(dns_from_relay=True), waiting, never, "mq-c1")
    assert f.level == "warn" and "names no resolvers" in f.message
    outside = applied(servers=["198.18.9.9"])
    found = check_dns(config(dns=(R,)), outside, lambda *a: None, "mq-c1")
    assert [x.level for x in found] == ["ok", "warn"]
    found = check_dns(config(dns=(R,), kill_switch=True), outside, lambda *a: None, "mq-c1")
    assert found[-1].level == "fail" and "kill switch drops" in found[-1].message


def test_kill_switch_check() -> None:
    assert check_kill_switch(config(), applied()) == []
    (f,) = check_kill_switch(config(kill_switch=True), applied())
    assert f.level == "ok"
    gone = {"kill_switch": {"enabled": True, "installed": False, "table": "inet masqued_c1"}}
    (f,) = check_kill_switch(config(kill_switch=True), gone)
    assert f.level == "fail"


def test_status_schema_and_text_show_dns_and_kill_switch() -> None:
    doc: dict[str, Any] = {
        "schema_version": 1,
        "instance": "c1",
        "role": "client",
        "pid": 1,
        "masqued_version": "0",
        "config": "/etc/masque/c1.conf",
        "time": 10.0,
        "started": 1.0,
        "uptime": 9.0,
        "state": "connected",
        "relay": "198.18.1.1:443",
        "server_name": "relay.example",
        "tun": {"name": "mq-c1", "mtu": 1300},
        "routes": ["198.19.0.0/24"],
        "fwmark": 1,
        "sessions": [],

        **applied(),
    }
    doc["kill_switch"].update(allow=["198.18.1.0/24"], relay_ports=["udp/443"])
    # The new parts against the schema (the rest of a document is tested elsewhere).
    jsonschema.validate(doc, {**SCHEMA, "required": []})
    bad = {**doc, "dns": {**doc["dns"], "state": "maybe"}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, {**SCHEMA, "required": []})
    text = render_text(doc)
    assert "dns: applied via resolved: 198.19.0.53 (search corp.example)" in text
    assert "kill switch: installed (inet masqued_c1), allows 198.18.1.0/24" in text
