"""The client's resolver configuration (masqued.host.resolver), in temporary files and
with recorded commands: never this machine's /etc/resolv.conf."""

from __future__ import annotations

import ipaddress
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from masqued.host import resolver
from masqued.host.naming import InstanceIds
from masqued.host.resolver import (
    FileBackend,
    ResolvconfBackend,
    ResolvedBackend,
    ResolverConfig,
    ResolverError,
    cleanup_resolver,
)

IDS = InstanceIds("c1")
ORIGINAL = b"# from DHCP\nnameserver 198.18.1.1\nsearch lan.example\n"
CONFIG = ResolverConfig(
    servers=(ipaddress.ip_address("198.19.0.53"), ipaddress.ip_address("2001:db8:19::53")),
    search=("corp.example",),
    all_names=True,
)


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    path = tmp_path / "etc" / "resolv.conf"
    path.parent.mkdir()
    path.write_bytes(ORIGINAL)
    return path


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


def test_file_backend_writes_in_place_and_restores_byte_for_byte(conf: Path, run_dir: Path) -> None:
    inode = conf.stat().st_ino
    backend = FileBackend(IDS, run_dir, conf)
    backend.apply(CONFIG)
    text = conf.read_text()
    assert text.startswith("# masqued:c1 ")
    assert "nameserver 198.19.0.53\nnameserver 2001:db8:19::53\nsearch corp.example\n" in text
    assert conf.stat().st_ino == inode  # a bind mount over /etc/resolv.conf stays valid
    assert (run_dir / "c1" / "resolv.conf.orig").read_bytes() == ORIGINAL
    # Applied again (the relay changed its resolvers): the backup is still the original.
    backend.apply(ResolverConfig(servers=(ipaddress.ip_address("198.19.0.54"),)))
    assert "198.19.0.54" in conf.read_text()
    assert (run_dir / "c1" / "resolv.conf.orig").read_bytes() == ORIGINAL
    assert backend.remove() == [f"restore {conf}"]
    assert conf.read_bytes() == ORIGINAL
    assert conf.stat().st_ino == inode
    assert not (run_dir / "c1").joinpath("resolv.conf.orig").exists()
    assert not (run_dir / "c1").joinpath("dns.json").exists()
    assert backend.remove() == []  # idempotent


def test_after_a_crash_cleanup_restores_from_the_record(conf: Path, run_dir: Path) -> None:
    FileBackend(IDS, run_dir, conf).apply(CONFIG)  # and the process dies
    assert cleanup_resolver(IDS, run_dir) == [f"restore {conf}"]
    assert conf.read_bytes() == ORIGINAL
    assert cleanup_resolver(IDS, run_dir) == []
    assert cleanup_resolver(InstanceIds("other"), run_dir) == []


def test_a_file_someone_rewrote_since_is_left_alone(conf: Path, run_dir: Path) -> None:
    FileBackend(IDS, run_dir, conf).apply(CONFIG)
    conf.write_bytes(b"nameserver 198.18.9.9\n")  # NetworkManager, say
    assert cleanup_resolver(IDS, run_dir) == []
    assert conf.read_bytes() == b"nameserver 198.18.9.9\n"
    assert not (run_dir / "c1" / "dns.json").exists()


def test_a_symlink_comes_back_as_the_same_symlink(tmp_path: Path, run_dir: Path) -> None:
    target = tmp_path / "stub-resolv.conf"
    target.write_bytes(ORIGINAL)
    link = tmp_path / "resolv.conf"
    link.symlink_to(target)
    FileBackend(IDS, run_dir, link).apply(CONFIG)
    assert not link.is_symlink() and "198.19.0.53" in link.read_text()
    assert target.read_bytes() == ORIGINAL  # the link's target was not written
    cleanup_resolver(IDS, run_dir)
    assert link.is_symlink() and os.readlink(link) == str(target)


def test_a_missing_file_is_removed_again(tmp_path: Path, run_dir: Path) -> None:
    path = tmp_path / "resolv.conf"
    FileBackend(IDS, run_dir, path).apply(CONFIG)
    assert "198.19.0.53" in path.read_text()
    cleanup_resolver(IDS, run_dir)
    assert not path.exists()


def test_resolv_conf_keeps_at_most_three_nameservers() -> None:
    many = ResolverConfig(servers=tuple(ipaddress.ip_address(f"198.19.0.{i}") for i in range(5)))
    assert many.resolv_conf("#").count("nameserver") == 3


