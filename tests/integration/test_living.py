"""Issue 20: a client people can live on — DNS through the tunnel, the kill switch,
hooks, and DNS pushed by the relay — with real daemons in the namespace lab.

The client runs under ``ip netns exec``, which bind-mounts /etc/netns/NS/resolv.conf
over /etc/resolv.conf: what the client rewrites is that file, never this machine's
(a guard checks the machine's own /etc/resolv.conf is byte-identical afterwards).
The resolver is on the target, reachable only through the tunnel (the target has
no route to the clients' network; the relay's NAT makes the answers come back).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from masqued.host.naming import InstanceIds
from tests.integration.lab import (
    EGRESS_V4,
    PYTHON,
    RELAY_V4,
    RELAY_V6,
    TARGET_V4,
    NamespaceLab,
)

ORIGINAL = b"# the client's own network\nnameserver 198.18.1.1\noptions timeout:1 attempts:2\n"
NAME = "www.corp.example"
# What a connect dropped by the kill switch gives (nft drop in output: the SYN never
# leaves, connect() times out or gets EPERM).
BLOCKED = ("TimeoutError None", "PermissionError 1")


@pytest.fixture
def lab20(pki_dir: Path, tmp_path: Path) -> Iterator[NamespaceLab]:
    """The namespace lab, named mq-20-XX-*, with the client's resolv.conf."""
    host_before = Path("/etc/resolv.conf").read_bytes()
    the_lab = NamespaceLab(tmp_path, pki_dir, 1, tag=f"20-{secrets.token_hex(1)}")
    netns_dir = Path("/etc/netns") / the_lab.client_ns(1)
    try:
        the_lab.up()
        netns_dir.mkdir(parents=True)
        (netns_dir / "resolv.conf").write_bytes(ORIGINAL)
        yield the_lab
    finally:
        the_lab.down()
        shutil.rmtree(netns_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            Path("/etc/netns").rmdir()  # only if empty
        # The machine's own resolver configuration was never touched.
        assert Path("/etc/resolv.conf").read_bytes() == host_before


def client_resolv(lab: NamespaceLab) -> bytes:
    return (Path("/etc/netns") / lab.client_ns(1) / "resolv.conf").read_bytes()


def start_dns_server(lab: NamespaceLab) -> Path:
    log = lab.workdir / "dns.log"
    t = lab.target_ns
    lab.spawn(t, *lab.helper_cmd(t, "dnsserver.py", TARGET_V4, NAME, TARGET_V4), log=log)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if log.exists() and "listening" in log.read_text():
            return log
        time.sleep(0.1)
    raise AssertionError("dns server did not start")


def wait_for(cond: object, timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"not reached: {what}")


def getent(lab: NamespaceLab, name: str) -> str:
    return lab.run(lab.client_ns(1), "getent", "hosts", name, check=False, timeout=20).stdout


def status(lab: NamespaceLab, name: str) -> dict[str, object]:
    out = lab.masqued(lab.client_ns(1), "status", name, "--json", check=True)
    doc: dict[str, object] = json.loads(out.stdout)
    return doc


def tcp(lab: NamespaceLab, addr: str, port: int, mark: int = 0) -> str:
    """Connect from the client namespace: "ok", "refused", or the error."""
    script = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)\n"
        "m=int(sys.argv[3])\n"
        "m and s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, m)\n"
        "s.settimeout(1.5)\n"
        "try:\n s.connect((sys.argv[1], int(sys.argv[2]))); print('ok')\n"
        "except ConnectionRefusedError: print('refused')\n"
        "except OSError as e: print(type(e).__name__, e.errno)\n"
    )
    c = lab.client_ns(1)
    return lab.run(c, PYTHON, "-c", script, addr, str(port), str(mark), check=False).stdout.strip()


