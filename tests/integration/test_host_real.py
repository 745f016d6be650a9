"""Host layer against a real kernel, entirely inside throw-away ``mq-*`` namespaces.

Host-layer code never runs in the test process: an agent process started with
``ip netns exec`` executes it, so nothing can touch the root namespace's routes,
rules or netfilter. The test process only *looks* with ``ip -n`` / ``ip netns exec``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from masqued.host.naming import InstanceIds
from masqued.host.routes import Route, Rule

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
        reason="needs root and /dev/net/tun",
    ),
]

PY = sys.executable

AGENT = r"""
import json, logging, sys, traceback
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
g = {}
for line in sys.stdin:
    try:
        exec(json.loads(line), g)
        out = {"ok": True, "result": g.pop("result", None)}
    except Exception:
        out = {"ok": False, "error": traceback.format_exc()}
    print(json.dumps(out, default=str), flush=True)
"""


class Agent:
    """A Python process inside a namespace that executes snippets we send it."""

    def __init__(self, ns: str, logfile: Path) -> None:
        self.logfile = logfile
        self._log = logfile.open("w")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, PY, "-c", AGENT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )

    def __call__(self, code: str) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(textwrap.dedent(code)) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"agent died: {self.logfile.read_text()}")
        reply = json.loads(line)
        if not reply["ok"]:
            raise AssertionError(reply["error"])
        return reply["result"]

    def log(self) -> str:
        self._log.flush()
        return self.logfile.read_text()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def sh(cmd: str, check: bool = True) -> str:
    proc = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd}: {proc.stderr}")
    return proc.stdout


@pytest.fixture
def netns() -> Iterator[Callable[[str], str]]:
    """Factory of fresh ``mq-h<random>-<suffix>`` namespaces, all deleted afterwards."""
    token = secrets.token_hex(3)
    created: list[str] = []

    def make(suffix: str) -> str:
        name = f"mq-h{token}-{suffix}"
        sh(f"ip netns add {name}")
        created.append(name)
        sh(f"ip -n {name} link set lo up")
        return name

    try:
        yield make
    finally:
        for name in reversed(created):
            sh(f"ip netns pids {name} | xargs -r kill", check=False)
            sh(f"ip netns del {name}", check=False)


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Callable[[str], Agent]]:
    started: list[Agent] = []

    def start(ns: str) -> Agent:
        agent = Agent(ns, tmp_path / f"{ns}.log")
        started.append(agent)
        return agent

    try:
        yield start
    finally:
        for agent in started:
            agent.close()


# ------------------------------------------------------------------ routes and rules

ROUTER_SETUP = """
import ipaddress, socket, struct
from masqued.host.naming import InstanceIds
from masqued.host.routes import *
from masqued.host.rtnetlink import RtNetlink
from masqued.host.tun import open_tun
from masqued.host.cleanup import cleanup_instance
ids = InstanceIds({name!r})
tun = open_tun(ids.tun, 1400)
nl = RtNetlink()
router = Router(nl, ids)
net, ifc, ip = ipaddress.ip_network, ipaddress.ip_interface, ipaddress.ip_address
T = ids.table
def state(addrs, routes, rules):
    return NetState(frozenset(map(ifc, addrs)), frozenset(routes), frozenset(rules))
import asyncio
async def from_a_coroutine():  # the daemon calls it from its event loop
    return default_interface(4, nl)
assert asyncio.run(from_a_coroutine()) == "mq-e0"
result = [default_interface(4, nl), default_interface(6, nl),
          route_get(ip("198.51.100.1"), nl), route_get(ip("198.18.1.9"), nl)]
