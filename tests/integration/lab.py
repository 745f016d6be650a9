"""The namespace lab (docs/architecture.md §5): real namespaces, veths, daemons and servers.

Also the lab interface (``Lab``, ``LabDaemon``) that the end-to-end tests are written
against: ``NamespaceLab`` here, ``VagrantLab`` (tests/integration/vagrant_lab.py) runs
the same tests on the Vagrantfile's VMs. A "namespace" argument (``ns``) names a host
of the lab: a network namespace here, a VM there.

    mq-<t>-c1..cN (198.18.1.10+N) --bridge-- mq-<t>-relay (198.18.1.1 | 198.19.0.1)
        --veth-- mq-<t>-target (198.19.0.2)
    IPv6: 2001:db8:1::/64 on the client side, 2001:db8:19::/64 on the target side.
    Client pool: 198.18.200.0/24 and 2001:db8:200::/64 (NAT44 and NAT66 on the relay).

Only addresses from 198.18.0.0/15 and 2001:db8::/32. Everything is removed in
``down()``, which fixtures call also when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Protocol

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

# The QUIC engine and event loop of the lab's daemons (README, Testing): configs that
# name none get these. A relay whose config asks for client certificates (auth
# "mtls") stays on aioquic, which can ask for them over HTTP/3; qh3 cannot.
QUIC_ENGINE = os.environ.get("MASQUED_QUIC_ENGINE", "")
EVENT_LOOP = os.environ.get("MASQUED_EVENT_LOOP", "")


def engine_lines(extra: str, relay: bool) -> str:
    """The quic_engine / event_loop lines a lab config gets (none if it sets its own)."""
    lines = ""
    if QUIC_ENGINE and "quic_engine" not in extra and not (relay and "mtls" in extra):
        lines += f'quic_engine = "{QUIC_ENGINE}"\n'
    if EVENT_LOOP and "event_loop" not in extra:
        lines += f'event_loop = "{EVENT_LOOP}"\n'
    return lines


RELAY_V4 = "198.18.1.1"
RELAY_V6 = "2001:db8:1::1"
EGRESS_V4 = "198.19.0.1"
EGRESS_V6 = "2001:db8:19::1"
TARGET_V4 = "198.19.0.2"
TARGET_V6 = "2001:db8:19::2"
POOL_V4 = "198.18.200.0/24"
POOL_V6 = "2001:db8:200::/64"
TARGET_NET_V4 = "198.19.0.0/24"
TARGET_NET_V6 = "2001:db8:19::/64"


def sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout)


def client_addr_v4(i: int) -> str:
    return f"198.18.1.{10 + i}"


def client_addr_v6(i: int) -> str:
    return f"2001:db8:1::{10 + i:x}"


class LabDaemon(Protocol):
    """One masqued instance a lab started (a process here, a systemd unit on a VM)."""

    name: str

    def wait_ready(self, timeout: float = 20) -> None:
        """Return once the instance told its supervisor READY=1; raise with its log if not."""

    def log_text(self) -> str:
        """Everything this instance logged since the lab started it."""
        ...

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        """Stop it with ``sig`` (SIGKILL: a crash); its exit code, -N for signal N."""
        ...

    def running(self) -> bool:
        """The daemon's main process is alive."""
        ...


class LabProcess(Protocol):
    """A command started in the background by ``Lab.spawn`` (subprocess.Popen-like)."""

    def wait(self, timeout: float | None = None) -> int: ...

    def poll(self) -> int | None: ...