def test_dns_goes_through_the_tunnel_and_comes_back_byte_for_byte(lab20: NamespaceLab) -> None:
    lab = lab20
    c = lab.client_ns(1)
    dns_log = start_dns_server(lab)
    relay = lab.start_daemon("relay", lab.relay_ns, lab.relay_config())
    relay.wait_ready()
    extra = f'dns = ["{TARGET_V4}"]\ndns_search = ["corp.example"]\n'
    client = lab.start_daemon("c1", c, lab.client_config(extra=extra))
    client.wait_ready()
    wait_for(lambda: client_resolv(lab) != ORIGINAL, what="resolv.conf rewritten")
    text = client_resolv(lab).decode()
    assert f"nameserver {TARGET_V4}" in text and "search corp.example" in text
    assert "DNS through file" in client.log_text()
    assert "[#] write /etc/resolv.conf" in client.log_text()
    # A short name through the search domain, answered by the resolver on the target,
    # which saw the query come from the relay's egress address (through the tunnel).
    assert NAME in getent(lab, "www")
    assert any(line.endswith(f"from {EGRESS_V4}") for line in dns_log.read_text().splitlines())
    doc = status(lab, "c1")
    dns = doc["dns"]
    assert isinstance(dns, dict)
    assert dns["state"] == "applied" and dns["backend"] == "file" and dns["error"] is None
    assert dns["servers"] == [TARGET_V4]
    doctor = lab.masqued(c, "doctor", "--config", str(client.config), "--json").stdout
    found = {f["check"]: f for f in json.loads(doctor) if f["check"] == "dns"}
    assert found["dns"]["level"] == "ok", doctor

    # Clean stop: the original is back, byte for byte.
    assert client.stop() == 0
    assert client_resolv(lab) == ORIGINAL
    assert not (lab.run_dir / "c1" / "resolv.conf.orig").exists()
    assert not getent(lab, "www")

    # A crash leaves the tunnel's resolv.conf; `masqued cleanup` puts it back.
    lab.forget(client)
    crashed = lab.start_daemon("c1", c, lab.client_config(extra=extra), run="2")
    crashed.wait_ready()
    wait_for(lambda: client_resolv(lab) != ORIGINAL, what="resolv.conf rewritten again")
    assert crashed.stop(signal.SIGKILL) == -signal.SIGKILL
    lab.forget(crashed)
    assert client_resolv(lab) != ORIGINAL
    out = lab.masqued(c, "cleanup", "c1")
    assert out.returncode == 0, out.stderr
    assert client_resolv(lab) == ORIGINAL
    assert lab.leftovers(c) == []
    assert relay.stop() == 0


@pytest.mark.parametrize(
    ("transport", "http"), [("datagram", "h3"), ("stream", "h3"), ("datagram", "h2")]
)
def test_a_client_uses_the_resolvers_the_relay_names(
    lab20: NamespaceLab, transport: str, http: str
) -> None:
    lab = lab20
    c = lab.client_ns(1)
    start_dns_server(lab)
    relay_extra = f'dns = ["{TARGET_V4}"]\ndns_search = ["corp.example"]\n'
    relay = lab.start_daemon("relay", lab.relay_ns, lab.relay_config(extra=relay_extra))
    relay.wait_ready()
    extra = f'dns = "relay"\ntransport = "{transport}"\nhttp_version = "{http}"\n'
    client = lab.start_daemon("c1", c, lab.client_config(extra=extra))
    client.wait_ready()
    wait_for(lambda: client_resolv(lab) != ORIGINAL, what="resolv.conf rewritten")
    assert NAME in getent(lab, "www")
    dns = status(lab, "c1")["dns"]
    assert isinstance(dns, dict)
    assert dns["source"] == "relay" and dns["servers"] == [TARGET_V4]
    assert client.stop() == 0
    assert client_resolv(lab) == ORIGINAL
    assert relay.stop() == 0


def test_kill_switch_holds_while_the_relay_is_down(lab20: NamespaceLab) -> None:
    lab = lab20
    c, r = lab.client_ns(1), lab.relay_ns
    lab.start_servers()
    mark = InstanceIds("c1").fwmark
    relay = lab.start_daemon("relay", r, lab.relay_config())
    relay.wait_ready()
    assert tcp(lab, RELAY_V4, 22) == "refused"  # the relay host, outside the tunnel
    client = lab.start_daemon(
        "c1", c, lab.client_config(extra="kill_switch = true\nkeepalive = 0.5\n")
    )
    client.wait_ready()
    assert "kill switch" in client.log_text()
    lab.wait_ping(c, TARGET_V4)
    assert tcp(lab, TARGET_V4, 5201) == "ok"
    # Outside the tunnel nothing leaves, IPv4 or IPv6 (EPERM from the output hook).
    assert tcp(lab, RELAY_V4, 22) in BLOCKED
    assert tcp(lab, RELAY_V6, 22) in BLOCKED
    assert lab.run(c, "ping", "-c", "1", "-W", "1", RELAY_V4, check=False).returncode != 0
    ks = status(lab, "c1")["kill_switch"]
    assert isinstance(ks, dict) and ks["installed"] is True

    # The relay goes: no traffic leaves by the normal routes, but the relay's port is
    # still reachable for the tunnel's own (marked) packets.
    assert relay.stop() == 0
    lab.forget(relay)
    wait_for(
        lambda: (
            "reconnecting" in client.log_text()
            or "connecting" in str(status(lab, "c1").get("state"))
        ),
        what="client notices",
    )
    assert lab.run(c, "ping", "-c", "2", "-W", "1", TARGET_V4, check=False).returncode != 0
    assert tcp(lab, TARGET_V4, 5201) != "ok"
    assert tcp(lab, RELAY_V4, 4433, mark=mark) == "refused"  # reached the relay host
    assert tcp(lab, RELAY_V4, 4433) in BLOCKED
    assert "oifname" in lab.run(c, "nft", "list", "table", "inet", "masqued_c1").stdout

    # The relay comes back: traffic flows again without restarting the client.
    back = lab.start_daemon("relay", r, lab.relay_config(), run="2")
    back.wait_ready()
    lab.wait_ping(c, TARGET_V4, timeout=30)
    assert tcp(lab, TARGET_V4, 5201) == "ok"
    assert client.running()

    # A clean stop removes it: the normal routes work again.
    assert client.stop() == 0
    assert lab.run(c, "nft", "list", "table", "inet", "masqued_c1", check=False).returncode != 0
    assert tcp(lab, RELAY_V4, 22) == "refused"
    assert lab.run(c, "ping", "-c", "1", "-W", "2", RELAY_V4, check=False).returncode == 0
    assert lab.leftovers(c) == []
    assert back.stop() == 0


