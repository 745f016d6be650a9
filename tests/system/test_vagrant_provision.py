"""The Vagrant lab rehearsed without a hypervisor (CI has none).

Booted Debian 12 containers stand in for the Vagrantfile's VMs: one per VM, each in the
namespace lab's namespace with the VM's addresses (links renamed like a VM's NICs). Each
is provisioned by vagrant/provision.sh from a freshly built .deb and certificates made by
``masqued pki``, exactly as ``vagrant up`` provisions a VM. ``VagrantLab`` then reaches
them through a runner that turns its ``ssh HOST -- sudo -n -- CMD`` into ``nsenter``
(everything but ssh itself is the real thing: systemd units, journal, systemd-run), and
test bodies of test_tunnel.py run against it.
"""

from __future__ import annotations

import secrets
import shlex
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from masqued.gate import pki
from tests.integration import test_tunnel, vagrant_lab
from tests.integration.lab import REPO, TARGET_V4, LabProcess, NamespaceLab
from tests.system.machine import Container, ensure_rootfs

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# VM -> the V4=V6 pairs the Vagrantfile passes to provision.sh
PAIRS = {
    "relay": ["198.18.1.1=2001:db8:1::1", "198.19.0.1=2001:db8:19::1"],
    "target": ["198.19.0.2=2001:db8:19::2"],
    "client": ["198.18.1.11=2001:db8:1::b"],
}


