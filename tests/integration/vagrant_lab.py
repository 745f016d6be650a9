"""The Vagrant lab: the namespace lab's hosts as the Vagrantfile's VMs.

    client (198.18.1.11, 2001:db8:1::b) --net masqued-clients--
        relay (198.18.1.1, 2001:db8:1::1 | 198.19.0.1, 2001:db8:19::1)
        --net masqued-targets-- target (198.19.0.2, 2001:db8:19::2)
    (with MASQUED_VAGRANT_CLIENTS=3 also client2 198.18.1.12 and client3 198.18.1.13)

The same addresses as the namespace lab (tests/integration/lab.py), so the same test
bodies run against both. ``VagrantLab`` implements ``Lab``:

- hosts are reached with plain ``ssh`` and the config ``vagrant ssh-config`` prints
  (parsed once per session; one shared ssh connection per VM), commands run as root
  through ``sudo -n``;
- a daemon is the packaged unit: its config is written to /etc/masque/NAME.conf, then
  ``systemctl restart masqued@NAME``; ready is ``systemctl is-active`` (Type=notify),
  its log is ``journalctl -u masqued@NAME`` from a cursor taken before the start;
- background commands run as transient units (``systemd-run``) so that ``down()`` can
  stop them; the target's servers are the provisioned ``masqued-lab-servers`` unit;
- the interfaces are found by address (``ip -j addr``), e.g. the relay's egress;
- every wait (a command's timeout, READY, a ping) is multiplied by
  ``$MASQUED_LAB_TIME_SCALE`` (default 1): VMs emulated by TCG are about ten times
  slower than the namespace lab (vagrant/vm-test.sh sets it).

``up()`` stops the provisioned instances (masqued@relay, masqued@client) and keeps their
configs; ``down()`` stops everything the tests started and puts the provisioned state back.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath

from tests.integration.lab import (
    EGRESS_V4,
    EGRESS_V6,
    POOL_V4,
    POOL_V6,
    RELAY_V4,
    RELAY_V6,
    REPO,
    TARGET_NET_V4,
    TARGET_NET_V6,
    TARGET_V4,
    TARGET_V6,
    LabDaemon,
    LabProcess,
    LabTraffic,
    client_addr_v4,
    client_addr_v6,
)

RELAY = "relay"
TARGET = "target"
HELPERS = ("servers.py", "traffic.py", "rawclient.py", "udpload.py")
HELPER_DIR = PurePosixPath("/usr/local/lib/masqued-lab")
CONF_DIR = PurePosixPath("/etc/masque")
PKI_DIR = PurePosixPath("/etc/masque/pki")
MASQUED = "/usr/sbin/masqued"
# The package's venv has aioquic and masqued (rawclient.py needs both); the target
# has no package, only Debian's python3 for the stdlib-only servers.
VENV_PYTHON = "/opt/venvs/masqued/bin/python"
SYSTEM_PYTHON = "/usr/bin/python3"
SERVERS_UNIT = "masqued-lab-servers.service"
SPAWN_PREFIX = "mq-lab-"
# Writes stdin to "$1", readable by root only (a config may name token files).
WRITE_SCRIPT = 'umask 077 && cat > "$1"'
LAB_ENV = "MASQUED_LAB"
SCALE_ENV = "MASQUED_LAB_TIME_SCALE"
MAX_SCALE = 100.0
RUNNING = ("active", "activating", "reloading")
# How ssh itself (not the remote command) reports that it could not get through.
SSH_ERRORS = ("ssh:", "Connection ", "Permission denied", "kex_exchange", "Host key")


def client_host(i: int) -> str:
    """VM name of client ``i``: client, client2, client3 (Vagrantfile)."""
    return "client" if i == 1 else f"client{i}"


def unit(name: str) -> str:
    return f"masqued@{name}.service"


def time_scale(environ: Mapping[str, str] | None = None) -> float:
    """The factor every wait of the Vagrant lab is multiplied by: ``$MASQUED_LAB_TIME_SCALE``.

    Unset or empty: 1. A number from 1 to 100 (VMs are never faster than the namespace
    lab it was written for, and 100 would turn a 20 s wait into half an hour);
    anything else is a ``VagrantError`` naming the variable.
    """
    env = os.environ if environ is None else environ
    raw = env.get(SCALE_ENV, "").strip()
    if not raw:
        return 1.0
    try:
        value = float(raw)
    except ValueError:
        raise VagrantError(f"{SCALE_ENV}={raw!r} is not a number") from None
    if not 1.0 <= value <= MAX_SCALE:  # also rejects nan
        raise VagrantError(f"{SCALE_ENV}={raw}: use a number from 1 to {MAX_SCALE:g}")
    return value


# -- finding the VMs ----------------------------------------------------------------------


def vagrant_dir() -> Path:
    """Where the Vagrantfile is: ``$VAGRANT_CWD`` or the repository."""
    return Path(os.environ.get("VAGRANT_CWD") or REPO)


def machines_created(root: Path | None = None) -> list[str]:
    """Names of the VMs Vagrant has created for this Vagrantfile (no subprocess).

    Vagrant keeps ``.vagrant/machines/NAME/PROVIDER/id`` while a VM exists (running or
    halted); ``$VAGRANT_DOTFILE_PATH`` moves ``.vagrant``.
    """
    base = root if root is not None else vagrant_dir()
    dotfile = Path(os.environ.get("VAGRANT_DOTFILE_PATH") or ".vagrant")
    machines = (dotfile if dotfile.is_absolute() else base / dotfile) / "machines"
    try:
        names = sorted(p.name for p in machines.iterdir() if p.is_dir())
    except OSError:
        return []
    return [n for n in names if any((machines / n).glob("*/id"))]


_OPTION = re.compile(r"(\w+)(?:\s*=\s*|\s+)(.*)")


def parse_ssh_config(text: str) -> dict[str, dict[str, str]]:
    """``vagrant ssh-config`` output -> {host: {lowercased option: value}}.

    First value wins (as in ssh); quotes around a value (a path with spaces) are removed.
    """
    hosts: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _OPTION.match(line)
        if match is None:
            continue
        key, value = match.group(1).lower(), match.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if key == "host":
            current = hosts.setdefault(value, {})
        elif current is not None:
            current.setdefault(key, value)
    return hosts


def write_ssh_config(hosts: dict[str, dict[str, str]]) -> str:
    """Back to ssh_config text (values with spaces quoted)."""
    out: list[str] = []
    for host, options in hosts.items():
        out.append(f"Host {host}")
        for key, value in options.items():
            out.append(f'  {key} "{value}"' if " " in value else f"  {key} {value}")
    return "\n".join(out) + "\n"


def run_local(
    argv: Sequence[str], stdin: str | None, timeout: float
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv),
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def spawn_local(argv: Sequence[str], log: Path | None) -> LabProcess:
    out = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
    )


Runner = Callable[[Sequence[str], str | None, float], subprocess.CompletedProcess[str]]
Spawner = Callable[[Sequence[str], Path | None], LabProcess]


class VagrantError(RuntimeError):
    """The Vagrant lab is not usable (not up, not provisioned, no ssh)."""


@dataclass
class VagrantHosts:
    """How to reach the VMs: one ssh config for all of them and shared connections.

    ``runner``/``spawner`` run local commands (ssh, vagrant); unit tests pass fakes.
    """

    config: dict[str, dict[str, str]]
    statedir: Path
    runner: Runner = run_local
    spawner: Spawner = spawn_local
    # Multiplies every command's timeout and the lab's waits (time_scale()).
    scale: float = 1.0

    @classmethod
    def discover(
        cls,
        root: Path | None = None,
        runner: Runner = run_local,
        spawner: Spawner = spawn_local,
        timeout: float = 120,
        scale: float | None = None,
    ) -> VagrantHosts:
        """Ask ``vagrant ssh-config`` for every VM that exists; fail unless all run.

        ``scale``: the time scale (default: ``time_scale()`` from the environment).
        """
        factor = time_scale() if scale is None else scale
        base = root if root is not None else vagrant_dir()
        names = machines_created(base)
        if not names:
            raise VagrantError(f"no Vagrant VMs in {base} (run `vagrant up` there)")
        res = runner(["vagrant", "ssh-config", *names], None, timeout * factor)
        if res.returncode != 0:
            raise VagrantError(
                f"`vagrant ssh-config {' '.join(names)}` failed (are the VMs running? "
                f"`vagrant status`):\n{res.stderr.strip()[-1500:]}"
            )
        config = parse_ssh_config(res.stdout)
        missing = [n for n in (RELAY, TARGET, client_host(1)) if n not in config]
        if missing:
            raise VagrantError(f"vagrant ssh-config has no {', '.join(missing)}")
        # Short path: ssh's ControlPath must fit in a unix socket address.
        statedir = Path(tempfile.mkdtemp(prefix="mqv-", dir="/tmp"))
        hosts = cls(config, statedir, runner, spawner, factor)
        (statedir / "ssh_config").write_text(write_ssh_config(config))
        return hosts

    @property
    def names(self) -> list[str]:
        return list(self.config)

    @property
    def client_count(self) -> int:
        n = 0
        while client_host(n + 1) in self.config:
            n += 1
        return n

    def ssh_argv(self, host: str, remote: Sequence[str]) -> list[str]:
        """``ssh`` running ``remote`` (an argv) as root on ``host``, quoted for its shell."""
        if host not in self.config:
            raise VagrantError(f"unknown VM {host!r} (known: {', '.join(self.config)})")
        return [
            "ssh",
            "-F",
            str(self.statedir / "ssh_config"),
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=15",
            "-o",
            "ServerAliveInterval=10",
            "-o",
            "ControlMaster=auto",
            "-o",
            f"ControlPath={self.statedir}/%C",
            "-o",
            "ControlPersist=300",
            host,
            "--",
            shlex.join(["sudo", "-n", "--", *remote]),
        ]

    def run(
        self,
        host: str,
        *cmd: str,
        stdin: str | None = None,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        res = self.runner(self.ssh_argv(host, cmd), stdin, timeout * self.scale)
        if res.returncode == 255 and res.stderr.startswith(SSH_ERRORS):
            raise VagrantError(f"ssh to {host} failed: {res.stderr.strip()}")
        if check and res.returncode != 0:
            raise subprocess.CalledProcessError(res.returncode, list(cmd), res.stdout, res.stderr)
        # What the caller asked for, not the ssh wrapper.
        return subprocess.CompletedProcess(list(cmd), res.returncode, res.stdout, res.stderr)

    def spawn(self, host: str, cmd: Sequence[str], log: Path | None) -> LabProcess:
        return self.spawner(self.ssh_argv(host, cmd), log)

    def write(self, host: str, path: PurePath, text: str) -> None:
        """Write ``text`` to ``path`` on ``host`` (mode 0600, as root)."""
        self.run(host, "sh", "-c", WRITE_SCRIPT, "write", str(path), stdin=text)

    def addresses(self, host: str) -> dict[str, str]:
        """{address: interface} of every global address on ``host`` (``ip -j addr``)."""
        out = self.run(host, "ip", "-j", "addr", "show").stdout
        found: dict[str, str] = {}
        for link in json.loads(out or "[]"):
            for a in link.get("addr_info", []):
                if a.get("scope") == "global" and "local" in a:
                    found[str(ipaddress.ip_address(a["local"]))] = link["ifname"]
        return found

    def close(self) -> None:
        """Close the shared ssh connections."""
        for host in self.config:
            with contextlib.suppress(Exception):
                self.runner(
                    [
                        "ssh",
                        "-F",
                        str(self.statedir / "ssh_config"),
                        "-o",
                        f"ControlPath={self.statedir}/%C",
                        "-O",
                        "exit",
                        host,
                    ],
                    None,
                    10,
                )
        shutil.rmtree(self.statedir, ignore_errors=True)


# -- daemons ------------------------------------------------------------------------------


def journal_cursor(hosts: VagrantHosts, host: str) -> str | None:
    """The cursor of the newest journal entry on ``host`` (None: empty journal)."""
    out = hosts.run(
        host, "journalctl", "-q", "-n", "1", "-o", "json", "--output-fields=__CURSOR", check=False
    ).stdout.strip()
    if not out:
        return None
    cursor = json.loads(out.splitlines()[-1]).get("__CURSOR")
    return str(cursor) if cursor else None


def journal_since(hosts: VagrantHosts, host: str, unit_name: str, cursor: str | None) -> str:
    args = ["journalctl", "-q", "--no-pager", "-o", "cat", "-u", unit_name]
    if cursor is not None:
        args += ["--after-cursor", cursor]
    return hosts.run(host, *args, check=False).stdout


def unit_properties(hosts: VagrantHosts, host: str, unit_name: str) -> dict[str, str]:
    out = hosts.run(
        host,
        "systemctl",
        "show",
        "-p",
        "ActiveState",
        "-p",
        "SubState",
        "-p",
        "Result",
        "-p",
        "ExecMainCode",
        "-p",
        "ExecMainStatus",
        unit_name,
        check=False,
    ).stdout
    return dict(line.partition("=")[::2] for line in out.splitlines() if "=" in line)


def exit_code(props: dict[str, str]) -> int | None:
    """Popen-style exit code from systemd's ExecMainCode/Status (CLD_EXITED=1, KILLED=2,
    DUMPED=3): the status, or -N when signal N ended the main process."""
    code, status = props.get("ExecMainCode", "0"), props.get("ExecMainStatus", "0") or "0"
    if code == "1":
        return int(status)
    if code in ("2", "3"):
        return -int(status)
    # Never ran, or a cleanly stopped unit systemd has already unloaded.
    return 0 if props.get("Result") == "success" else None


@dataclass
class VagrantDaemon:
    """Instance ``name`` as the systemd unit masqued@NAME on VM ``host``."""

    name: str
    host: str
    hosts: VagrantHosts
    cursor: str | None

    @property
    def unit(self) -> str:
        return unit(self.name)

    def state(self) -> str:
        return self.hosts.run(
            self.host, "systemctl", "is-active", self.unit, check=False
        ).stdout.strip()

    def wait_ready(self, timeout: float = 20) -> None:
        # Type=notify: "active" only after READY=1. "activating" is also the state
        # between automatic restarts (Restart=on-failure), so keep waiting then.
        timeout *= self.hosts.scale
        deadline = time.monotonic() + timeout
        state = self.state()
        # "inactive" too, until the queued restart job runs (--no-block).
        while state != "active" and time.monotonic() < deadline:
            if state == "failed":
                break
            time.sleep(0.3)
            state = self.state()
        if state != "active":
            raise AssertionError(
                f"{self.unit} on {self.host} not READY after {timeout}s ({state}):\n"
                + self.log_text()[-4000:]
            )

    def log_text(self) -> str:
        return journal_since(self.hosts, self.host, self.unit, self.cursor)

    def running(self) -> bool:
        return self.state() in ("active", "reloading")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        if sig == signal.SIGTERM:
            self.hosts.run(self.host, "systemctl", "stop", self.unit, check=False, timeout=60)
            return exit_code(unit_properties(self.hosts, self.host, self.unit))
        # Any other signal: deliver it to the main process as a crash would, read how
        # the process ended before systemd's Restart= brings it back, then cancel that
        # restart so the test decides when the instance comes back (as in the namespace
        # lab). ExecStopPost (masqued cleanup) has run by then: ``supervised``.
        self.hosts.run(
            self.host,
            "systemctl",
            "kill",
            "--kill-whom=main",
            "-s",
            signal.Signals(sig).name,
            self.unit,
            check=False,
        )
        deadline = time.monotonic() + timeout * self.hosts.scale
        props = unit_properties(self.hosts, self.host, self.unit)
        while props.get("SubState") in ("running", "stop-sigterm") and time.monotonic() < deadline:
            time.sleep(0.2)
            props = unit_properties(self.hosts, self.host, self.unit)
        self.hosts.run(self.host, "systemctl", "stop", self.unit, check=False, timeout=60)
        return exit_code(props)


# -- the lab ------------------------------------------------------------------------------


@dataclass
class VagrantLab(LabTraffic):
    """``Lab`` on the Vagrant VMs (see the module docstring)."""

    hosts: VagrantHosts
    workdir: Path
    clients: int = 1
    daemons: list[VagrantDaemon] = field(default_factory=list)
    procs: list[LabProcess] = field(default_factory=list)
    saved_configs: dict[str, dict[str, str]] = field(default_factory=dict)
    saved_active: dict[str, list[str]] = field(default_factory=dict)
    interfaces: dict[str, dict[str, str]] = field(default_factory=dict)
    servers_cursor: str | None = None
    spawned: int = 0

    # -- hosts -------------------------------------------------------------------------

    @property
    def pki(self) -> PurePath:
        return PKI_DIR

    @property
    def supervised(self) -> bool:
        return True

    @property
    def time_scale(self) -> float:
        return self.hosts.scale

    @property
    def relay_ns(self) -> str:
        return RELAY

    @property
    def target_ns(self) -> str:
        return TARGET

    def client_ns(self, i: int = 1) -> str:
        return client_host(i)

    @property
    def hostnames(self) -> list[str]:
        return [RELAY, TARGET] + [client_host(i) for i in range(1, self.clients + 1)]

    def expected_addresses(self) -> dict[str, list[str]]:
        """What the Vagrantfile gives each VM (the namespace lab's addresses)."""
        want = {RELAY: [RELAY_V4, RELAY_V6, EGRESS_V4, EGRESS_V6], TARGET: [TARGET_V4, TARGET_V6]}
        for i in range(1, self.clients + 1):
            want[client_host(i)] = [client_addr_v4(i), client_addr_v6(i)]
        return want

    # -- topology ----------------------------------------------------------------------

    def up(self) -> None:
        """Check the VMs; stop the provisioned instances and remember them for down()."""
        if self.clients > self.hosts.client_count:
            raise VagrantError(
                f"this test needs {self.clients} client VMs, the Vagrant lab has "
                f"{self.hosts.client_count} (MASQUED_VAGRANT_CLIENTS={self.clients} vagrant up)"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        for host, addrs in self.expected_addresses().items():
            have = self.hosts.addresses(host)
            missing = [a for a in addrs if str(ipaddress.ip_address(a)) not in have]
            if missing:
                raise VagrantError(
                    f"{host} lacks {', '.join(missing)} (has {', '.join(have) or 'none'}): "
                    "not provisioned? `vagrant provision`"
                )
            self.interfaces[host] = have
        for host in self.hostnames:
            self.hosts.run(host, "mkdir", "-p", str(HELPER_DIR))
            for script in HELPERS:
                text = (REPO / "tests" / "integration" / script).read_text()
                self.hosts.write(host, HELPER_DIR / script, text)
            # Leftovers of an interrupted run first, then the provisioned instances.
            self._stop_spawned(host)
            units = self._masqued_units(host)
            # "activating": started by the previous lab's down() and not READY yet.
            self.saved_active[host] = [u for u, state in units.items() if state in RUNNING]
            if units:
                self.hosts.run(host, "systemctl", "stop", *units, check=False, timeout=120)
                self.hosts.run(host, "systemctl", "reset-failed", *units, check=False)
            self.saved_configs[host] = self._read_configs(host)

    def down(self) -> None:
        """Stop what the tests started; restore the provisioned configs and instances."""
        for host in self.hostnames:
            with contextlib.suppress(Exception):
                self._stop_spawned(host)
            with contextlib.suppress(Exception):
                units = self._masqued_units(host)
                if units:
                    self.hosts.run(host, "systemctl", "stop", *units, check=False, timeout=120)
                    self.hosts.run(host, "systemctl", "reset-failed", *units, check=False)
            if host not in self.saved_configs:
                continue
            with contextlib.suppress(Exception):
                saved = self.saved_configs[host]
                for name in self._read_configs(host):
                    if name not in saved:
                        self.hosts.run(host, "rm", "-f", str(CONF_DIR / name), check=False)
                for name, text in saved.items():
                    self.hosts.write(host, CONF_DIR / name, text)
                if self.saved_active.get(host):
                    self.hosts.run(
                        host, "systemctl", "start", "--no-block", *self.saved_active[host]
                    )
        for p in self.procs:
            if p.poll() is None and isinstance(p, subprocess.Popen):
                p.kill()
                with contextlib.suppress(Exception):
                    p.wait(5)

    def _masqued_units(self, host: str) -> dict[str, str]:
        """{unit: active state} of every loaded masqued@ instance on ``host``."""
        out = self.hosts.run(
            host,
            "systemctl",
            "list-units",
            "--all",
            "--plain",
            "--no-legend",
            "--type=service",
            "masqued@*",
            check=False,
        ).stdout
        units: dict[str, str] = {}
        for line in out.splitlines():
            cols = line.split()
            if len(cols) >= 3 and cols[0].startswith("masqued@"):
                units[cols[0]] = cols[2]
        return units

    def _read_configs(self, host: str) -> dict[str, str]:
        out = self.hosts.run(
            host,
            "find",
            str(CONF_DIR),
            "-maxdepth",
            "1",
            "-name",
            "*.conf",
            "-type",
            "f",
            check=False,
        ).stdout
        configs: dict[str, str] = {}
        for path in sorted(out.split()):
            configs[PurePosixPath(path).name] = self.hosts.run(host, "cat", path).stdout
        return configs

    def _stop_spawned(self, host: str) -> None:
        self.hosts.run(
            host, "systemctl", "stop", f"{SPAWN_PREFIX}*.service", check=False, timeout=60
        )

    # -- commands ----------------------------------------------------------------------

    def run(
        self, ns: str, *cmd: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return self.hosts.run(ns, *cmd, check=check, timeout=timeout)

    def ip(self, ns: str, *args: str) -> str:
        return self.run(ns, "ip", *args).stdout

    def python(self, ns: str) -> str:
        return SYSTEM_PYTHON if ns == TARGET else VENV_PYTHON

    def helper_cmd(self, ns: str, script: str, *args: str) -> list[str]:
        if script not in HELPERS:
            raise ValueError(f"{script} is not a lab helper ({', '.join(HELPERS)})")
        return [self.python(ns), str(HELPER_DIR / script), *args]

    def spawn(
        self, ns: str, *cmd: str, log: Path | None = None, env: dict[str, str] | None = None
    ) -> LabProcess:
        """``cmd`` on ``ns`` as a transient unit; its output goes to the local ``log``."""
        self.spawned += 1
        argv = [
            "systemd-run",
            f"--unit={SPAWN_PREFIX}{self.spawned}-{os.getpid()}",
            "--pipe",
            "--wait",
            "--collect",
            "--quiet",
        ]
        argv += [f"--setenv={k}={v}" for k, v in (env or {}).items()]
        proc = self.hosts.spawn(ns, [*argv, "--", *cmd], log)
        self.procs.append(proc)
        return proc

    def masqued(
        self, ns: str, *args: str, check: bool = False, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return self.run(ns, MASQUED, *args, check=check, timeout=timeout)

    # -- daemons -----------------------------------------------------------------------

    def start_daemon(self, name: str, ns: str, config_text: str, run: str = "") -> VagrantDaemon:
        """(Re)start masqued@NAME on ``ns`` with this config; ``run`` is not needed here
        (the journal cursor tells runs apart) and only kept for the interface."""
        cursor = journal_cursor(self.hosts, ns)
        self.hosts.write(ns, CONF_DIR / f"{name}.conf", config_text)
        self.hosts.run(ns, "systemctl", "reset-failed", unit(name), check=False)
        self.hosts.run(ns, "systemctl", "restart", "--no-block", unit(name))
        daemon = VagrantDaemon(name, ns, self.hosts, cursor)
        self.daemons.append(daemon)
        return daemon

    def forget(self, daemon: LabDaemon) -> None:
        self.daemons[:] = [d for d in self.daemons if d is not daemon]

    def start_servers(self) -> None:
        """(Re)start the target's provisioned servers with the current servers.py."""
        self.servers_cursor = journal_cursor(self.hosts, TARGET)
        self.hosts.run(TARGET, "systemctl", "restart", SERVERS_UNIT)
        deadline = time.monotonic() + 10 * self.time_scale
        while time.monotonic() < deadline:
            out = self.run(TARGET, "ss", "-Hltn", check=False).stdout
            if ":5201" in out:
                return
            time.sleep(0.2)
        raise AssertionError(f"target servers did not start:\n{self.servers_log()}")

    def wait_ping(self, ns: str, addr: str, timeout: float = 20) -> float:
        return super().wait_ping(ns, addr, timeout * self.time_scale)

    def servers_log(self) -> str:
        return journal_since(self.hosts, TARGET, SERVERS_UNIT, self.servers_cursor)

    def egress_interface(self) -> str:
        """The relay's interface towards the target: the one holding EGRESS_V4.

        Not "auto": a VM's default route is Vagrant's management NIC.
        """
        have = self.interfaces.get(RELAY) or self.hosts.addresses(RELAY)
        try:
            return have[EGRESS_V4]
        except KeyError:
            raise VagrantError(f"relay has no {EGRESS_V4}") from None

    def relay_config(
        self, *, pool: Sequence[str] = (POOL_V4, POOL_V6), nat: str = "auto", extra: str = ""
    ) -> str:
        pool_list = ", ".join(f'"{p}"' for p in pool)
        return (
            'mode = "relay"\n'
            'listen = "0.0.0.0:4433"\n'
            f'certificate = "{PKI_DIR / "relay.example.pem"}"\n'
            f'private_key = "{PKI_DIR / "relay.example.key"}"\n'
            f"pool = [{pool_list}]\n"
            f'egress = "{self.egress_interface()}"\n'
            f'nat = "{nat}"\n'
            "mtu = 1300\n" + ("" if "log_level" in extra else 'log_level = "debug"\n') + extra
            # The namespace lab runs `masqued run --log-level debug`; the unit reads it here.
        )

    def client_config(
        self,
        *,
        routes: Sequence[str] = (TARGET_NET_V4, TARGET_NET_V6),
        relay: str = f"{RELAY_V4}:4433",
        extra: str = "",
    ) -> str:
        route_list = ", ".join(f'"{r}"' for r in routes)
        return (
            'mode = "client"\n'
            f'relay = "{relay}"\n'
            'server_name = "relay.example"\n'
            f'ca = "{PKI_DIR / "ca.pem"}"\n'
            f"routes = [{route_list}]\n"
            "mtu = 1300\n" + ("" if "log_level" in extra else 'log_level = "debug"\n') + extra
        )

    # -- host state --------------------------------------------------------------------

    def leftovers(self, ns: str) -> list[str]:
        """Everything of masqued's still present on VM ``ns`` (empty when clean)."""
        found: list[str] = []
        for link in json.loads(self.ip(ns, "-j", "link", "show") or "[]"):
            if str(link.get("ifname", "")).startswith("mq-"):
                found.append(f"link {link['ifname']}")
        return found + self.routing_leftovers(ns)