def test_kill_switch_survives_a_crash_until_cleanup(lab20: NamespaceLab) -> None:
    lab = lab20
    c = lab.client_ns(1)
    relay = lab.start_daemon("relay", lab.relay_ns, lab.relay_config())
    relay.wait_ready()
    client = lab.start_daemon("c1", c, lab.client_config(extra="kill_switch = true\n"))
    client.wait_ready()
    assert client.stop(signal.SIGKILL) == -signal.SIGKILL
    lab.forget(client)
    assert tcp(lab, RELAY_V4, 22) in BLOCKED  # fails closed
    out = lab.masqued(c, "cleanup", "c1")
    assert out.returncode == 0, out.stderr
    assert tcp(lab, RELAY_V4, 22) == "refused"
    assert lab.leftovers(c) == []
    assert relay.stop() == 0


def test_hooks_run_in_order_and_a_failing_pre_up_aborts(lab20: NamespaceLab) -> None:
    lab = lab20
    c = lab.client_ns(1)
    trace = lab.workdir / "hooks.trace"
    relay = lab.start_daemon("relay", lab.relay_ns, lab.relay_config())
    relay.wait_ready()
    hooks = "".join(
        f'{h} = "echo {h} %i >> {trace}; ip -o link show %i >/dev/null 2>&1 && echo {h} has-tun'
        f' >> {trace}; echo said {h}"\n'
        for h in ("pre_up", "post_up", "pre_down", "post_down")
    )
    client = lab.start_daemon("c1", c, lab.client_config(extra=hooks))
    client.wait_ready()
    wait_for(lambda: trace.exists() and "post_up" in trace.read_text(), what="post_up ran")
    assert client.stop() == 0
    assert trace.read_text().splitlines() == [
        "pre_up mq-c1",
        "post_up mq-c1",
        "post_up has-tun",
        "pre_down mq-c1",
        "pre_down has-tun",
        "post_down mq-c1",
    ]
    assert "post_up: said post_up" in client.log_text()  # output logged
    lab.forget(client)

    failing = lab.start_daemon(
        "c1", c, lab.client_config(extra='pre_up = "echo nope; exit 3"\n'), run="2"
    )
    assert failing.proc.wait(20) != 0
    assert "pre_up" in failing.log_text() and "exit status 3" in failing.log_text()
    assert lab.leftovers(c) == []
    lab.forget(failing)
    assert relay.stop() == 0


def test_kill_switch_with_the_relay_given_by_name(lab20: NamespaceLab) -> None:
    """The kill switch drops the system resolver's (unmarked) queries: the client
    resolves the relay's name from sockets with its fwmark from the first attempt on,
    while any other lookup outside the tunnel stays blocked."""
    lab = lab20
    r, c = lab.relay_ns, lab.client_ns(1)
    dns_v4 = "198.18.53.53"  # in the relay namespace, reached by the clients' default route
    lab.ip(r, "addr", "add", f"{dns_v4}/32", "dev", "lo")
    lab.ip(c, "route", "add", "default", "via", RELAY_V4)
    (Path("/etc/netns") / c / "resolv.conf").write_text(
        f"nameserver {dns_v4}\noptions timeout:1 attempts:1\n"
    )
    log = lab.workdir / "relay-dns.log"
    lab.spawn(r, *lab.helper_cmd(r, "dnsserver.py", dns_v4, "relay.example", RELAY_V4), log=log)
    wait_for(lambda: log.exists() and "listening" in log.read_text(), what="dns server")
    assert RELAY_V4 in getent(lab, "relay.example")  # before: the system resolver works
    relay = lab.start_daemon("relay", r, lab.relay_config())
    relay.wait_ready()
    client = lab.start_daemon(
        "c1", c, lab.client_config(relay="relay.example:4433", extra="kill_switch = true\n")
    )
    client.wait_ready()
    lab.wait_ping(c, TARGET_V4)
    assert getent(lab, "relay.example") == ""  # unmarked: dropped by the kill switch
    assert client.stop() == 0
    assert RELAY_V4 in getent(lab, "relay.example")
    assert relay.stop() == 0
