"""Recording and restoring the sysctls start changed (masqued.host.sysctl), on a fake /proc/sys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from masqued.host.cleanup import cleanup_instance
from masqued.host.naming import InstanceIds
from masqued.host.routes import FakeNetlink, enable_forwarding
from masqued.host.sysctl import SysctlRecord, key_path


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    root = tmp_path / "proc-sys"
    interfaces = {"ipv4": ("eth0", "eth1", "mq-r"), "ipv6": ("eth0", "eth1")}
    for fam, names in interfaces.items():
        names = ("all", "default", *names)
        for name in names:
            d = root / "net" / fam / "conf" / name
            d.mkdir(parents=True)
            (d / "forwarding").write_text("0\n")
    (root / "net/ipv6/conf/eth1/forwarding").write_text("1\n")  # set by the operator
    return root


def value(root: Path, key: str) -> str:
    return key_path(key, root).read_text().strip()


def set_ipv6_all(root: Path, v: str) -> None:
    """What the kernel does on a write to net.ipv6.conf.all.forwarding."""
    for d in (root / "net/ipv6/conf").iterdir():
        (d / "forwarding").write_text(v + "\n")


class KernelRecord(SysctlRecord):
    """A record whose writes of IPv6 "all" behave like the kernel's."""

    def set(self, key: str, v: str) -> bool:
        changed = super().set(key, v)
        if changed and key == "net.ipv6.conf.all.forwarding":
            set_ipv6_all(self.root, v)
        return changed


def test_key_path_keeps_dotted_interface_names(proc: Path) -> None:
    assert key_path("net.ipv4.conf.eth0.100.forwarding", proc) == (
        proc / "net/ipv4/conf/eth0.100/forwarding"
    )


def test_restore_puts_back_what_start_changed(proc: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    rec = KernelRecord("relay", run, proc)
    changed = enable_forwarding(["mq-r", "eth0"], v4=True, v6=True, root=proc, record=rec)
    assert changed == [
        "net.ipv4.conf.mq-r.forwarding=1",
        "net.ipv4.conf.eth0.forwarding=1",
        "net.ipv6.conf.all.forwarding=1",
    ]
    assert value(proc, "net.ipv4.conf.eth0.forwarding") == "1"
    assert value(proc, "net.ipv6.conf.eth0.forwarding") == "1"
    doc = json.loads((run / "relay/sysctl.json").read_text())
    assert doc["pid"] == os.getpid()
    # A fresh record (what `masqued cleanup` makes) restores from the file alone.
    done = SysctlRecord("relay", run, proc).restore()
    assert "sysctl -q net.ipv4.conf.eth0.forwarding=0" in done
    assert "sysctl -q net.ipv6.conf.all.forwarding=0" in done
    for key in ("net.ipv4.conf.eth0.forwarding", "net.ipv6.conf.all.forwarding"):
        assert value(proc, key) == "0"
    # Writing "all" set every interface's IPv6 forwarding: each is back to its own
    # value, the one the operator had on (eth1) included.
    assert value(proc, "net.ipv6.conf.eth0.forwarding") == "0"
    assert value(proc, "net.ipv6.conf.default.forwarding") == "0"
    assert value(proc, "net.ipv6.conf.eth1.forwarding") == "1"
    assert not (run / "relay").exists()
    assert SysctlRecord("relay", run, proc).restore() == []  # once only


def test_nothing_restored_that_was_already_on(proc: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    (proc / "net/ipv4/conf/eth0/forwarding").write_text("1\n")
    assert enable_forwarding(["eth0"], True, False, proc, SysctlRecord("r", run, proc)) == []
    assert SysctlRecord("r", run, proc).restore() == []
    assert value(proc, "net.ipv4.conf.eth0.forwarding") == "1"


def test_vanished_interface_is_skipped(proc: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    enable_forwarding(["mq-r"], True, False, proc, SysctlRecord("r", run, proc))
    (proc / "net/ipv4/conf/mq-r/forwarding").unlink()  # the TUN was deleted first
    assert SysctlRecord("r", run, proc).restore() == []


def _other_instance(run: Path, proc: Path) -> subprocess.Popen[str]:
    """Another running instance ``b`` that switched eth0 on (its own process)."""
    code = (
        "import sys; from pathlib import Path; from masqued.host.sysctl import SysctlRecord\n"
        "SysctlRecord('b', Path(sys.argv[1]), Path(sys.argv[2])).set("
        "'net.ipv4.conf.eth0.forwarding', '1')\n"
        "print('ready', flush=True); sys.stdin.read()\n"
    )
    proc_b = subprocess.Popen(
        [sys.executable, "-c", code, str(run), str(proc)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc_b.stdout is not None and proc_b.stdout.readline().strip() == "ready"
    return proc_b


def test_shared_sysctl_is_restored_by_the_last_instance(proc: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    b = _other_instance(run, proc)  # b switched eth0 on (its record: it was 0)
    try:
        # a (this process) starts second: eth0 is on already; a takes over b's record
        # of the original value.
        a = SysctlRecord("a", run, proc)
        assert enable_forwarding(["eth0"], True, False, proc, a) == []
    finally:
        assert b.stdin is not None
        b.stdin.close()
        b.wait(10)
    # b stops first: its cleanup leaves eth0 on, a still needs it.
    assert SysctlRecord("b", run, proc).restore() == []
    assert value(proc, "net.ipv4.conf.eth0.forwarding") == "1"
    # a stops last: eth0 goes back to what it was before b.
    assert a.restore() == ["sysctl -q net.ipv4.conf.eth0.forwarding=0"]
    assert value(proc, "net.ipv4.conf.eth0.forwarding") == "0"


def test_running_instance_keeps_a_shared_sysctl_on(proc: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    # a switches eth0 on and stays running (this test process); b needs it too.
    a = SysctlRecord("a", run, proc)
    assert a.set("net.ipv4.conf.eth0.forwarding", "1")
    b = _other_instance(run, proc)  # finds it on, takes over a's original
    try:
        assert a.restore() == []  # b is running and needs it
        assert value(proc, "net.ipv4.conf.eth0.forwarding") == "1"
    finally:
        assert b.stdin is not None
        b.stdin.close()
        b.wait(10)
    # b is gone without cleanup (a crash): its record restores the original value.
    assert SysctlRecord("b", run, proc).restore() == ["sysctl -q net.ipv4.conf.eth0.forwarding=0"]


def test_cleanup_instance_restores_last(proc: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    ids = InstanceIds("relay")
    enable_forwarding(["eth0"], True, False, proc, SysctlRecord("relay", run, proc))
    done = cleanup_instance(
        ids, FakeNetlink(), nat_cleanup=lambda ids: [], sysctls=SysctlRecord("relay", run, proc)
    )
    assert done == ["sysctl -q net.ipv4.conf.eth0.forwarding=0"]