"""

STATE_A = """
A = state(
    ["198.18.200.7/32", "198.18.200.1/24", "198.18.200.2/24", "2001:db8:200::7/128"],
    [Route(net("198.19.0.0/24"), ids.tun), Route(net("2001:db8:300::/48"), ids.tun),
     Route(net("0.0.0.0/0"), ids.tun, T), Route(net("::/0"), ids.tun, T),
     Route(net("198.19.5.5/32"), "mq-e0", T, ip("198.18.1.1"))],
    full_tunnel_rules(ids),
)
reached = router.set(A)
result = [reached == A, str(reached)]
"""

# B drops the primary 198.18.200.1/24 (the kernel takes the secondary .2/24 with it
# unless promote_secondaries is set), changes an IPv6 prefix, drops the v4 rules.
STATE_B = """
B = state(
    ["198.18.200.7/32", "198.18.200.2/24", "2001:db8:200::7/64"],
    [Route(net("198.19.0.0/24"), ids.tun), Route(net("::/0"), ids.tun, T)],
    full_tunnel_rules(ids, families=[6]),
)
reached = router.set(B)
again = router.set(B)
result = [reached == B, again == B, str(reached)]
"""


def icmp_echo(src: str, dst: str) -> str:
    """Agent code that builds an IPv4 ICMP echo request (checksums computed)."""
    return f"""
def csum(b):
    if len(b) % 2: b += b"\\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16: s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
icmp = struct.pack("!BBHHH", 8, 0, 0, 0x4d51, 1) + b"masqued"
icmp = icmp[:2] + struct.pack("!H", csum(icmp)) + icmp[4:]
hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, 0, 64, 1, 0,
                  ip({src!r}).packed, ip({dst!r}).packed)
hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
packet = hdr + icmp
"""


def test_router_real(netns: Callable[[str], str], agents: Callable[[str], Agent]) -> None:
    ns = netns("r")
    ids = InstanceIds("ti")
    # an uplink with default routes, as on a client host
    sh(f"ip -n {ns} link add mq-e0 type veth peer name mq-e1")
    sh(f"ip -n {ns} link set mq-e0 up && ip -n {ns} link set mq-e1 up")
    sh(f"ip -n {ns} addr add 198.18.1.2/24 dev mq-e0")
    sh(f"ip -n {ns} addr add 2001:db8:1::2/64 dev mq-e0 nodad")
    sh(f"ip -n {ns} route add default via 198.18.1.1 dev mq-e0")
    sh(f"ip -n {ns} -6 route add default via 2001:db8:1::1 dev mq-e0")
    sh(f"ip -n {ns} route add 198.19.9.0/24 via 198.18.1.1 table 100")  # foreign
    sh(f"ip -n {ns} rule add fwmark 0x1 lookup 100 priority 1000")  # foreign
    foreign_rules = sh(f"ip -n {ns} rule")

    agent = agents(ns)
    egress4, egress6, far, near = agent(ROUTER_SETUP.format(name=ids.name))
    assert (egress4, egress6) == ("mq-e0", "mq-e0")
    assert far == ["mq-e0", "198.18.1.1"]
    assert near == ["mq-e0", None]
    assert "mq-ti" in sh(f"ip -n {ns} link show mq-ti")
    assert "mtu 1400" in sh(f"ip -n {ns} link show mq-ti")

    ok, reached = agent(STATE_A)
    assert ok, reached
    routes = sh(f"ip -n {ns} route show table all")
    t = ids.table
    for line in (
        "198.19.0.0/24 dev mq-ti proto 109",
        f"default dev mq-ti table {t} proto 109",
        f"198.19.5.5 via 198.18.1.1 dev mq-e0 table {t} proto 109",
        "2001:db8:300::/48 dev mq-ti proto 109",
        f"default dev mq-ti table {t} proto 109 metric 1024",
    ):
        assert line in routes, routes
    mark = f"{ids.fwmark:#x}"
    for fam in ("-4", "-6"):
        rules = sh(f"ip -n {ns} {fam} rule")
        assert f"5209:\tnot from all fwmark {mark} lookup main suppress_prefixlength 0" in rules
        assert f"5210:\tnot from all fwmark {mark} lookup {t}" in rules
    addrs = sh(f"ip -n {ns} addr show dev mq-ti")
    assert "inet 198.18.200.7/32" in addrs and "inet6 2001:db8:200::7/128" in addrs
    assert "tentative" not in addrs

    # the full tunnel in action: unmarked traffic uses our table, marked skips it
    assert "dev mq-ti table" in sh(f"ip -n {ns} route get 203.0.113.1")
    assert "via 198.18.1.1 dev mq-e0" in sh(f"ip -n {ns} route get 203.0.113.1 mark {mark}")
    # suppress_prefixlength 0: specific main-table routes still win over the tunnel
    assert "dev mq-e0" in sh(f"ip -n {ns} route get 198.18.1.9")

    # real TUN I/O: an echo request to our own address comes back out of the TUN
    agent(icmp_echo("198.18.200.9", "198.18.200.7"))
    got = agent(
        """
