"""The Vagrant lab without VMs: how it reaches hosts, finds addresses and maps lab
operations onto systemd, journald and files — against a fake Vagrant + VMs that keeps
state (files, units, journal, links, NAT tables) and answers the commands the lab sends
over "ssh" the way the VMs would."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import shlex
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration import vagrant_lab
from tests.integration.lab import (
    EGRESS_V4,
    EGRESS_V6,
    RELAY_V4,
    RELAY_V6,
    REPO,
    TARGET_V4,
    TARGET_V6,
    Lab,
    LabDaemon,
    NamespaceLab,
    client_addr_v4,
    client_addr_v6,
)
from tests.integration.vagrant_lab import (
    HELPER_DIR,
    HELPERS,
    SERVERS_UNIT,
    WRITE_SCRIPT,
    VagrantDaemon,
    VagrantError,
    VagrantHosts,
    VagrantLab,
    exit_code,
    machines_created,
    parse_ssh_config,
    time_scale,
    write_ssh_config,
)

SSH_CONFIG = """Host relay
  HostName 192.168.121.10
  User vagrant
  Port 22
  UserKnownHostsFile /dev/null
  StrictHostKeyChecking no
  PasswordAuthentication no
  IdentityFile "/home/me/my lab/.vagrant/machines/relay/libvirt/private_key"
  IdentitiesOnly yes
  LogLevel FATAL
  PubkeyAcceptedKeyTypes +ssh-rsa
  HostKeyAlgorithms +ssh-rsa

Host client
  HostName 192.168.121.11
  User vagrant
  Port 22
  IdentityFile /home/me/lab/.vagrant/machines/client/libvirt/private_key
  IdentityFile /home/me/.vagrant.d/insecure_private_key
  IdentitiesOnly yes