class Recorder:
    def __init__(self, fail: str = "") -> None:
        self.calls: list[tuple[list[str], str | None]] = []
        self.fail = fail

    def __call__(self, cmd: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
        self.calls.append((list(cmd), stdin))
        code = 1 if self.fail and self.fail in cmd else 0
        return subprocess.CompletedProcess(
            list(cmd), code, "", "Link mq-c1 not known" if code else ""
        )


def test_resolved_sets_dns_domains_and_default_route(run_dir: Path) -> None:
    rec = Recorder()
    ResolvedBackend(IDS, run_dir, rec).apply(CONFIG)
    assert [c for c, _ in rec.calls] == [
        ["resolvectl", "dns", "mq-c1", "198.19.0.53", "2001:db8:19::53"],
        ["resolvectl", "domain", "mq-c1", "corp.example", "~."],
        ["resolvectl", "default-route", "mq-c1", "yes"],
    ]
    split = ResolverConfig(servers=CONFIG.servers, search=("corp.example",), domains=("lab",))
    rec.calls.clear()
    ResolvedBackend(IDS, run_dir, rec).apply(split)
    assert rec.calls[1][0] == ["resolvectl", "domain", "mq-c1", "corp.example", "~lab"]
    assert rec.calls[2][0][-1] == "no"
    with pytest.raises(ResolverError, match="not known"):
        ResolvedBackend(IDS, run_dir, Recorder(fail="dns")).apply(CONFIG)


def test_resolvconf_adds_and_deletes_its_record(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(resolver, "RESOLVCONF_ORDER", tmp_path / "absent")
    rec = Recorder()
    backend = ResolvconfBackend(IDS, run_dir, rec)
    backend.apply(CONFIG)
    cmd, stdin = rec.calls[0]
    assert cmd == ["resolvconf", "-a", "mq-c1", "-m", "0", "-x"]
    assert stdin is not None and "nameserver 198.19.0.53\n" in stdin
    backend.remove()
    assert rec.calls[1][0] == ["resolvconf", "-d", "mq-c1", "-f"]
    order = tmp_path / "interface-order"
    order.write_text("tun*\n")
    monkeypatch.setattr(resolver, "RESOLVCONF_ORDER", order)
    assert ResolvconfBackend(IDS, run_dir, rec).iface == "tun.mq-c1"  # Debian's resolvconf


def test_auto_prefers_resolved_then_resolvconf_then_the_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(resolver, "resolved_manages", lambda: None)
    assert resolver.choose("auto")[0] == "resolved"
    monkeypatch.setattr(resolver, "resolved_manages", lambda: "systemd-resolved is not running")
    monkeypatch.setattr(resolver.shutil, "which", lambda name: "/sbin/resolvconf")
    assert resolver.choose("auto")[0] == "resolvconf"
    monkeypatch.setattr(resolver.shutil, "which", lambda name: None)
    kind, why = resolver.choose("auto")
    assert kind == "file" and "not running" in why
    assert resolver.choose("resolved") == ("resolved", "configured")


def test_resolved_is_only_in_charge_when_resolv_conf_points_at_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "systemd-resolve"
    run.mkdir()
    (run / "io.systemd.Resolve").touch()
    monkeypatch.setattr(resolver, "RESOLVED_RUN", run)
    monkeypatch.setattr(resolver.shutil, "which", lambda name: "/usr/bin/resolvectl")
    monkeypatch.setattr(resolver, "same_netns_as_init", lambda: True)
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 198.18.1.1\n")
    assert "does not point" in str(resolver.resolved_manages(conf))
    conf.write_text("nameserver 127.0.0.53\noptions edns0 trust-ad\n")
    assert resolver.resolved_manages(conf) is None
    monkeypatch.setattr(resolver, "same_netns_as_init", lambda: False)
    assert "network namespace" in str(resolver.resolved_manages(conf))


def test_check_reads_what_the_host_uses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "resolv.conf"
    monkeypatch.setattr(resolver, "RESOLV_CONF", conf)
    conf.write_text("nameserver 198.19.0.53\n")
    assert resolver.check("file", "mq-c1", CONFIG.servers) is None
    conf.write_text("nameserver 198.18.1.1\n")
    problem = resolver.check("resolvconf", "mq-c1", CONFIG.servers)
    assert problem is not None and "198.18.1.1" in problem and "resolvconf" in problem


def test_the_hosts_own_nameservers_behind_resolveds_stub(tmp_path: Path) -> None:
    from masqued.runtime.client import host_nameservers

    conf, upstream = tmp_path / "resolv.conf", tmp_path / "upstream.conf"
    conf.write_text("nameserver 198.18.1.1\nnameserver bogus\nnameserver 2001:db8:1::1\n")
    assert host_nameservers(conf, upstream) == ("198.18.1.1", "2001:db8:1::1")
    conf.write_text("nameserver 127.0.0.53\noptions edns0\n")
    upstream.write_text("# resolved's upstream servers\nnameserver 198.18.1.53\n")
    assert host_nameservers(conf, upstream) == ("198.18.1.53",)
    assert host_nameservers(tmp_path / "absent", upstream) == ()