import select, time
assert tun.write(packet)
replies = []
deadline = time.monotonic() + 2
while not replies and time.monotonic() < deadline:
    select.select([tun.fileno()], [], [], 0.2)
    replies = [p for p in tun.read_batch() if p[9] == 1 and p[20] == 0]
assert tun.write(b"\\x00 not an ip packet") is False
result = [len(replies), str(ip(replies[0][12:16])), str(ip(replies[0][16:20]))]
"""
    )
    assert got == [1, "198.18.200.7", "198.18.200.9"]

    ok, again, reached = agent(STATE_B)
    assert ok and again, reached
    addrs = sh(f"ip -n {ns} addr show dev mq-ti")
    assert "198.18.200.1/" not in addrs and "inet 198.18.200.2/24" in addrs
    assert "inet6 2001:db8:200::7/64" in addrs
    assert f"fwmark {mark}" not in sh(f"ip -n {ns} -4 rule")
    assert f"fwmark {mark}" in sh(f"ip -n {ns} -6 rule")
    routes = sh(f"ip -n {ns} route show table all")
    assert "2001:db8:300::/48" not in routes and "198.19.5.5" not in routes
    assert "198.19.0.0/24 dev mq-ti proto 109" in routes

    log = agent.log()
    assert "masqued.host [#] ip -4 route add 198.19.0.0/24 dev mq-ti table main proto 109" in log

    removed = agent("result = cleanup_instance(ids, nl)")
    assert "ip link delete dev mq-ti" in removed
    assert agent("result = cleanup_instance(ids, nl)") == []
    agent("tun.close(); nl.close()")
    routes = sh(f"ip -n {ns} route show table all")
    assert "proto 109" not in routes and f"table {t}" not in routes
    assert "198.19.9.0/24 via 198.18.1.1 dev mq-e0 table 100" in routes
    assert sh(f"ip -n {ns} rule") == foreign_rules
    assert f"fwmark {mark}" not in sh(f"ip -n {ns} -6 rule")
    assert "mq-ti" not in sh(f"ip -n {ns} link")


# ------------------------------------------------------------------ rtnetlink vs ip

RTNL_SETUP = """
import errno, ipaddress
from masqued.host.routes import Route, Rule
from masqued.host.rtnetlink import RtNetlink
net, ifc, ip = ipaddress.ip_network, ipaddress.ip_interface, ipaddress.ip_address
T, M, DEV = {table}, {mark}, "mq-n0"
nl = RtNetlink()
ADDRS = [ifc("198.18.7.1/24"), ifc("198.18.7.9/32"), ifc("2001:db8:7::1/64"),
         ifc("2001:db8:7:1::5/128")]
ROUTES = [
    Route(net("198.19.7.0/24"), DEV, T),
    Route(net("0.0.0.0/0"), DEV, T),
    Route(net("198.19.8.8/32"), DEV, T, ip("198.18.7.2")),
    Route(net("2001:db8:70::/48"), DEV, T),
    Route(net("::/0"), DEV, T, ip("2001:db8:7::2")),
    Route(net("198.19.9.0/24"), DEV),  # main table
]
RULES = [
    Rule(4, 5209, 254, fwmark=M, invert=True, suppress_prefixlength=0),
    Rule(4, 5210, T, fwmark=M, invert=True),
    Rule(6, 5209, 254, fwmark=M, invert=True, suppress_prefixlength=0),
    Rule(6, 5210, T, fwmark=M, invert=True),
    Rule(4, 5300, 100, fwmark=0x7),
]
def errno_of(fn, *args):
    try:
        fn(*args)
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    return "ok"
def report():
    return {{
        "addresses": sorted(map(str, nl.addresses(DEV))),
        "routes": {{t: sorted(f"{{r}} proto {{p}}" for r, p in nl.routes(table=t))
                   for t in (T, 254)}},
        "rules": sorted(f"{{r.family}} {{r.priority}}: {{r}}" for r in nl.rules()),
    }}
"""

RTNL_ADD = """
for a in ADDRS:
    nl.address_add(DEV, a)