@dataclass
class NsenterHosts:
    """Runs what VagrantHosts would send over ssh in the containers instead."""

    boxes: dict[str, Container]

    def _argv(self, argv: Sequence[str]) -> list[str]:
        argv = list(argv)
        host = argv[argv.index("--") - 1]
        remote = shlex.split(argv[argv.index("--") + 1])
        assert remote[:3] == ["sudo", "-n", "--"], remote
        return ["nsenter", "-t", str(self.boxes[host].leader), "-a", *remote[3:]]

    def runner(
        self, argv: Sequence[str], stdin: str | None, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        if "-O" in argv:  # closing ssh's shared connections: none here
            return subprocess.CompletedProcess(list(argv), 0, "", "")
        return subprocess.run(
            self._argv(argv),
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={"PATH": PATH},
            check=False,
        )

    def spawner(self, argv: Sequence[str], log: Path | None) -> LabProcess:
        out = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115
        return subprocess.Popen(
            self._argv(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={"PATH": PATH},
        )


@dataclass
class VMs:
    boxes: dict[str, Container]
    hosts: vagrant_lab.VagrantHosts
    work: Path


def _rename(netns: str, old: str, new: str) -> None:
    for args in (("set", old, "down"), ("set", old, "name", new), ("set", new, "up")):
        subprocess.run(["ip", "-n", netns, "link", *args], check=True, timeout=10)


@pytest.fixture(scope="module")
def vms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VMs]:
    work = tmp_path_factory.mktemp("vagrant-rehearsal")
    build = subprocess.Popen(
        ["bash", str(REPO / "packaging" / "build-deb.sh"), "--out", str(work / "deb")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    rootfs, _ = ensure_rootfs()
    out, err = build.communicate(timeout=1200)
    assert build.returncode == 0, err[-4000:]
    deb = Path(out.strip().splitlines()[-1])
    # The certificates vagrant/prepare.sh makes, with the same names.
    certs = work / "pki"
    pki.init_ca(certs)
    pki.issue(certs, "relay.example", "relay", sans=["198.18.1.1", "2001:db8:1::1"])
    pki.issue(certs, "client", "client")

    topo = NamespaceLab(work / "ns", certs, clients=1, tag=secrets.token_hex(2))
    netns = {"relay": topo.relay_ns, "target": topo.target_ns, "client": topo.client_ns(1)}
    boxes: dict[str, Container] = {}
    try:
        topo.up()
        # A VM's NICs are not named mq-*: only masqued's own links are.
        _rename(topo.relay_ns, "mq-br", "eth1")
        _rename(topo.relay_ns, "mq-r-t", "eth2")
        _rename(topo.relay_ns, "mq-r-c1", "eth3")
        _rename(topo.target_ns, "mq-t-r", "eth1")
        _rename(topo.client_ns(1), "mq-c-r", "eth1")
        binds = {REPO: "/vagrant", deb.parent: "/mnt/deb", certs: "/mnt/pki"}
        for name in ("relay", "target", "client"):
            box = Container(f"mq-{topo.tag}-vm-{name}", netns[name], rootfs, work / name, binds)
            box.boot()
            boxes[name] = box
        for name, box in boxes.items():
            # The box's `apt-get install python3`; the containers reach no mirror.
            box.run("ln", "-sf", "python3.11", "/usr/bin/python3")
            res = box.run(
                "env",
                "MASQUED_LAB_NO_APT=1",
                "MASQUED_LAB_PKI=/mnt/pki",
                "bash",
                "/vagrant/vagrant/provision.sh",
                name,
                f"/mnt/deb/{deb.name}",
                *PAIRS[name],
                check=False,
                timeout=300,
            )
            assert res.returncode == 0, (
                f"provision {name}:\n{res.stdout[-3000:]}{res.stderr[-3000:]}"
            )
        fake_ssh = NsenterHosts(boxes)
        config = {name: {"hostname": name} for name in boxes}
        statedir = work / "ssh"
        statedir.mkdir()
        (statedir / "ssh_config").write_text(vagrant_lab.write_ssh_config(config))
        hosts = vagrant_lab.VagrantHosts(config, statedir, fake_ssh.runner, fake_ssh.spawner)
        yield VMs(boxes, hosts, work)
    finally:
        for box in boxes.values():
            box.shutdown()
        topo.down()


def _active(box: Container, unit: str) -> bool:
    return box.run("systemctl", "is-active", unit, check=False).stdout.strip() == "active"


def _provisioned_tunnel_works(vms: VMs) -> None:
    client, relay = vms.boxes["client"], vms.boxes["relay"]
    deadline = time.monotonic() + 60
    while not (_active(relay, "masqued@relay") and _active(client, "masqued@client")):
        assert time.monotonic() < deadline, client.run(
            "journalctl", "-u", "masqued@client", "-n", "30", "--no-pager", check=False
        ).stdout
        time.sleep(0.5)
    res = client.run(
        "/opt/venvs/masqued/bin/python",
        "/usr/local/lib/masqued-lab/traffic.py",
        "udp",
        TARGET_V4,
        "5",
        check=False,
    )
    # The target saw the relay's egress address: NAT out of the interface with 198.19.0.1.
    assert res.stdout.strip() == "ok 198.19.0.1 5/5", res.stdout + res.stderr


def test_provisioning_brings_up_a_working_tunnel(vms: VMs) -> None:
    _provisioned_tunnel_works(vms)
    relay = vms.boxes["relay"]
    assert "table inet masqued_relay" in relay.run("nft", "list", "tables").stdout
    conf = relay.run("cat", "/etc/masque/relay.conf").stdout
    assert 'egress = "eth2"' in conf and 'auth = "mtls"' in conf
    assert _active(vms.boxes["target"], "masqued-lab-servers")


@pytest.mark.parametrize(
    "body",
    [
        test_tunnel.test_ping_tcp_udp_ipv4_ipv6_with_nftables,
        test_tunnel.test_client_recovers_after_relay_sigkill,
    ],
)
def test_tunnel_bodies_on_the_vagrant_lab(vms: VMs, body: object, tmp_path: Path) -> None:
    lab = vagrant_lab.VagrantLab(vms.hosts, tmp_path)
    try:
        lab.up()
        body(lab)  # type: ignore[operator]
    finally:
        lab.down()
    # down() put the provisioned instances back.
    _provisioned_tunnel_works(vms)
