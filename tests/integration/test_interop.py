"""Issue 16 end to end: what another RFC 9484 implementation expects of us, with real
daemons in namespaces — URI templates, routes scoped to one protocol, link-local
traffic on the tunnel link."""

from __future__ import annotations

import time

from tests.integration.lab import EGRESS_V4, PYTHON, TARGET_V4, NamespaceLab

DATAGRAM = 'transport = "datagram"\n'
# A connected UDP socket: the ICMP error our client answers with comes back as an errno.
UDP_PROBE = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.connect((sys.argv[1], 5301))
for _ in range(3):
    try:
        s.send(b"probe")
        s.recv(100)
        print("answered")
        break
    except socket.timeout:
        continue
    except OSError as exc:
        print("error", exc.strerror)
        break
else:
    print("silence")
"""


def test_a_configured_uri_template_is_served_and_a_mismatch_is_404(lab3: NamespaceLab) -> None:
    lab3.start_servers()
    relay = lab3.start_daemon(
        "relay",
        lab3.relay_ns,
        lab3.relay_config(extra='uri_template = "https://relay.example/vpn"\n'),
    )
    relay.wait_ready()
    good = lab3.start_daemon(
        "c1",
        lab3.client_ns(1),
        lab3.client_config(extra=DATAGRAM + 'uri_template = "https://relay.example/vpn"\n'),
    )
    good.wait_ready()
    assert lab3.traffic(lab3.client_ns(1), "udp", TARGET_V4, "5") == f"ok {EGRESS_V4} 5/5"
    # The default template still works beside it.
    plain = lab3.start_daemon("c2", lab3.client_ns(2), lab3.client_config(extra=DATAGRAM))
    plain.wait_ready()
    wrong = lab3.start_daemon(
        "c3",
        lab3.client_ns(3),
        lab3.client_config(extra=DATAGRAM + 'uri_template = "https://relay.example/other"\n'),
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and "404" not in wrong.log_text():
        time.sleep(0.1)
    assert "refused the tunnel" in wrong.log_text() and "404" in wrong.log_text()
    log = relay.log_text()
    assert "'/other'" in log and "https://relay.example/vpn" in log, log[-2000:]


def test_a_route_for_tcp_only_lets_tcp_through_and_udp_gets_icmp(lab1: NamespaceLab) -> None:
    """The client's template scopes its request to TCP (ipproto 6, RFC 9484 §4.6): the
    relay advertises its routes for TCP only, and our client answers UDP there itself
    with ICMP administratively prohibited instead of sending it to be dropped."""
    lab1.start_servers()
    relay = lab1.start_daemon("relay", lab1.relay_ns, lab1.relay_config())
    relay.wait_ready()
    template = 'uri_template = "https://relay.example/.well-known/masque/ip/*/6/"\n'
    client = lab1.start_daemon(
        "c1", lab1.client_ns(1), lab1.client_config(extra=DATAGRAM + template)
    )
    client.wait_ready()
    ns = lab1.client_ns(1)
    assert lab1.traffic(ns, "tcp", TARGET_V4, str(1 << 20)).startswith(f"ok {EGRESS_V4}")
    probe = lab1.run(ns, PYTHON, "-c", UDP_PROBE, TARGET_V4, check=False, timeout=30)
    assert probe.stdout.strip() == "error No route to host", probe
    # ICMP always passes a protocol scope.
    assert lab1.ping(ns, TARGET_V4, count=2).returncode == 0
    status = lab1.masqued(ns, "status", "c1", "--json")
    assert '"not_routed": 1' in status.stdout.replace(" ", "") or '"not_routed":' in status.stdout


def test_link_local_traffic_from_a_client_is_no_warning(lab1: NamespaceLab) -> None:
    """A client kernel's link-local multicast (router solicitations and the like, from
    fe80::) is the tunnel link's own: counted as link_local, never forwarded, never
    logged as a spoofed source."""
    lab1.start_servers()
    relay = lab1.start_daemon("relay", lab1.relay_ns, lab1.relay_config())
    relay.wait_ready()
    client = lab1.start_daemon("c1", lab1.client_ns(1), lab1.client_config(extra=DATAGRAM))
    client.wait_ready()
    ns = lab1.client_ns(1)
    lab1.run(ns, "ping", "-6", "-c", "3", "-i", "0.2", "-I", "mq-c1", "ff02::2", check=False)
    deadline = time.monotonic() + 10
    drops: dict[str, int] = {}
    while time.monotonic() < deadline:
        res = lab1.masqued(lab1.relay_ns, "status", "relay", "--json")
        import json

        doc = json.loads(res.stdout)
        drops = doc["totals"]["drops"]
        if drops.get("link_local", 0) >= 3:
            break
        time.sleep(0.2)
    assert drops.get("link_local", 0) >= 3, drops
    assert drops.get("spoofed_source", 0) == 0
    assert "spoofed source" not in relay.log_text()