class Lab(Protocol):
    """What an end-to-end test may use: hosts, commands on them, daemons, servers.

    Hosts are named by ``relay_ns``, ``target_ns`` and ``client_ns(i)``; addresses are
    the module constants (RELAY_V4, EGRESS_V4, TARGET_V4, client_addr_v4(i), ...),
    which both labs use.
    """

    workdir: Path
    clients: int

    @property
    def pki(self) -> PurePath:
        """Directory with ca.pem and relay.example.pem/.key, as seen on the lab's hosts."""
        ...

    @property
    def supervised(self) -> bool:
        """Daemons run under systemd (masqued@NAME): a crash is cleaned up by ExecStopPost."""
        ...

    @property
    def time_scale(self) -> float:
        """How much slower than the namespace lab the hosts are (waits and time limits
        are multiplied by it; VMs under TCG: about 10)."""
        ...

    @property
    def daemons(self) -> Sequence[LabDaemon]: ...

    @property
    def relay_ns(self) -> str: ...

    @property
    def target_ns(self) -> str: ...

    def client_ns(self, i: int = 1) -> str: ...

    def up(self) -> None: ...

    def down(self) -> None: ...

    def run(
        self, ns: str, *cmd: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]: ...

    def ip(self, ns: str, *args: str) -> str: ...

    def spawn(
        self, ns: str, *cmd: str, log: Path | None = None, env: dict[str, str] | None = None
    ) -> LabProcess: ...

    def helper_cmd(self, ns: str, script: str, *args: str) -> list[str]:
        """The command line running tests/integration/``script`` on host ``ns``."""
        ...

    def start_daemon(self, name: str, ns: str, config_text: str, run: str = "") -> LabDaemon: ...

    def forget(self, daemon: LabDaemon) -> None:
        """Drop ``daemon`` from ``daemons`` (it was stopped and replaced by the test)."""

    def start_servers(self) -> None: ...

    def servers_log(self) -> str: ...

    def relay_config(
        self, *, pool: Sequence[str] = ..., nat: str = "auto", extra: str = ""
    ) -> str: ...

    def client_config(
        self, *, routes: Sequence[str] = ..., relay: str = ..., extra: str = ""
    ) -> str: ...

    def masqued(
        self, ns: str, *args: str, check: bool = False, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]: ...

    def ping(
        self, ns: str, addr: str, count: int = 3, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]: ...

    def wait_ping(self, ns: str, addr: str, timeout: float = 20) -> float: ...

    def traffic(self, ns: str, *args: str, timeout: float = 120) -> str: ...

    def leftovers(self, ns: str) -> list[str]: ...


