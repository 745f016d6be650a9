"""The benchmark's namespace lab: the shape of tests/integration/lab.py (docs/architecture.md §5).

    mq-b<tag>-c1..cN (198.18.1.10+i) --bridge-- mq-b<tag>-relay (198.18.1.1 | 198.19.0.1)
        --veth-- mq-b<tag>-target (198.19.0.2)

Client pool 198.18.200.0/24. Only IPv4 traffic is measured. Only addresses from
198.18.0.0/15; nothing is changed in the root namespace. ``down()`` kills every process
left in the lab's namespaces and deletes them; the harness calls it on success, failure
and Ctrl-C, and ``sweep_stale()`` removes what a killed harness left behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

RELAY_V4 = "198.18.1.1"
CLIENT_NET_V4 = "198.18.1.0/24"
EGRESS_V4 = "198.19.0.1"
TARGET_V4 = "198.19.0.2"
TARGET_NET_V4 = "198.19.0.0/24"
POOL_V4 = "198.18.200.0/24"
RELAY_PORT = 4433
MAX_CLIENTS = 200  # 198.18.1.11 .. 198.18.1.210

# Bench namespaces are "mq-b" + 4 hex digits; the integration tests use 4 hex digits
# without the "b", so the sweeper never touches a test's lab.
_BENCH_NS = re.compile(r"^mq-b[0-9a-f]{4}-(relay|target|c\d+)$")


def sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output as text."""
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout)


def client_addr_v4(i: int) -> str:
    return f"198.18.1.{10 + i}"


def list_namespaces() -> list[str]:
    out = sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def kill_namespace(ns: str) -> None:
    """SIGKILL every process in ``ns`` and delete it."""
    pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
            os.kill(int(pid), signal.SIGKILL)
    sh("ip", "netns", "del", ns, check=False)


def sweep_stale() -> list[str]:
    """Delete bench namespaces left by a harness that was killed (call with the lock held)."""
    stale = [ns for ns in list_namespaces() if _BENCH_NS.match(ns)]
    for ns in stale:
        kill_namespace(ns)
    return stale