"""


# -- the fake world ----------------------------------------------------------------------


@dataclass
class Unit:
    active: str = "inactive"
    sub: str = "dead"
    result: str = "success"
    code: int = 0
    status: int = 0


@dataclass
class FakeVM:
    """One VM: what the lab can observe and change on it."""

    name: str
    nics: dict[str, list[str]]  # ifname -> addresses
    files: dict[str, str] = field(default_factory=dict)
    units: dict[str, Unit] = field(default_factory=dict)
    links: set[str] = field(default_factory=set)
    nft: set[str] = field(default_factory=set)
    journal: list[tuple[int, str, str]] = field(default_factory=list)
    seq: int = 0

    def log(self, unit: str, message: str) -> None:
        self.seq += 1
        self.journal.append((self.seq, unit, message))

    # masqued@NAME as systemd would run it
    def start(self, unit: str) -> None:
        name = unit.removeprefix("masqued@").removesuffix(".service")
        conf = self.files.get(f"/etc/masque/{name}.conf")
        u = self.units.setdefault(unit, Unit())
        if unit == SERVERS_UNIT:
            u.active, u.sub = "active", "running"
            self.log(unit, "servers listening")
            return
        if conf is None:  # ConditionPathExists=/etc/masque/%i.conf
            return
        self.log(unit, f"masqued cleanup --quiet {name}")
        if 'mode = "relay"' in conf or 'mode = "client"' in conf:
            u.active, u.sub, u.result, u.code, u.status = "active", "running", "success", 0, 0
            self.links.add(f"mq-{name}")
            if 'mode = "relay"' in conf:
                self.nft.add(f"table inet masqued_{name}")
            self.log(unit, f"{name}: READY")
        else:
            u.active, u.sub, u.result, u.code, u.status = "failed", "failed", "exit-code", 1, 2
            self.log(unit, f"{name}: config: invalid mode")

    def cleanup(self, name: str) -> None:  # ExecStopPost
        self.links.discard(f"mq-{name}")
        self.nft.discard(f"table inet masqued_{name}")

    def stop(self, unit: str) -> None:
        u = self.units.get(unit)
        if u is None or u.active == "inactive":
            return
        if u.active == "active":
            u.code, u.status, u.result = 1, 0, "success"
        u.active, u.sub = "inactive", "dead"
        self.cleanup(unit.removeprefix("masqued@").removesuffix(".service"))
        self.log(unit, "stopped")

    def kill(self, unit: str, sig: str) -> None:
        u = self.units[unit]
        if u.active != "active":
            return
        # Restart=on-failure: dies, ExecStopPost runs, a restart is scheduled.
        u.active, u.sub, u.result = "activating", "auto-restart", "signal"
        u.code, u.status = 2, int(getattr(signal, sig))
        self.cleanup(unit.removeprefix("masqued@").removesuffix(".service"))
        self.log(unit, f"Main process exited, code=killed, status={u.status}/{sig}")

    def matching(self, pattern: str) -> list[str]:
        rx = re.compile(re.escape(pattern).replace(r"\*", ".*") + r"(\.service)?$")
        return [u for u in self.units if rx.match(u)]

    def systemctl(self, args: list[str]) -> tuple[int, str]:
        verb, rest = args[0], [a for a in args[1:] if not a.startswith("-")]
        if verb == "list-units":
            pattern = rest[0]
            lines = [
                f"{u} loaded {self.units[u].active} {self.units[u].sub} masqued"
                for u in self.matching(pattern)
            ]
            return 0, "".join(line + "\n" for line in lines)
        if verb in ("restart", "start"):
            for u in rest:
                if verb == "restart":
                    self.stop(u)
                self.start(u)
            return 0, ""
        if verb == "stop":
            for pattern in rest:
                for u in self.matching(pattern) if "*" in pattern else [pattern]:
                    self.stop(u)
                    if u.startswith(vagrant_lab.SPAWN_PREFIX):
                        del self.units[u]
            return 0, ""
        if verb == "reset-failed":
            for u in rest:
                if u in self.units and self.units[u].active == "failed":
                    self.units[u].active = "inactive"
            return 0, ""
        if verb == "is-active":
            state = self.units.get(rest[0], Unit()).active
            return (0 if state == "active" else 3), state + "\n"
        if verb == "show":
            props = self.units.get(rest[-1], Unit())
            return 0, (
                f"ActiveState={props.active}\nSubState={props.sub}\nResult={props.result}\n"
                f"ExecMainCode={props.code}\nExecMainStatus={props.status}\n"
            )
        if verb == "kill":
            self.kill(rest[-1], args[args.index("-s") + 1])
            return 0, ""
        return 1, f"fake systemctl: {verb}?"

    def journalctl(self, args: list[str]) -> tuple[int, str]:
        if "-n" in args:
            if not self.journal:
                return 0, ""
            return 0, json.dumps({"__CURSOR": f"s=fake;i={self.journal[-1][0]}"}) + "\n"
        unit = args[args.index("-u") + 1]
        after = 0
        if "--after-cursor" in args:
            after = int(args[args.index("--after-cursor") + 1].split("i=")[1])
        return 0, "".join(f"{m}\n" for s, u, m in self.journal if u == unit and s > after)

    def ip(self, args: list[str]) -> tuple[int, str]:
        if args[:3] == ["-j", "addr", "show"]:
            out = []
            for ifname, addrs in self.nics.items():
                info = [{"local": a, "scope": "global"} for a in addrs]
                info.append({"local": "fe80::1", "scope": "link"})
                out.append({"ifname": ifname, "addr_info": info})
            return 0, json.dumps(out)
        if args[:3] == ["-j", "link", "show"]:
            names = ["lo", *self.nics, *sorted(self.links)]
            return 0, json.dumps([{"ifname": n} for n in names])
        if args[1:3] in (["rule", "show"], ["route", "show"]):
            return 0, ""
        if args[:1] == ["-4"] and args[1:3] == ["-o", "addr"]:
            return 0, ""
        return 1, "fake ip: ?"

    def execute(self, argv: list[str], stdin: str | None) -> tuple[int, str]:
        cmd, args = argv[0], argv[1:]
        if cmd == "echo":
            return 0, " ".join(args) + "\n"
        if cmd == "sh" and args[:2] == ["-c", WRITE_SCRIPT]:
            self.files[args[3]] = stdin or ""
            return 0, ""
        if cmd == "cat":
            return (0, self.files[args[0]]) if args[0] in self.files else (1, "")
        if cmd == "rm":
            self.files.pop(args[-1], None)
            return 0, ""
        if cmd == "mkdir":
            return 0, ""
        if cmd == "find":
            base = args[0].rstrip("/") + "/"
            names = [p for p in self.files if p.startswith(base) and "/" not in p[len(base) :]]
            return 0, "".join(p + "\n" for p in sorted(names) if p.endswith(".conf"))
        if cmd == "systemctl":
            return self.systemctl(args)
        if cmd == "journalctl":
            return self.journalctl(args)
        if cmd == "ip":
            return self.ip(args)
        if cmd == "nft":
            return 0, "".join(t + "\n" for t in sorted(self.nft))
        if cmd in ("iptables-legacy", "ip6tables-legacy"):
            return 0, "-P PREROUTING ACCEPT\n"
        if cmd == "ss":
            up = self.units.get(SERVERS_UNIT, Unit()).active == "active"
            return 0, "LISTEN 0 64 *:5201 *:*\n" if up else ""
        return 127, f"fake: {cmd}: command not found"


@dataclass
class FakeProcess:
    code: int

    def wait(self, timeout: float | None = None) -> int:
        return self.code

    def poll(self) -> int | None:
        return self.code


@dataclass
class FakeVagrant:
    """``vagrant ssh-config`` and ``ssh HOST -- sudo -n -- CMD`` against fake VMs."""

    vms: dict[str, FakeVM]
    running: set[str]
    closed: list[str] = field(default_factory=list)

    def decode(self, argv: Sequence[str]) -> tuple[FakeVM, list[str]]:
        argv = list(argv)
        assert argv[0] == "ssh"
        config = Path(argv[argv.index("-F") + 1]).read_text()
        host = argv[argv.index("--") - 1]
        assert f"Host {host}\n" in config  # ssh would not know the host otherwise
        remote = shlex.split(argv[argv.index("--") + 1])
        assert remote[:3] == ["sudo", "-n", "--"]
        return self.vms[host], remote[3:]

    def runner(
        self, argv: Sequence[str], stdin: str | None, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        argv = list(argv)
        if argv[:2] == ["vagrant", "ssh-config"]:
            names = argv[2:]
            down = [n for n in names if n not in self.running]
            if down:
                err = f"The provider for this Vagrant-managed machine is reporting that it is not yet ready for SSH. ({down[0]})"  # noqa: E501
                return subprocess.CompletedProcess(argv, 1, "", err)
            text = "".join(
                f"Host {n}\n  HostName 192.168.121.{10 + i}\n  User vagrant\n  Port 22\n"
                f"  IdentityFile /x/.vagrant/machines/{n}/libvirt/private_key\n\n"
                for i, n in enumerate(names)
            )
            return subprocess.CompletedProcess(argv, 0, text, "")
        if "-O" in argv:
            self.closed.append(argv[-1])
            return subprocess.CompletedProcess(argv, 0, "", "")
        vm, cmd = self.decode(argv)
        rc, out = vm.execute(cmd, stdin)
        # Like the real tools: `systemctl is-active` prints its answer with status 3.
        if rc in (0, 3):
            return subprocess.CompletedProcess(argv, rc, out, "")
        return subprocess.CompletedProcess(argv, rc, "", out)

    def spawner(self, argv: Sequence[str], log: Path | None) -> FakeProcess:
        vm, cmd = self.decode(argv)
        assert cmd[0] == "systemd-run"
        unit = next(a.split("=", 1)[1] for a in cmd if a.startswith("--unit="))
        vm.units[f"{unit}.service"] = Unit("active", "running")
        payload = cmd[cmd.index("--") + 1 :]
        if log is not None:
            log.write_text(f"ran {shlex.join(payload)}\n")
        return FakeProcess(0)


def provisioned(clients: int = 1) -> dict[str, FakeVM]:
    """The VMs as vagrant/provision.sh leaves them."""
    relay = FakeVM(
        "relay",
        {"eth0": ["192.168.121.10"], "eth1": [RELAY_V4, RELAY_V6], "ens7": [EGRESS_V4, EGRESS_V6]},
    )
    target = FakeVM("target", {"eth0": ["192.168.121.12"], "eth1": [TARGET_V4, TARGET_V6]})
    vms = {"relay": relay, "target": target}
    relay.files["/etc/masque/relay.conf"] = 'mode = "relay"\n# provisioned\n'
    relay.files["/usr/share/doc/masqued/examples/relay.conf"] = "# example\n"
    relay.start("masqued@relay.service")
    target.start(SERVERS_UNIT)
    for i in range(1, clients + 1):
        name = vagrant_lab.client_host(i)
        vm = FakeVM(
            name, {"eth0": ["192.168.121.20"], "eth1": [client_addr_v4(i), client_addr_v6(i)]}
        )
        vm.files["/etc/masque/client.conf"] = 'mode = "client"\n# provisioned\n'
        vm.start("masqued@client.service")
        vms[name] = vm
    return vms


@pytest.fixture
def world(tmp_path: Path) -> FakeVagrant:
    for name in ("relay", "target", "client"):
        (tmp_path / ".vagrant" / "machines" / name / "libvirt").mkdir(parents=True)
        (tmp_path / ".vagrant" / "machines" / name / "libvirt" / "id").write_text("uuid")
    vms = provisioned()
    return FakeVagrant(vms, set(vms))


@pytest.fixture
def hosts(world: FakeVagrant, tmp_path: Path) -> Iterator[VagrantHosts]:
    h = VagrantHosts.discover(tmp_path, runner=world.runner, spawner=world.spawner)
    yield h
    h.close()


@pytest.fixture
def vm_lab(hosts: VagrantHosts, tmp_path: Path) -> VagrantLab:
    lab = VagrantLab(hosts, tmp_path / "work")
    lab.up()
    return lab


# -- finding and reaching the VMs ----------------------------------------------------------


def test_ssh_config_parsing_keeps_first_values_and_unquotes() -> None:
    config = parse_ssh_config(SSH_CONFIG)
    assert list(config) == ["relay", "client"]
    assert config["relay"]["hostname"] == "192.168.121.10"
    assert config["relay"]["identityfile"] == (
        "/home/me/my lab/.vagrant/machines/relay/libvirt/private_key"
    )
    # ssh uses the first value of an option; so do we
    assert config["client"]["identityfile"].endswith("/client/libvirt/private_key")
    assert parse_ssh_config("Host x\n  Port=2222\n")["x"]["port"] == "2222"
    # what we write back parses to the same
    assert parse_ssh_config(write_ssh_config(config)) == config


def test_machines_created_needs_an_id_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VAGRANT_DOTFILE_PATH", raising=False)
    assert machines_created(tmp_path) == []
    machines = tmp_path / ".vagrant" / "machines"
    (machines / "relay" / "libvirt").mkdir(parents=True)
    assert machines_created(tmp_path) == []  # `vagrant validate`/status leave these
    (machines / "relay" / "libvirt" / "id").write_text("x")
    (machines / "target" / "virtualbox").mkdir(parents=True)
    (machines / "target" / "virtualbox" / "id").write_text("y")
    assert machines_created(tmp_path) == ["relay", "target"]
    monkeypatch.setenv("VAGRANT_DOTFILE_PATH", str(tmp_path / "elsewhere"))
    assert machines_created(tmp_path) == []


def test_discover_asks_vagrant_once_and_reaches_each_vm(hosts: VagrantHosts) -> None:
    assert sorted(hosts.names) == ["client", "relay", "target"]
    assert hosts.client_count == 1
    assert "Host relay\n" in (hosts.statedir / "ssh_config").read_text()
    argv = hosts.ssh_argv("relay", ["true"])
    assert argv[:3] == ["ssh", "-F", str(hosts.statedir / "ssh_config")]
    assert "BatchMode=yes" in argv and "ControlMaster=auto" in argv
    # one shared connection per VM, in a path short enough for a unix socket
    control = next(a for a in argv if a.startswith("ControlPath="))
    assert len(control.removeprefix("ControlPath=").replace("%C", "x" * 40)) < 100
    with pytest.raises(VagrantError, match="unknown VM 'nope'"):
        hosts.ssh_argv("nope", ["true"])


def test_discover_fails_clearly_when_a_vm_is_not_running(
    world: FakeVagrant, tmp_path: Path
) -> None:
    world.running.discard("target")
    with pytest.raises(VagrantError, match="vagrant status"):
        VagrantHosts.discover(tmp_path, runner=world.runner, spawner=world.spawner)
    with pytest.raises(VagrantError, match="no Vagrant VMs"):
        VagrantHosts.discover(tmp_path / "empty", runner=world.runner)


def test_commands_arrive_intact_through_ssh_and_sudo(hosts: VagrantHosts) -> None:
    tricky = ["a b", "it's", '"q"', "$(reboot)", "x;y", "*", ""]
    assert hosts.run("client", "echo", *tricky).stdout == " ".join(tricky) + "\n"
    text = 'mode = "relay"\npool = ["198.18.200.0/24"]\n'
    hosts.write("relay", Path("/etc/masque/with space.conf"), text)
    assert hosts.run("relay", "cat", "/etc/masque/with space.conf").stdout == text
    # failures raise with the caller's command, or come back when check=False
    with pytest.raises(subprocess.CalledProcessError) as err:
        hosts.run("relay", "cat", "/nonexistent")
    assert err.value.cmd == ["cat", "/nonexistent"]
    assert hosts.run("relay", "no-such-tool", check=False).returncode == 127


def test_addresses_are_found_by_asking_each_vm(hosts: VagrantHosts) -> None:
    relay = hosts.addresses("relay")
    assert relay[EGRESS_V4] == "ens7" and relay[RELAY_V4] == "eth1"
    assert relay[RELAY_V6] == "eth1" and "fe80::1" not in relay  # only global ones


def test_close_ends_the_shared_connections(world: FakeVagrant, tmp_path: Path) -> None:
    h = VagrantHosts.discover(tmp_path, runner=world.runner, spawner=world.spawner)
    h.close()
    assert sorted(world.closed) == ["client", "relay", "target"]
    assert not h.statedir.exists()


# -- lab operations -------------------------------------------------------------------------


def test_up_checks_addresses_uploads_helpers_and_stops_provisioned_instances(
    world: FakeVagrant, vm_lab: VagrantLab
) -> None:
    relay, client = world.vms["relay"], world.vms["client"]
    assert relay.units["masqued@relay.service"].active == "inactive"
    assert client.units["masqued@client.service"].active == "inactive"
    for vm in world.vms.values():
        for script in HELPERS:
            text = (REPO / "tests" / "integration" / script).read_text()
            assert vm.files[str(HELPER_DIR / script)] == text
    # the test servers stay up (they are the target's provisioned unit)
    assert world.vms["target"].units[SERVERS_UNIT].active == "active"


def test_up_refuses_unprovisioned_vms_and_too_few_clients(
    world: FakeVagrant, hosts: VagrantHosts, tmp_path: Path
) -> None:
    world.vms["target"].nics["eth1"] = [TARGET_V4]  # no IPv6: masqued-lab-net did not run
    with pytest.raises(VagrantError, match=f"target lacks {TARGET_V6}.*vagrant provision"):
        VagrantLab(hosts, tmp_path).up()
    with pytest.raises(VagrantError, match=r"needs 3 client VMs.*MASQUED_VAGRANT_CLIENTS=3"):
        VagrantLab(hosts, tmp_path, clients=3).up()


def test_a_daemon_is_a_systemd_unit_with_its_config_and_journal(
    world: FakeVagrant, vm_lab: VagrantLab
) -> None:
    relay_vm = world.vms["relay"]
    relay_vm.log("masqued@relay.service", "an old line from before the test")
    config = vm_lab.relay_config(nat="nftables")
    assert 'egress = "ens7"' in config  # the relay's interface holding EGRESS_V4
    assert 'certificate = "/etc/masque/pki/relay.example.pem"' in config
    assert 'log_level = "debug"' in config
    assert 'log_level = "info"' in vm_lab.client_config(extra='log_level = "info"\n')
    assert vm_lab.client_config().count("log_level") == 1

    relay = vm_lab.start_daemon("relay", vm_lab.relay_ns, config)
    relay.wait_ready()
    assert relay_vm.files["/etc/masque/relay.conf"] == config
    assert relay.running()
    assert "relay: READY" in relay.log_text()
    assert "an old line" not in relay.log_text()
    assert vm_lab.leftovers("relay") == ["link mq-relay", "nft table inet masqued_relay"]

    assert relay.stop() == 0
    assert not relay.running()
    assert vm_lab.leftovers("relay") == []


def test_sigkill_is_a_crash_that_systemd_cleans_up_and_does_not_restart(
    world: FakeVagrant, vm_lab: VagrantLab
) -> None:
    relay = vm_lab.start_daemon("relay", vm_lab.relay_ns, vm_lab.relay_config())
    relay.wait_ready()
    assert relay.stop(signal.SIGKILL) == -signal.SIGKILL
    unit = world.vms["relay"].units["masqued@relay.service"]
    assert unit.active == "inactive"  # the automatic restart was cancelled
    assert vm_lab.supervised and vm_lab.leftovers("relay") == []
    again = vm_lab.start_daemon("relay", vm_lab.relay_ns, vm_lab.relay_config(), run="2")
    again.wait_ready()
    vm_lab.forget(relay)
    assert vm_lab.daemons == [again]


def test_a_daemon_that_fails_reports_its_journal(vm_lab: VagrantLab) -> None:
    bad = vm_lab.start_daemon("c1", vm_lab.client_ns(1), 'mode = "bogus"\n')
    with pytest.raises(AssertionError, match=r"(?s)not READY.*failed.*invalid mode"):
        bad.wait_ready(timeout=5)


def test_down_restores_the_provisioned_state(world: FakeVagrant, vm_lab: VagrantLab) -> None:
    client_vm = world.vms["client"]
    vm_lab.start_daemon("relay", "relay", vm_lab.relay_config()).wait_ready()
    vm_lab.start_daemon("c1", "client", vm_lab.client_config()).wait_ready()
    vm_lab.spawn("client", *vm_lab.helper_cmd("client", "traffic.py", "udp", TARGET_V4, "5"))
    assert any(u.startswith("mq-lab-") for u in client_vm.units)
    vm_lab.down()
    assert world.vms["relay"].files["/etc/masque/relay.conf"] == 'mode = "relay"\n# provisioned\n'
    assert "/etc/masque/c1.conf" not in client_vm.files
    assert client_vm.units["masqued@c1.service"].active == "inactive"
    assert client_vm.units["masqued@client.service"].active == "active"
    assert world.vms["relay"].units["masqued@relay.service"].active == "active"
    assert not any(u.startswith("mq-lab-") for u in client_vm.units)
    assert client_vm.links == {"mq-client"}  # only the provisioned instance's tunnel


def test_helpers_servers_and_spawned_commands(world: FakeVagrant, vm_lab: VagrantLab) -> None:
    assert vm_lab.helper_cmd("target", "servers.py") == [
        "/usr/bin/python3",
        "/usr/local/lib/masqued-lab/servers.py",
    ]
    assert vm_lab.helper_cmd("client", "rawclient.py", "x")[0] == "/opt/venvs/masqued/bin/python"
    with pytest.raises(ValueError, match="not a lab helper"):
        vm_lab.helper_cmd("client", "../../etc/shadow")
    world.vms["target"].log(SERVERS_UNIT, "udp 198.19.0.1 old")
    vm_lab.start_servers()
    assert "servers listening" in vm_lab.servers_log()
    assert "old" not in vm_lab.servers_log()
    log = vm_lab.workdir / "t1.out"
    proc = vm_lab.spawn("client", "echo", "a b", log=log)
    assert proc.wait(5) == 0
    assert log.read_text() == "ran echo 'a b'\n"
    assert vm_lab.masqued("relay", "status").returncode == 127  # no masqued in the fake


def test_exit_codes_follow_popen_conventions() -> None:
    assert exit_code({"Result": "success", "ExecMainCode": "1", "ExecMainStatus": "0"}) == 0
    assert exit_code({"Result": "exit-code", "ExecMainCode": "1", "ExecMainStatus": "3"}) == 3
    assert exit_code({"Result": "signal", "ExecMainCode": "2", "ExecMainStatus": "9"}) == -9
    assert exit_code({"Result": "core-dump", "ExecMainCode": "3", "ExecMainStatus": "6"}) == -6
    assert exit_code({"Result": "success", "ExecMainCode": "0", "ExecMainStatus": "0"}) == 0
    assert exit_code({"Result": "resources", "ExecMainCode": "0"}) is None


# -- the time scale (VMs under TCG) -----------------------------------------------------------


def test_time_scale_comes_from_the_environment_and_is_checked() -> None:
    assert time_scale({}) == 1.0
    assert time_scale({"MASQUED_LAB_TIME_SCALE": ""}) == 1.0
    assert time_scale({"MASQUED_LAB_TIME_SCALE": " 10 "}) == 10.0
    assert time_scale({"MASQUED_LAB_TIME_SCALE": "2.5"}) == 2.5
    for bad in ("ten", "0.5", "0", "-3", "nan", "inf", "1000"):
        with pytest.raises(VagrantError, match="MASQUED_LAB_TIME_SCALE"):
            time_scale({"MASQUED_LAB_TIME_SCALE": bad})


def test_the_time_scale_stretches_command_timeouts_and_waits(
    world: FakeVagrant, tmp_path: Path
) -> None:
    seen: list[float] = []

    def runner(
        argv: Sequence[str], stdin: str | None, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        seen.append(timeout)
        return world.runner(argv, stdin, timeout)

    h = VagrantHosts.discover(tmp_path, runner=runner, spawner=world.spawner, scale=10)
    try:
        assert seen == [1200]  # vagrant ssh-config: 120 s by default
        h.run("relay", "true", check=False, timeout=7)
        assert seen[-1] == 70
        lab = VagrantLab(h, tmp_path / "work")
        assert lab.time_scale == 10
        assert as_lab(lab).time_scale == 10
    finally:
        h.close()
    assert VagrantHosts.discover(tmp_path, runner=world.runner, scale=None).scale == 1.0


# -- confinement: the lab's and libvirt's networks (vagrant/vm-test.sh) ----------------------


LAB_V4 = ipaddress.ip_network("198.18.0.0/15")
LAB_V6 = ipaddress.ip_network("2001:db8::/32")


def addresses_in(text: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Every IPv4/IPv6 address or network written literally in ``text`` (what looks like
    one and parses as one: times such as 18:26:02 do not)."""
    found: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    v4 = r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?:/\d{1,2})?(?![\w.])"
    v6 = r"(?<![\w:])[0-9a-fA-F]{1,4}(?::[0-9a-fA-F]{0,4}){2,7}(?:/\d{1,3})?"
    for m in re.finditer(f"{v4}|{v6}", text):
        with contextlib.suppress(ValueError):
            found.append(ipaddress.ip_network(m.group(0), strict=False))
    return found