class LabTraffic:
    """Ping, the traffic client and the host-state check, for any lab: only its
    ``run``, ``ip`` and ``helper_cmd``."""

    def routing_leftovers(self: Lab, ns: str, legacy: bool = True) -> list[str]:
        """masqued's policy rules, routes (proto 109), nft tables and (``legacy``)
        iptables-legacy NAT chains still on ``ns``; links are each lab's own affair."""
        found: list[str] = []
        for fam in ("-4", "-6"):
            for line in self.ip(ns, fam, "rule", "show").splitlines():
                if line.startswith(("5209:", "5210:")):
                    found.append(f"rule {line.strip()}")
            for line in self.ip(ns, fam, "route", "show", "table", "all").splitlines():
                if "proto 109" in line:
                    found.append(f"route {line.strip()}")
        nft = self.run(ns, "nft", "list", "tables", check=False).stdout
        found += [f"nft {line}" for line in nft.splitlines() if "masqued" in line]
        if legacy:
            for tool in ("iptables-legacy", "ip6tables-legacy"):
                out = self.run(ns, tool, "-t", "nat", "-S", check=False).stdout
                found += [f"{tool} {line}" for line in out.splitlines() if "MASQUED" in line]
        return found

    def ping(
        self: Lab, ns: str, addr: str, count: int = 3, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return self.run(
            ns, "ping", "-c", str(count), "-i", "0.2", "-W", "2", addr, check=False, timeout=timeout
        )

    def wait_ping(self: Lab, ns: str, addr: str, timeout: float = 20) -> float:
        """Ping until one reply arrives; return seconds waited."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            res = self.run(ns, "ping", "-c", "1", "-W", "1", addr, check=False, timeout=10)
            if res.returncode == 0:
                return time.monotonic() - start
        raise AssertionError(f"no ping reply from {addr} in {ns} within {timeout}s")

    def traffic(self: Lab, ns: str, *args: str, timeout: float = 120) -> str:
        """Run the traffic client (tests/integration/traffic.py) on ``ns``."""
        res = self.run(ns, *self.helper_cmd(ns, "traffic.py", *args), check=False, timeout=timeout)
        if res.returncode != 0:
            raise AssertionError(f"traffic {args} failed on {ns}: {res.stdout}\n{res.stderr}")
        return res.stdout.strip()


class NotifyListener:
    """An AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def wait_for(self, line: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(line in m.split("\n") for m in self.messages):
                return True
            with contextlib.suppress(TimeoutError, socket.timeout):
                self.messages.append(self.sock.recv(4096).decode())
        return any(line in m.split("\n") for m in self.messages)

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@dataclass
class Daemon:
    name: str
    ns: str
    config: Path
    log: Path
    proc: subprocess.Popen[bytes]
    notify: NotifyListener

    def wait_ready(self, timeout: float = 20) -> None:
        ok = self.notify.wait_for("READY=1", timeout)
        if not ok:
            raise AssertionError(
                f"{self.name} not READY after {timeout}s (exit {self.proc.poll()}):\n"
                + self.log_text()
            )

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.notify.close()
        return self.proc.returncode

    def running(self) -> bool:
        return self.proc.poll() is None


@dataclass
class NamespaceLab(LabTraffic):
    """Creates the namespaces; runs daemons and servers inside them."""

    workdir: Path
    pki: Path
    clients: int = 1
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    daemons: list[Daemon] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def relay_ns(self) -> str:
        return f"mq-{self.tag}-relay"

    @property
    def target_ns(self) -> str:
        return f"mq-{self.tag}-target"

    def client_ns(self, i: int = 1) -> str:
        return f"mq-{self.tag}-c{i}"

    @property
    def supervised(self) -> bool:
        """Daemons are plain child processes: nothing cleans up after a crash."""
        return False

    @property
    def time_scale(self) -> float:
        return 1.0

    @property
    def namespaces(self) -> list[str]:
        return [self.relay_ns, self.target_ns] + [
            self.client_ns(i) for i in range(1, self.clients + 1)
        ]

    # -- topology -------------------------------------------------------------------

    def up(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        r, t = self.relay_ns, self.target_ns
        for ns in self.namespaces:
            sh("ip", "netns", "add", ns)
            self.ip(ns, "link", "set", "lo", "up")
        # relay <-> target
        sh(
            "ip",
            "link",
            "add",
            "mq-r-t",
            "netns",
            r,
            "type",
            "veth",
            "peer",
            "name",
            "mq-t-r",
            "netns",
            t,
        )
        self.ip(r, "addr", "add", f"{EGRESS_V4}/24", "dev", "mq-r-t")
        self.ip(r, "-6", "addr", "add", f"{EGRESS_V6}/64", "dev", "mq-r-t", "nodad")
        self.ip(t, "addr", "add", f"{TARGET_V4}/24", "dev", "mq-t-r")
        self.ip(t, "-6", "addr", "add", f"{TARGET_V6}/64", "dev", "mq-t-r", "nodad")
        self.ip(r, "link", "set", "mq-r-t", "up")
        self.ip(t, "link", "set", "mq-t-r", "up")
        # The relay's default route points at the target's side: that is its egress
        # for `egress = "auto"`. The target has no route back to the client pool, so
        # only NAT makes replies come back.
        self.ip(r, "route", "add", "default", "via", TARGET_V4)
        self.ip(r, "-6", "route", "add", "default", "via", TARGET_V6)
        # clients <-> relay, over a bridge in the relay namespace
        self.ip(r, "link", "add", "mq-br", "type", "bridge")
        self.ip(r, "addr", "add", f"{RELAY_V4}/24", "dev", "mq-br")
        self.ip(r, "-6", "addr", "add", f"{RELAY_V6}/64", "dev", "mq-br", "nodad")
        self.ip(r, "link", "set", "mq-br", "up")
        for i in range(1, self.clients + 1):
            c = self.client_ns(i)
            sh(
                "ip",
                "link",
                "add",
                "mq-c-r",
                "netns",
                c,
                "type",
                "veth",
                "peer",
                "name",
                f"mq-r-c{i}",
                "netns",
                r,
            )
            self.ip(r, "link", "set", f"mq-r-c{i}", "master", "mq-br", "up")
            self.ip(c, "addr", "add", f"{client_addr_v4(i)}/24", "dev", "mq-c-r")
            self.ip(c, "-6", "addr", "add", f"{client_addr_v6(i)}/64", "dev", "mq-c-r", "nodad")
            self.ip(c, "link", "set", "mq-c-r", "up")

    def down(self) -> None:
        for d in self.daemons:
            with contextlib.suppress(Exception):
                d.stop(signal.SIGKILL, timeout=5)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                with contextlib.suppress(Exception):
                    p.wait(5)
        for ns in self.namespaces:
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for ns in self.namespaces:
            sh("ip", "netns", "del", ns, check=False)

    # -- helpers ----------------------------------------------------------------------

    def ip(self, ns: str, *args: str) -> str:
        return sh("ip", "-n", ns, *args).stdout

    def run(
        self, ns: str, *cmd: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", ns, *cmd, check=check, timeout=timeout)

    def spawn(
        self, ns: str, *cmd: str, log: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        out = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *cmd],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        self.procs.append(proc)
        return proc

    def start_daemon(self, name: str, ns: str, config_text: str, run: str = "") -> Daemon:
        """Start ``masqued run`` for instance ``name``; ``run`` tells apart restarts."""
        confdir = self.workdir / (run or "conf")
        confdir.mkdir(exist_ok=True)
        config = confdir / f"{name}.conf"
        config.write_text(config_text)
        config.chmod(0o600)
        log = self.workdir / f"{name}{run}.log"
        sock_path = self.workdir / f"{name}-{secrets.token_hex(3)}.notify"
        notify = NotifyListener(sock_path)
        proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                ns,
                PYTHON,
                "-m",
                "masqued",
                "run",
                "--config",
                str(config),
                "--log-level",
                "debug",
            ],
            stdout=open(log, "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            env={
                **os.environ,
                "NOTIFY_SOCKET": str(sock_path),
                "PYTHONUNBUFFERED": "1",
                "MASQUED_RUN_DIR": str(self.run_dir),
            },
            cwd=REPO,
        )
        daemon = Daemon(name, ns, config, log, proc, notify)
        self.daemons.append(daemon)
        return daemon

    def start_servers(self) -> None:
        """TCP sink/hash server and UDP echo on the target, v4 and v6."""
        self.spawn(
            self.target_ns,
            PYTHON,
            str(REPO / "tests" / "integration" / "servers.py"),
            log=self.workdir / "servers.log",
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            out = self.run(self.target_ns, "ss", "-Hltn", check=False).stdout
            if ":5201" in out:
                return
            time.sleep(0.1)
        raise AssertionError("target servers did not start")

    def relay_config(
        self, *, pool: Sequence[str] = (POOL_V4, POOL_V6), nat: str = "auto", extra: str = ""
    ) -> str:
        pki = self.pki
        pool_list = ", ".join(f'"{p}"' for p in pool)
        return (
            'mode = "relay"\n'
            'listen = "0.0.0.0:4433"\n'
            f'certificate = "{pki / "relay.example.pem"}"\n'
            f'private_key = "{pki / "relay.example.key"}"\n'
            f"pool = [{pool_list}]\n"
            'egress = "auto"\n'
            f'nat = "{nat}"\n'
            "mtu = 1300\n" + engine_lines(extra, True) + extra
        )

    def client_config(
        self,
        *,
        routes: Sequence[str] = (TARGET_NET_V4, TARGET_NET_V6),
        relay: str = f"{RELAY_V4}:4433",
        extra: str = "",
    ) -> str:
        pki = self.pki
        route_list = ", ".join(f'"{r}"' for r in routes)
        return (
            'mode = "client"\n'
            f'relay = "{relay}"\n'
            'server_name = "relay.example"\n'
            f'ca = "{pki / "ca.pem"}"\n'
            f"routes = [{route_list}]\n"
            "mtu = 1300\n" + engine_lines(extra, False) + extra
        )

    @property
    def run_dir(self) -> Path:
        """Control sockets of this lab's daemons (``MASQUED_RUN_DIR``): per lab, so that
        parallel runs with the same instance names do not meet in /run/masqued."""
        return self.workdir / "run"

    def masqued(
        self, ns: str, *args: str, check: bool = False, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run the ``masqued`` CLI (status, doctor, ...) in ``ns`` against this lab's daemons."""
        return subprocess.run(
            ["ip", "netns", "exec", ns, PYTHON, "-m", "masqued", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            cwd=REPO,
            env={**os.environ, "MASQUED_RUN_DIR": str(self.run_dir)},
        )

    def helper_cmd(self, ns: str, script: str, *args: str) -> list[str]:
        return [PYTHON, str(REPO / "tests" / "integration" / script), *args]

    def forget(self, daemon: LabDaemon) -> None:
        self.daemons[:] = [d for d in self.daemons if d is not daemon]

    def servers_log(self) -> str:
        """What the target's servers printed (one line per UDP datagram)."""
        try:
            return (self.workdir / "servers.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- impairment -------------------------------------------------------------------------

    def add_loss(self, i: int, percent: float, port: int = 4433) -> str:
        """Random loss of ``percent`` on the relay <-> client ``i`` link, both directions.

        ``tc netem loss`` on both ends of the veth when the kernel has sch_netem; else
        an nftables rule with ``numgen random`` in the client namespace dropping the
        same share of the QUIC packets each way (same effect: independent random
        loss). Returns which method is in place. Removed with the namespaces.
        """
        c, r = self.client_ns(i), self.relay_ns
        res = self.run(
            c,
            "tc",
            "qdisc",
            "add",
            "dev",
            "mq-c-r",
            "root",
            "netem",
            "loss",
            f"{percent}%",
            check=False,
        )
        if res.returncode == 0:
            self.run(
                r, "tc", "qdisc", "add", "dev", f"mq-r-c{i}", "root", "netem", "loss", f"{percent}%"
            )
            return "netem"
        per_mille = round(percent * 10)
        script = (
            "table inet mq_loss {\n"
            " chain out { type filter hook output priority 0;"
            f" udp dport {port} numgen random mod 1000 < {per_mille} counter drop; }}\n"
            " chain in { type filter hook input priority 0;"
            f" udp sport {port} numgen random mod 1000 < {per_mille} counter drop; }}\n"
            "}\n"
        )
        subprocess.run(
            ["ip", "netns", "exec", c, "nft", "-f", "-"],
            input=script,
            text=True,
            check=True,
            capture_output=True,
            timeout=30,
        )
        return "nftables"

    def block_udp(self, i: int, port: int = 4433) -> None:
        """Client ``i``'s network drops UDP to the relay's port (nftables in its own
        namespace, both directions), as hotel and office networks do; TCP passes."""
        script = (
            "table inet mq_block_udp {\n"
            " chain out { type filter hook output priority 0;"
            f" udp dport {port} counter drop; }}\n"
            " chain in { type filter hook input priority 0;"
            f" udp sport {port} counter drop; }}\n"
            "}\n"
        )
        subprocess.run(
            ["ip", "netns", "exec", self.client_ns(i), "nft", "-f", "-"],
            input=script,
            text=True,
            check=True,
            capture_output=True,
            timeout=30,
        )

    def unblock_udp(self, i: int) -> None:
        self.run(self.client_ns(i), "nft", "delete", "table", "inet", "mq_block_udp", check=False)

    def udp_blocked_count(self, i: int) -> int:
        """Packets the block dropped so far (its two counters)."""
        out = self.run(
            self.client_ns(i), "nft", "list", "table", "inet", "mq_block_udp", check=False
        ).stdout
        return sum(int(n) for n in re.findall(r"counter packets (\d+)", out))

    def remove_loss(self, i: int) -> None:
        c, r = self.client_ns(i), self.relay_ns
        self.run(c, "tc", "qdisc", "del", "dev", "mq-c-r", "root", check=False)
        self.run(r, "tc", "qdisc", "del", "dev", f"mq-r-c{i}", "root", check=False)
        self.run(c, "nft", "delete", "table", "inet", "mq_loss", check=False)

    # -- host state -------------------------------------------------------------------------

    def leftovers(self, ns: str) -> list[str]:
        """Everything of ours still present in ``ns`` (empty when clean)."""
        found: list[str] = []
        links = self.ip(ns, "-o", "link", "show")
        for line in links.splitlines():
            name = line.split(":")[1].strip().split("@")[0]
            if (
                name.startswith("mq-")
                and name not in ("mq-br", "mq-r-t", "mq-t-r", "mq-c-r")
                and not name.startswith("mq-r-c")
            ):
                found.append(f"link {name}")
        return found + self.routing_leftovers(ns, legacy=bool(shutil.which("iptables-legacy")))


@contextlib.contextmanager
def lab(workdir: Path, pki: Path, clients: int = 1) -> Iterator[NamespaceLab]:
    the_lab = NamespaceLab(workdir, pki, clients)
    try:
        the_lab.up()
        yield the_lab
    finally:
        the_lab.down()