class NotifyListener:
    """An AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.ready_at: float | None = None

    def drain(self) -> None:
        """Read every queued message; note when READY=1 first arrived."""
        while True:
            try:
                msg = self.sock.recv(4096).decode(errors="replace")
            except BlockingIOError:
                return
            if self.ready_at is None and "READY=1" in msg.split("\n"):
                self.ready_at = time.monotonic()

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@dataclass
class Daemon:
    """One ``masqued run`` process in a namespace."""

    name: str
    ns: str
    log: Path
    proc: subprocess.Popen[bytes]
    notify: NotifyListener
    started_at: float

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 10) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.notify.close()
        return self.proc.returncode


class NotReady(Exception):
    """A daemon did not report READY=1 in time."""


def wait_ready(daemons: list[Daemon], timeout: float) -> None:
    """Wait until every daemon has sent READY=1 (each one's ``notify.ready_at`` is set)."""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        for d in daemons:
            d.notify.drain()
            if d.notify.ready_at is None:
                sel.register(d.notify.sock, selectors.EVENT_READ, d)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for key, _ in sel.select(min(left, 0.5)):
                d = key.data
                d.notify.drain()
                if d.notify.ready_at is not None:
                    sel.unregister(key.fileobj)
            for d in daemons:
                if d.notify.ready_at is None and not d.alive():
                    raise NotReady(f"{d.name} exited {d.proc.returncode}:\n{d.log_tail()}")
    late = [d for d in daemons if d.notify.ready_at is None]
    if late:
        raise NotReady(
            f"{len(late)} of {len(daemons)} not READY after {timeout:.0f}s "
            f"(first: {late[0].name}):\n{late[0].log_tail()}"
        )


@dataclass
class Lab:
    """Namespaces, veths and the processes started in them."""

    workdir: Path
    pki: Path
    clients: int = 1
    tag: str = field(default_factory=lambda: "b" + secrets.token_hex(2))
    daemons: list[Daemon] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    created: list[str] = field(default_factory=list)

    @property
    def relay_ns(self) -> str:
        return f"mq-{self.tag}-relay"

    @property
    def target_ns(self) -> str:
        return f"mq-{self.tag}-target"

    def client_ns(self, i: int = 1) -> str:
        return f"mq-{self.tag}-c{i}"

    # -- topology ---------------------------------------------------------------------

    def up(self) -> None:
        if not 1 <= self.clients <= MAX_CLIENTS:
            raise ValueError(f"clients must be 1..{MAX_CLIENTS}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        r, t = self.relay_ns, self.target_ns
        for ns in [r, t] + [self.client_ns(i) for i in range(1, self.clients + 1)]:
            sh("ip", "netns", "add", ns)
            self.created.append(ns)
            self.ip(ns, "link", "set", "lo", "up")
        # `ip link add A netns X type veth peer name B netns Y` creates both ends
        # directly in their namespaces: no name ever appears in the root namespace.
        sh(
            *("ip", "link", "add", "mq-r-t", "netns", r, "type", "veth"),
            *("peer", "name", "mq-t-r", "netns", t),
        )
        self.ip(r, "addr", "add", f"{EGRESS_V4}/24", "dev", "mq-r-t")
        self.ip(t, "addr", "add", f"{TARGET_V4}/24", "dev", "mq-t-r")
        self.ip(r, "link", "set", "mq-r-t", "up")
        self.ip(t, "link", "set", "mq-t-r", "up")
        # The relay's default route is its egress for `egress = "auto"`; the target has
        # no route back to the clients, so only NAT brings replies back.
        self.ip(r, "route", "add", "default", "via", TARGET_V4)
        self.ip(r, "link", "add", "mq-br", "type", "bridge")
        self.ip(r, "addr", "add", f"{RELAY_V4}/24", "dev", "mq-br")
        self.ip(r, "link", "set", "mq-br", "up")
        for i in range(1, self.clients + 1):
            c = self.client_ns(i)
            sh(
                *("ip", "link", "add", "mq-c-r", "netns", c, "type", "veth"),
                *("peer", "name", f"mq-r-c{i}", "netns", r),
            )
            self.ip(r, "link", "set", f"mq-r-c{i}", "master", "mq-br", "up")
            self.ip(c, "addr", "add", f"{client_addr_v4(i)}/24", "dev", "mq-c-r")
            self.ip(c, "link", "set", "mq-c-r", "up")

    def enable_direct_path(self) -> None:
        """Route client <-> target through the relay namespace without a tunnel."""
        self.run(self.relay_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for i in range(1, self.clients + 1):
            self.ip(self.client_ns(i), "route", "add", TARGET_NET_V4, "via", RELAY_V4)
        self.ip(self.target_ns, "route", "add", CLIENT_NET_V4, "via", EGRESS_V4)

    def down(self) -> None:
        for d in self.daemons:
            with contextlib.suppress(Exception):
                d.stop(timeout=5)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                with contextlib.suppress(Exception):
                    p.wait(5)
        for ns in self.created:
            kill_namespace(ns)
        self.created.clear()

    # -- helpers ----------------------------------------------------------------------

    def ip(self, ns: str, *args: str) -> str:
        return sh("ip", "-n", ns, *args).stdout

    def run(
        self, ns: str, *cmd: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", ns, *cmd, check=check, timeout=timeout)

    def spawn(self, ns: str, *cmd: str, log: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``cmd`` in ``ns`` in its own session (Ctrl-C reaches only the harness)."""
        out = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *cmd],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if log is not None:
            out.close()  # type: ignore[union-attr]
        self.procs.append(proc)
        return proc

    def start_daemon(self, name: str, ns: str, config_text: str) -> Daemon:
        """Start ``masqued run`` for instance ``name`` with readiness via NOTIFY_SOCKET."""
        confdir = self.workdir / "conf"
        confdir.mkdir(exist_ok=True)
        config = confdir / f"{name}.conf"
        config.write_text(config_text)
        config.chmod(0o600)
        log = self.workdir / f"{name}.log"
        notify = NotifyListener(self.workdir / f"{name}-{secrets.token_hex(3)}.notify")
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [
                    *("ip", "netns", "exec", ns, PYTHON, "-m", "masqued", "run"),
                    *("--config", str(config), "--log-level", "info"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "NOTIFY_SOCKET": str(notify.path), "PYTHONUNBUFFERED": "1"},
                cwd=REPO,
                start_new_session=True,
            )
        daemon = Daemon(name, ns, log, proc, notify, time.monotonic())
        self.daemons.append(daemon)
        return daemon

    def relay_config(self, mtu: int, port: int = RELAY_PORT, pool: str = POOL_V4) -> str:
        return (
            'mode = "relay"\n'
            f'listen = "0.0.0.0:{port}"\n'
            f'certificate = "{self.pki / "relay.example.pem"}"\n'
            f'private_key = "{self.pki / "relay.example.key"}"\n'
            f'pool = ["{pool}"]\n'
            'egress = "auto"\n'
            'nat = "auto"\n'
            f"mtu = {mtu}\n"
        )

    def client_config(self, mtu: int, transport: str = "stream", port: int = RELAY_PORT) -> str:
        return client_config(self.pki, mtu, transport, port)

    def wait_ping(self, ns: str, addr: str, timeout: float = 15) -> None:
        """Ping until one reply arrives (the path works end to end)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            res = self.run(ns, "ping", "-c", "1", "-W", "1", addr, check=False, timeout=5)
            if res.returncode == 0:
                return
        raise NotReady(f"no ping reply from {addr} in {ns} within {timeout:.0f}s")


def client_config(pki: Path, mtu: int, transport: str = "stream", port: int = RELAY_PORT) -> str:
    """A client config for the lab (only the target network goes through the tunnel).
    ``transport`` "h2": datagram mode over HTTP/2 (TLS over TCP) on the relay's port."""
    http = ""
    if transport == "h2":
        transport, http = "datagram", 'http_version = "h2"\n'
    return (
        'mode = "client"\n'
        f'relay = "{RELAY_V4}:{port}"\n'
        'server_name = "relay.example"\n'
        f'ca = "{pki / "ca.pem"}"\n'
        f'routes = ["{TARGET_NET_V4}"]\n'
        f'transport = "{transport}"\n'
        f"{http}"
        f"mtu = {mtu}\n"
    )