def test_every_network_of_the_vm_lab_is_a_test_network() -> None:
    harness = (REPO / "vagrant" / "vm-test.sh").read_text()
    vagrantfile = (REPO / "Vagrantfile").read_text()
    assert "mgmt_net=198.18.64.0/24" in harness
    # The provider's default management network is named only to say it is not used.
    allowed_mentions = {
        ipaddress.ip_network("192.168.121.0/24"),
        ipaddress.ip_network("255.255.255.0"),  # a netmask
    }
    for name, text in (("vagrant/vm-test.sh", harness), ("Vagrantfile", vagrantfile)):
        nets = addresses_in(text)
        assert nets, name
        for net in nets:
            if net in allowed_mentions:
                continue
            inside = net.subnet_of(LAB_V4) if net.version == 4 else net.subnet_of(LAB_V6)
            assert inside, f"{name}: {net} is outside 198.18.0.0/15 and 2001:db8::/32"
    # The management network takes the isolated mode whenever the harness sets it, and
    # the lab's own networks never forward.
    assert 'lv.management_network_mode = "none"' in vagrantfile
    assert vagrantfile.count('libvirt__forward_mode: "none"') == 1
    # The harness's namespace follows the mq-* rule and every run tears it down.
    assert "ns=mq-vagrant-$$" in harness and 'ip netns delete "$ns"' in harness
    assert "trap teardown EXIT" in harness