for r in ROUTES:
    nl.route_add(r)
for r in RULES:
    nl.rule_add(r)
result = report()
result["again"] = [errno_of(nl.address_add, DEV, ADDRS[0]), errno_of(nl.route_add, ROUTES[0]),
                   errno_of(nl.rule_add, RULES[0]), errno_of(nl.address_add, "mq-none", ADDRS[0])]
result["egress"] = [nl.default_interface(4), nl.default_interface(6),
                    nl.route_get(ip("198.19.9.1")), nl.route_get(ip("2001:db8:7::2")),
                    nl.route_get(ip("198.19.8.8"))]
"""

RTNL_REMOVE = """
for r in RULES:
    nl.rule_del(r)
for r in ROUTES:
    nl.route_del(r)
for a in ADDRS:
    nl.address_del(DEV, a)
result = report()
result["again"] = [errno_of(nl.address_del, DEV, ADDRS[0]), errno_of(nl.route_del, ROUTES[0]),
                   errno_of(nl.rule_del, RULES[0])]
nl.link_delete("mq-n2")
result["links"] = [nl.link_exists("mq-n2"), errno_of(nl.link_delete, "mq-n2"), nl.link_exists(DEV)]
nl.close()
"""

_TABLES = {"main": 254, "local": 255, "default": 253}
_PROTOS = {"kernel": 2, "boot": 3, "static": 4}
_RULE_KEYS = {"priority", "not", "src", "fwmark", "table", "suppress_prefixlen"}


def ip_json(ns: str, args: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = json.loads(sh(f"ip -n {ns} -j {args}") or "[]")
    return out


def ip_view(ns: str, table: int, dev: str) -> dict[str, Any]:
    """What ``ip`` prints, in the shapes ``Route``/``Rule``/``ip_interface`` print
    (routes keyed by table as a string, as they come back from the agent's JSON)."""
    addrs = sorted(
        f"{a['local']}/{a['prefixlen']}"
        for link in ip_json(ns, f"addr show dev {dev}")
        for a in link["addr_info"]
    )
    routes: dict[str, list[str]] = {str(table): [], "254": []}
    for fam, zero in (("-4", "0.0.0.0/0"), ("-6", "::/0")):
        # (not "show table T": ip fails on a table that does not exist yet)
        for r in ip_json(ns, f"{fam} route show table all"):
            t = _TABLES.get(r.get("table", "main")) or int(r["table"])
            if str(t) not in routes or r.get("type", "unicast") != "unicast":
                continue
            dst = ipaddress.ip_network(zero if r["dst"] == "default" else r["dst"])
            via = ipaddress.ip_address(r["gateway"]) if "gateway" in r else None
            proto = _PROTOS.get(r["protocol"]) or int(r["protocol"])
            routes[str(t)].append(f"{Route(dst, r.get('dev', ''), t, via)} proto {proto}")
    routes = {t: sorted(found) for t, found in routes.items()}
    rules = []
    for fam, version in (("-4", 4), ("-6", 6)):
        for r in ip_json(ns, f"{fam} rule show"):
            assert r["src"] == "all" and set(r) <= _RULE_KEYS, r
            rule = Rule(
                version,
                r["priority"],
                _TABLES.get(r["table"]) or int(r["table"]),
                fwmark=int(r["fwmark"], 16) if "fwmark" in r else None,
                invert="not" in r,
                suppress_prefixlength=r.get("suppress_prefixlen"),
            )
            rules.append(f"{version} {rule.priority}: {rule}")
    return {"addresses": addrs, "routes": routes, "rules": sorted(rules)}


def test_rtnetlink_matches_ip(netns: Callable[[str], str], agents: Callable[[str], Agent]) -> None:
    ns = netns("nl")
    ids = InstanceIds("tr")
    t, mark = ids.table, ids.fwmark
    sh(f"ip -n {ns} link add mq-n0 type veth peer name mq-n1")
    sh(f"ip -n {ns} link add mq-n2 type veth peer name mq-n3")  # no dummy module here
    for dev in ("mq-n0", "mq-n1"):
        sh(f"ip -n {ns} link set {dev} addrgenmode none && ip -n {ns} link set {dev} up")
    agent = agents(ns)
    before = agent(RTNL_SETUP.format(table=t, mark=mark) + "result = report()")
    assert before == ip_view(ns, t, "mq-n0")
    assert before["addresses"] == [] and before["routes"] == {str(t): [], "254": []}

    got = agent(RTNL_ADD)
    assert got.pop("again") == ["EEXIST", "EEXIST", "EEXIST", "ENODEV"]
    assert got.pop("egress") == [
        None,  # the default routes are in our table, not in main
        None,
        ["mq-n0", None],
        ["mq-n0", None],
        ["mq-n0", "198.18.7.2"],  # via `not fwmark M lookup T`
    ]
    assert got == ip_view(ns, t, "mq-n0")
    assert got["addresses"] == sorted(
        ["198.18.7.1/24", "198.18.7.9/32", "2001:db8:7::1/64", "2001:db8:7:1::5/128"]
    )
    assert f"0.0.0.0/0 dev mq-n0 table {t} proto 109" in got["routes"][str(t)]
    assert f"::/0 via 2001:db8:7::2 dev mq-n0 table {t} proto 109" in got["routes"][str(t)]
    assert "198.19.9.0/24 dev mq-n0 table main proto 109" in got["routes"]["254"]
    assert "198.18.7.0/24 dev mq-n0 table main proto 2" in got["routes"]["254"]
    # and in ip's own words
    addrs = sh(f"ip -n {ns} addr show dev mq-n0")
    assert "inet 198.18.7.1/24 scope global mq-n0" in addrs
    assert "inet6 2001:db8:7::1/64 scope global nodad" in addrs and "tentative" not in addrs
    routes = sh(f"ip -n {ns} route show table {t}")
    assert "198.19.8.8 via 198.18.7.2 dev mq-n0 proto 109" in routes
    assert "default dev mq-n0 proto 109" in routes
    for fam in ("-4", "-6"):
        rules = sh(f"ip -n {ns} {fam} rule")
        assert f"5209:\tnot from all fwmark {mark:#x} lookup main suppress_prefixlength 0" in rules
        assert f"5210:\tnot from all fwmark {mark:#x} lookup {t}" in rules
    assert "5300:\tfrom all fwmark 0x7 lookup 100" in sh(f"ip -n {ns} -4 rule")

    gone = agent(RTNL_REMOVE)
    assert gone.pop("again") == ["EADDRNOTAVAIL", "ESRCH", "ENOENT"]
    assert gone.pop("links") == [False, "ENODEV", True]
    assert gone == before
    assert ip_view(ns, t, "mq-n0") == before
    assert "mq-n2" not in sh(f"ip -n {ns} link") and "mq-n3" not in sh(f"ip -n {ns} link")
    assert "fwmark" not in sh(f"ip -n {ns} rule") + sh(f"ip -n {ns} -6 rule")


# ------------------------------------------------------------------ NAT

UDP_SERVER = r"""
import select, socket
socks = []
for fam, addr in ((socket.AF_INET, "198.18.3.2"), (socket.AF_INET6, "2001:db8:3::2")):
    s = socket.socket(fam, socket.SOCK_DGRAM); s.bind((addr, 7777)); socks.append(s)
print("ready", flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        data, peer = s.recvfrom(100)
        try:
            s.sendto(peer[0].encode(), peer)
        except OSError:  # no route back: the packet was not masqueraded
            pass
"""

UDP_CLIENT = r"""
import socket, sys
out = []
for fam, addr in ((socket.AF_INET, "198.18.3.2"), (socket.AF_INET6, "2001:db8:3::2")):
    s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(0.5)
    s.sendto(b"who am i", (addr, 7777))
    try:
        out.append(s.recv(100).decode())
    except OSError:
        out.append("-")
print(" ".join(out))
"""


@pytest.fixture
def nat_topology(
    netns: Callable[[str], str], agents: Callable[[str], Agent]
) -> Iterator[tuple[Callable[[], str], Agent, str]]:
    """client 198.18.200.2 -- (mq-in) natbox (mq-eg) 198.18.3.1 -- target 198.18.3.2.

    The target has no route back to the client pool: a reply arrives only if the
    natbox masqueraded the client's packets to its egress address.
    """
    client, natbox, target = netns("c"), netns("n"), netns("t")
    sh(f"ip -n {natbox} link add mq-in type veth peer name mq-c netns {client}")
    sh(f"ip -n {natbox} link add mq-eg type veth peer name mq-t netns {target}")
    for ns, dev, v4, v6 in (
        (client, "mq-c", "198.18.200.2/24", "2001:db8:200::2/64"),
        (natbox, "mq-in", "198.18.200.1/24", "2001:db8:200::1/64"),
        (natbox, "mq-eg", "198.18.3.1/24", "2001:db8:3::1/64"),
        (target, "mq-t", "198.18.3.2/24", "2001:db8:3::2/64"),
    ):
        sh(f"ip -n {ns} addr add {v4} dev {dev}")
        sh(f"ip -n {ns} addr add {v6} dev {dev} nodad")
        sh(f"ip -n {ns} link set {dev} up")
    sh(f"ip -n {client} route add default via 198.18.200.1")
    sh(f"ip -n {client} -6 route add default via 2001:db8:200::1")
    agent = agents(natbox)
    changed = agent(
        """
from masqued.host.routes import enable_forwarding, forwarding_status
result = enable_forwarding(["mq-in", "mq-eg"], v4=True, v6=True)
assert all(forwarding_status(["mq-in", "mq-eg"]).values())
"""
    )
    assert "net.ipv6.conf.all.forwarding=1" in changed
    server = subprocess.Popen(
        ["ip", "netns", "exec", target, PY, "-c", UDP_SERVER],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"

        def probe() -> str:
            return sh(f"ip netns exec {client} {PY} -c '{UDP_CLIENT}'").strip()

        yield probe, agent, natbox
    finally:
        server.kill()
        server.wait()


NAT_SETUP = """
import ipaddress
from masqued.host.naming import InstanceIds
from masqued.host.nat import *
ids = InstanceIds("tn")
pool = [ipaddress.ip_network("198.18.200.0/24"), ipaddress.ip_network("2001:db8:200::/64")]
"""


def test_nftables_nat_real(
    nat_topology: tuple[Callable[[], str], Agent, str],
) -> None:
    probe, agent, natbox = nat_topology
    assert probe() == "- -"  # no NAT: the target cannot answer
    agent(NAT_SETUP + "nat = NftablesNat(ids); nat.apply(pool, 'mq-eg'); nat.apply(pool, 'mq-eg')")
    listing = sh(f"ip netns exec {natbox} nft list table inet masqued_tn")
    assert 'ip saddr 198.18.200.0/24 oifname "mq-eg" masquerade' in listing
    assert 'ip6 saddr 2001:db8:200::/64 oifname "mq-eg" masquerade' in listing
    assert listing.count("chain postrouting") == 1
    assert probe() == "198.18.3.1 2001:db8:3::1"
    described = agent("result = nat.describe()")
    assert described.startswith("# nft list table inet masqued_tn")
    assert "masquerade" in described

    # egress change replaces the rules in one go
    agent("nat.apply(pool[:1], 'mq-in')")
    listing = sh(f"ip netns exec {natbox} nft list table inet masqued_tn")
    assert 'oifname "mq-in"' in listing and "mq-eg" not in listing and "ip6" not in listing
    agent("nat.apply(pool, 'mq-eg')")

    removed = agent("result = cleanup_nat(ids)")
    assert removed == ["nft delete table inet masqued_tn"]
    assert "masqued" not in sh(f"ip netns exec {natbox} nft list tables")
    assert agent("result = cleanup_nat(ids)") == []
    agent("nat.remove()")  # idempotent when absent
    assert probe() == "- -"


def test_iptables_nat_real(
    nat_topology: tuple[Callable[[], str], Agent, str],
) -> None:
    probe, agent, natbox = nat_topology
    assert probe() == "- -"
    agent(NAT_SETUP + "nat = IptablesNat(ids); nat.apply(pool, 'mq-eg'); nat.apply(pool, 'mq-eg')")
    for tool, src in (
        ("iptables-legacy", "198.18.200.0/24"),
        ("ip6tables-legacy", "2001:db8:200::/64"),
    ):
        rules = sh(f"ip netns exec {natbox} {tool} -t nat -S")
        assert f"-A MASQUED-tn -s {src} -o mq-eg -j MASQUERADE" in rules, rules
        jumps = re.findall(r"-A POSTROUTING .*-j MASQUED-tn", rules)
        assert jumps == ['-A POSTROUTING -m comment --comment "masqued:tn" -j MASQUED-tn']
    assert probe() == "198.18.3.1 2001:db8:3::1"
    described = agent("result = nat.describe()")
    assert "-A MASQUED-tn -s 198.18.200.0/24 -o mq-eg -j MASQUERADE" in described
    assert "iptables-legacy -t nat -S" in described

    # IPv4 only now: the IPv6 chain and jump go away
    agent("nat.apply(pool[:1], 'mq-eg')")
    assert "MASQUED" not in sh(f"ip netns exec {natbox} ip6tables-legacy -t nat -S")
    assert "MASQUED-tn" in sh(f"ip netns exec {natbox} iptables-legacy -t nat -S")
    agent("nat.apply(pool, 'mq-eg')")

    removed = agent("result = cleanup_nat(ids)")
    assert "iptables -t nat -X MASQUED-tn" in removed
    assert "ip6tables -t nat -X MASQUED-tn" in removed
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        assert "MASQUED" not in sh(f"ip netns exec {natbox} {tool} -t nat -S")
    assert agent("result = cleanup_nat(ids)") == []
    agent("nat.remove()")
    assert probe() == "- -"


def test_cleanup_nat_does_not_load_legacy_tables(
    netns: Callable[[str], str], agents: Callable[[str], Agent]
) -> None:
    ns = netns("e")
    agent = agents(ns)
    assert agent(NAT_SETUP + "result = cleanup_nat(ids)") == []
    assert "nat" not in sh(f"ip netns exec {ns} cat /proc/net/ip_tables_names")


# ------------------------------------------------------------------ coalesced TUN writes

# A TCP handshake played by hand through a vnet TUN, then a run of segments written
# with write_batch (one super-packet): the kernel must forward it through a veth with
# checksum and segmentation offloads off (so it segments and checksums in software
# from our seed) to a receiver that verifies checksums (rx offload off).
GRO_AGENT = """
import os, select, time
from masqued.host.tun import open_tun
from masqued.host.coalesce import coalesce
from masqued.proto.packet import build_tcp, internet_checksum, TCP_SYN, TCP_ACK
tun = open_tun("mq-gro", 1300, vnet=True)
os.system("ip addr add 198.18.0.1/24 dev mq-gro")
C, S = "198.18.0.2", "198.19.0.2"
def read_until(pred, timeout=5):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        select.select([tun.fileno()], [], [], 0.2)
        for p in tun.read_batch():
            if pred(p):
                return p
    raise AssertionError("no such packet from the kernel")
is_tcp_from_s = lambda p: p[0] == 0x45 and p[9] == 6 and p[12:16] == bytes([198, 19, 0, 2])
tun.write(build_tcp(C, S, 40000, 5001, flags=TCP_SYN, seq=999))
synack = read_until(lambda p: is_tcp_from_s(p) and p[33] & 0x12 == 0x12)
isn = int.from_bytes(synack[24:28], "big")
tun.write(build_tcp(C, S, 40000, 5001, flags=TCP_ACK, seq=1000, ack=isn + 1))
"""

GRO_SEND = """
data = bytes(range(256)) * 100
mss, seq, segs = 1200, 1000, []
for off in range(0, 12000, mss):
    p = bytearray(build_tcp(C, S, 40000, 5001, data[off:off + mss], seq=seq + off,
                            flags=TCP_ACK | 0x08 * (off + mss >= 12000), ack=isn + 1))
    p[4:6], p[6], p[10:12] = (off // mss).to_bytes(2, "big"), 0x40, bytes(2)  # DF, IDs
    p[10:12] = internet_checksum(p[:20]).to_bytes(2, "big")
    segs.append(bytes(p))
plan = [count for _, count in coalesce(segs)]
dropped = tun.write_batch(segs)
# the receiver's ACK must cover everything
ack = read_until(lambda p: is_tcp_from_s(p) and int.from_bytes(p[28:32], "big") == seq + 12000)
result = [plan, dropped]
"""


def test_coalesced_tun_writes_reach_a_checksum_verifying_receiver(
    netns: Callable[[str], str], agents: Callable[[str], Agent]
) -> None:
    r, t = netns("gro"), netns("rcv")
    sh(f"ip link add mq-g-r netns {r} type veth peer name mq-g-t netns {t}")
    sh(f"ip -n {r} addr add 198.19.0.1/24 dev mq-g-r")
    sh(f"ip -n {t} addr add 198.19.0.2/24 dev mq-g-t")
    sh(f"ip -n {r} link set mq-g-r up")
    sh(f"ip -n {t} link set mq-g-t up")
    sh(f"ip -n {t} route add 198.18.0.0/24 via 198.19.0.1")
    sh(f"ip netns exec {r} sysctl -qw net.ipv4.ip_forward=1")
    sh(f"ip netns exec {r} ethtool -K mq-g-r tx off tso off gso off")
    sh(f"ip netns exec {t} ethtool -K mq-g-t rx off gro off")
    receiver = agents(t)
    receiver("import socket; srv = socket.create_server(('198.19.0.2', 5001)); srv.settimeout(10)")
    sender = agents(r)
    sender(GRO_AGENT)
    receiver("conn, _ = srv.accept(); conn.settimeout(10)")
    plan, dropped = sender(GRO_SEND)
    assert plan == [10] and dropped == 0  # ten segments, one write
    got = receiver(
        """
buf = b""
while len(buf) < 12000:
    chunk = conn.recv(65536)
    if not chunk:
        break
    buf += chunk
result = [len(buf), buf == (bytes(range(256)) * 100)[:12000]]
"""
    )
    assert got == [12000, True]
    snmp = sh(f"ip netns exec {t} cat /proc/net/snmp").splitlines()
    tcp = dict(zip(snmp[-4].split()[1:], snmp[-3].split()[1:], strict=True))
    assert tcp["InCsumErrors"] == "0"


def test_client_host_addresses_route_nothing_outside_the_configured_routes(
    netns: Callable[[str], str], agents: Callable[[str], Agent]
) -> None:
    """Issue 14: addresses a relay assigns with a wide prefix (198.18.200.2/16,
    2001:db8:200::2/64) become /32 and /128 host addresses without a prefix route:
    the kernel routes nothing into the TUN but the configured routes."""
    ns = netns("c")
    ids = InstanceIds("tc")
    sh(f"ip -n {ns} link add mq-e0 type veth peer name mq-e1")
    sh(f"ip -n {ns} link set mq-e0 up && ip -n {ns} link set mq-e1 up")
    sh(f"ip -n {ns} addr add 198.18.1.2/24 dev mq-e0")
    sh(f"ip -n {ns} route add default via 198.18.1.1 dev mq-e0")
    agent = agents(ns)
    ok = agent(
        f"""
import ipaddress
from masqued.host.naming import InstanceIds
from masqued.host.routes import Router, client_state
from masqued.host.rtnetlink import RtNetlink
from masqued.host.tun import open_tun
ids = InstanceIds({ids.name!r})
tun = open_tun(ids.tun, 1400)
router = Router(RtNetlink(), ids)
ifc, net = ipaddress.ip_interface, ipaddress.ip_network
desired = client_state(
    ids, [net("198.19.0.0/24")], [ifc("198.18.200.2/16"), ifc("2001:db8:200::2/64")], ids.fwmark
)
result = router.set(desired) == desired
"""
    )
    assert ok, agent.log()
    addrs = sh(f"ip -n {ns} addr show dev {ids.tun}")
    assert "inet 198.18.200.2/32" in addrs and "inet6 2001:db8:200::2/128" in addrs, addrs
    assert addrs.count("noprefixroute") == 2, addrs
    routes = sh(f"ip -n {ns} route show table all") + sh(f"ip -n {ns} -6 route show table all")
    tun_routes = [
        line for line in routes.splitlines() if f"dev {ids.tun}" in line and "local" not in line
    ]
    # Only the configured route (in the instance's table); no prefix, no host route.
    assert [line.split()[0] for line in tun_routes if "proto 109" in line] == ["198.19.0.0/24"]
    assert not [line for line in tun_routes if "proto kernel" in line and "fe80::" not in line], (
        tun_routes
    )
    assert "dev mq-e0" in sh(f"ip -n {ns} route get 198.18.5.5")