# -- the Vagrantfile and the Python lab agree -------------------------------------------------


def test_vagrantfile_provisioning_and_lab_agree() -> None:
    vagrantfile = (REPO / "Vagrantfile").read_text()
    for addr in (RELAY_V4, RELAY_V6, EGRESS_V4, EGRESS_V6, TARGET_V4, TARGET_V6):
        assert f'"{addr}"' in vagrantfile, addr
    # clients: 198.18.1.{10+i} and 2001:db8:1::{10+i:x}, as client_addr_v4/v6
    assert '"198.18.1.#{10 + i}"' in vagrantfile and "#{(10 + i).to_s(16)}" in vagrantfile
    assert client_addr_v4(1) == "198.18.1.11" and client_addr_v6(1) == "2001:db8:1::b"
    assert 'i == 1 ? "client" : "client#{i}"' in vagrantfile
    assert [vagrant_lab.client_host(i) for i in (1, 2, 3)] == ["client", "client2", "client3"]
    provision = (REPO / "vagrant" / "provision.sh").read_text()
    assert f"for f in {' '.join(HELPERS)}; do" in provision
    assert SERVERS_UNIT in provision
    prepare = (REPO / "vagrant" / "prepare.sh").read_text()
    assert f"--name relay.example --san {RELAY_V4} --san {RELAY_V6}" in prepare


def as_lab(lab: VagrantLab | NamespaceLab) -> Lab:
    """Both labs implement the interface the tests are written against (mypy checks)."""
    return lab


def as_daemon(daemon: VagrantDaemon) -> LabDaemon:
    return daemon
