"""``masqued doctor NAME``: check an instance for the usual failures, each with its fix.

Every check returns ``Finding``s: a level (ok, warn, fail), what was seen, and the fix
in one line. Checks read the host as it is (files in /proc and /dev, ``nft``,
``ip route get``, a real QUIC handshake to the relay) and the running daemon's status
over its control socket; they change nothing. The pure parts (what a listing or a
certificate means) are separate functions so unit tests can feed them any state.

Exit code: 0 when nothing failed (warnings allowed), 1 otherwise, 2 for bad usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import os
import shutil
import socket
import stat
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509

from masqued.config import ClientConfig, Config, ConfigError, RelayConfig, load_config
from masqued.host.naming import InstanceIds
from masqued.transport.probe import ProbeResult, probe, probe_h2

Level = Literal["ok", "warn", "fail"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PROBE_TIMEOUT = 3.0
CERT_WARN_DAYS = 14
CAP_NET_ADMIN = 12


@dataclass(frozen=True)
class Finding:
    check: str
    level: Level
    message: str
    fix: str | None = None


def ok(check: str, message: str) -> Finding:
    return Finding(check, "ok", message)


def warn(check: str, message: str, fix: str) -> Finding:
    return Finding(check, "warn", message, fix)


def fail(check: str, message: str, fix: str) -> Finding:
    return Finding(check, "fail", message, fix)


# -- host basics -----------------------------------------------------------------------


def check_tun_device(path: Path = Path("/dev/net/tun")) -> Finding:
    fix = "modprobe tun; in a container pass the device (--device /dev/net/tun)"
    try:
        st = path.stat()
    except FileNotFoundError:
        return fail("tun", f"{path} does not exist", fix)
    if not stat.S_ISCHR(st.st_mode):
        return fail("tun", f"{path} is not a character device", fix)
    try:
        os.close(os.open(path, os.O_RDWR))
    except OSError as exc:
        return fail("tun", f"cannot open {path}: {exc.strerror}", fix)
    return ok("tun", f"{path} present")


def check_net_admin(status_text: str) -> Finding:
    """From /proc/self/status: does this process hold CAP_NET_ADMIN?"""
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            if int(line.split()[1], 16) & (1 << CAP_NET_ADMIN):
                return ok("privileges", "CAP_NET_ADMIN held")
            break
    return fail(
        "privileges",
        "no CAP_NET_ADMIN: masqued cannot create its TUN, routes or NAT",
        "run as root, or via masqued@NAME.service (which grants CAP_NET_ADMIN)",
    )


# -- relay -----------------------------------------------------------------------------------


def check_forwarding(flags: dict[str, bool]) -> list[Finding]:
    """``routes.forwarding_status()`` output -> findings (IPv4 per interface, IPv6 global)."""
    off = [key for key, on in sorted(flags.items()) if not on]
    if not off:
        return [ok("forwarding", ", ".join(sorted(flags)) + " on")]
    return [
        fail(
            "forwarding",
            f"{key} = 0: the kernel will not forward client packets",
            f"sysctl -w {key}=1  (or restart the instance; something switched it off)",
        )
        for key in off
    ]


def check_nat(
    kind: str, missing: Sequence[str], ids: InstanceIds, pool: Sequence[IPNetwork], egress: str
) -> list[Finding]:
    """What the NAT backend says is missing of the rules it would make (``missing()``)."""
    restart = f"systemctl restart masqued@{ids.name}  (re-creates its NAT); find what removed it"
    findings = []
    for item in missing:
        if item.startswith("table inet "):
            findings.append(fail("nat", f"nftables {item} is missing", restart))
        elif item.startswith("-A POSTROUTING"):
            findings.append(fail("nat", f"no jump from POSTROUTING to {ids.ipt_chain}", restart))
        else:
            findings.append(fail("nat", f"NAT rule missing: {item}", restart))
    if findings:
        return findings
    return [ok("nat", f"{kind}: masquerading {', '.join(map(str, pool))} out of {egress}")]


def _nat_priority(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    names = {"srcnat": 100, "dstnat": -100, "filter": 0, "raw": -300, "mangle": -150}
    return names.get(str(value))


def check_nft_ruleset(
    ruleset: dict[str, Any], ids: InstanceIds, tun: str | Sequence[str]
) -> list[Finding]:
    """Other tables that shadow our NAT or drop forwarded packets (``nft -j list ruleset``).

    ``tun``: the instance's TUN, or all of them (a relay with workers)."""
    tuns = [tun] if isinstance(tun, str) else list(tun)
    findings: list[Finding] = []
    chains: dict[tuple[str, str, str], dict[str, Any]] = {}
    rules: dict[tuple[str, str, str], list[Any]] = {}
    for item in ruleset.get("nftables", []):
        if "chain" in item:
            c = item["chain"]
            chains[(c.get("family"), c.get("table"), c.get("name"))] = c
        elif "rule" in item:
            r = item["rule"]
            key = (r.get("family"), r.get("table"), r.get("chain"))
            rules.setdefault(key, []).append(r.get("expr", []))
    for key, c in sorted(chains.items()):
        family, table, name = key
        if table == ids.nft_table:
            continue
        hook = c.get("hook")
        if c.get("type") == "nat" and hook == "postrouting":
            prio = _nat_priority(c.get("prio"))
            text = json.dumps(rules.get(key, []))
            if prio is not None and prio <= 100 and ('"masquerade"' in text or '"snat"' in text):
                findings.append(
                    warn(
                        "nat",
                        f"{family} {table} chain {name} (priority {prio}) also source-NATs at "
                        "postrouting before or with ours and may take the pool's packets",
                        f"check with: nft list chain {family} {table} {name}",
                    )
                )
        if c.get("type") == "filter" and hook == "forward" and c.get("policy") == "drop":
            text = json.dumps(rules.get(key, []))
            missing = [t for t in tuns if f'"{t}"' not in text]
            if missing:
                findings.append(
                    warn(
                        "firewall",
                        f"{family} {table} chain {name} drops forwarded packets by default and "
                        f"has no rule for {', '.join(missing)}",
                        "; ".join(
                            f'nft insert rule {family} {table} {name} iifname "{t}" accept'
                            for t in missing
                        )
                        + " (plus ct state established,related accept)",
                    )
                )
    return findings


def check_certificate_dates(cert: x509.Certificate, now: dt.datetime, what: str) -> Finding:
    after = cert.not_valid_after_utc
    before = cert.not_valid_before_utc
    renew = "renew it: masqued pki relay DIR --name NAME --force, then reload the relay"
    if now > after:
        return fail("certificate", f"{what} expired on {after:%Y-%m-%d %H:%M} UTC", renew)
    if now < before:
        return fail(
            "certificate",
            f"{what} is not valid before {before:%Y-%m-%d %H:%M} UTC",
            "check the clock (timedatectl) or re-issue the certificate",
        )
    if after - now < dt.timedelta(days=CERT_WARN_DAYS):
        return warn("certificate", f"{what} expires on {after:%Y-%m-%d}", renew)
    return ok("certificate", f"{what} valid until {after:%Y-%m-%d}")


# -- client ----------------------------------------------------------------------------------


def _names(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    dns = [d.lower() for d in san.get_values_for_type(x509.DNSName)]
    ips = [str(i) for i in san.get_values_for_type(x509.IPAddress)]
    return dns, ips


def name_matches(cert: x509.Certificate, server_name: str) -> bool:
    dns, ips = _names(cert)
    try:
        return str(ipaddress.ip_address(server_name)) in ips
    except ValueError:
        pass
    name = server_name.lower().rstrip(".")
    for pattern in dns:
        if pattern == name:
            return True
        if (
            pattern.startswith("*.")
            and name.count(".") >= 2
            and name.split(".", 1)[1] == pattern[2:]
        ):
            return True
    return False


def check_relay_certificate(
    chain: Sequence[x509.Certificate],
    ca: Sequence[x509.Certificate],
    server_name: str,
    now: dt.datetime,
    ca_path: str = "ca",
) -> list[Finding]:
    """What the relay presented, checked the way the client will check it."""
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    leaf = chain[0]
    subject = leaf.subject.rfc4514_string() or "(empty subject)"
    dates = check_certificate_dates(leaf, now, f"relay certificate {subject}")
    if dates.level == "fail":
        return [dates]
    if not name_matches(leaf, server_name):
        dns, ips = _names(leaf)
        return [
            fail(
                "certificate",
                f"relay certificate names {', '.join(dns + ips) or 'nothing'}, not {server_name}",
                f"set server_name to one of those, or re-issue: masqued pki relay DIR --name "
                f"{server_name}",
            )
        ]
    try:
        builder = PolicyBuilder().store(Store(list(ca))).time(now)
        verifier = builder.build_server_verifier(_subject(server_name))
        verifier.verify(leaf, list(chain[1:]))
    except VerificationError as exc:
        issuer = leaf.issuer.rfc4514_string()
        return [
            fail(
                "certificate",
                f"relay certificate (issued by {issuer}) does not verify against {ca_path}: {exc}",
                f"point ca at the CA that issued the relay's certificate ({issuer})",
            )
        ]
    return [dates, ok("certificate", f"relay certificate matches {server_name} and {ca_path}")]


def _subject(server_name: str) -> x509.DNSName | x509.IPAddress:
    try:
        return x509.IPAddress(ipaddress.ip_address(server_name))
    except ValueError:
        return x509.DNSName(server_name)


def probe_relay(
    host: str, port: int, server_name: str, fwmark: int, timeout: float = PROBE_TIMEOUT
) -> ProbeResult:
    """A real QUIC handshake to the relay, without certificate checks, to fetch its
    chain; with the client's fwmark, so the probe takes the tunnel's path."""
    return asyncio.run(probe(host, port, server_name, fwmark, timeout))


def probe_relay_h2(
    host: str, port: int, server_name: str, fwmark: int, timeout: float = PROBE_TIMEOUT
) -> ProbeResult:
    """A TLS handshake (ALPN h2) to the relay over TCP, with the client's fwmark."""
    return asyncio.run(probe_h2(host, port, server_name, fwmark, timeout))


def check_probe_h2(result: ProbeResult, quic: ProbeResult, host: str, port: int) -> Finding:
    """HTTP/2 for a client that may fall back to it (http_version auto or h2): when
    QUIC does not get through but TLS over TCP does, the tunnel runs over HTTP/2."""
    quic_ok = quic.reached and quic.error is None
    if result.reached and result.error is None:
        if quic_ok:
            return ok("http2", f"{host}:{port} answers HTTP/2 over TLS too (fallback ready)")
        return warn(
            "http2",
            f"{host}:{port} answers HTTP/2 over TLS ({result.rtt_ms} ms) but not QUIC: the "
            "tunnel runs over HTTP/2 (TCP over TCP: slower on lossy paths)",
            f"allow UDP {port} on the firewalls on the path for HTTP/3",
        )
    fix = (
        f'check the relay\'s listen_tcp (not "off") and that TCP {port} is allowed on every '
        "firewall on the path"
    )
    return (warn if quic_ok else fail)("http2", f"HTTP/2 at {host}:{port}: {result.error}", fix)


def check_probe(result: ProbeResult, host: str, port: int) -> Finding:
    if result.reached and result.error is None:
        return ok("relay", f"{host}:{port} answers QUIC (handshake {result.rtt_ms} ms)")
    if result.refused:
        return fail(
            "relay",
            f"relay {host}:{port} unreachable: {result.error} (ICMP port unreachable: relay down)",
            "start the relay (systemctl start masqued@NAME on the relay host) and check it with "
            "masqued status there",
        )
    if result.reached:
        return fail("relay", f"{host}:{port}: {result.error}", "see the relay's journal")
    return fail(
        "relay",
        f"relay {host}:{port} unreachable: {result.error} (relay down or UDP blocked)",
        f"check the relay runs, and that UDP {port} is allowed on every firewall on the path",
    )


def check_route_loop(dev: str | None, tun: str, relay_ip: str) -> Finding:
    """Where the kernel routes the tunnel socket's packets to the relay (``dev``, None
    when it cannot say): never into the tunnel."""
    if dev is None:
        return warn("routing", f"cannot find the route to {relay_ip}", "ip route get " + relay_ip)
    if dev == tun:
        return fail(
            "routing",
            f"packets to the relay {relay_ip} are routed into the tunnel {tun} (routing loop)",
            'remove fwmark = "off" (the mark keeps the relay out of the tunnel) or narrow routes',
        )
    return ok("routing", f"the relay {relay_ip} is reached via {dev}, outside the tunnel")


# -- orchestration -----------------------------------------------------------------------------


def _run(*cmd: str) -> subprocess.CompletedProcess[str] | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None


def check_daemon(name: str) -> tuple[Finding, dict[str, Any] | None]:
    from masqued.observe import control

    path = control.socket_path(name)
    try:
        doc = control.request(path, "status", {"nat": False}, timeout=5.0)
    except (FileNotFoundError, ConnectionRefusedError):
        return (
            warn(
                "daemon",
                f"instance {name} is not running (nothing answers on {path})",
                f"systemctl start masqued@{name}; journalctl -u masqued@{name} -e shows why "
                "it stopped",
            ),
            None,
        )
    except (OSError, control.ControlError) as exc:
        return warn("daemon", f"control socket {path}: {exc}", "run doctor as root"), None
    role = doc.get("role")
    if role == "client" and doc.get("state") != "connected":
        err = doc.get("last_error") or "no error recorded"
        return (
            fail(
                "daemon",
                f"running, but the tunnel is {doc.get('state')}: {err}",
                "see the relay checks below and journalctl -u masqued@" + name,
            ),
            doc,
        )
    what = f"{len(doc.get('sessions', []))} session(s)" if role == "relay" else "tunnel up"
    return ok("daemon", f"running, pid {doc.get('pid')}, {what}"), doc


def _relay_checks(
    config: RelayConfig, ids: InstanceIds, doc: dict[str, Any] | None
) -> list[Finding]:
    from masqued.host.nat import NatError, make_nat
    from masqued.host.routes import default_interface, forwarding_status

    findings: list[Finding] = []
    egress = (doc or {}).get("egress") or config.egress
    if egress == "auto":
        v4 = any(n.version == 4 for n in config.pool)
        egress = default_interface(4 if v4 else 6) or default_interface(6 if v4 else 4) or ""
        if not egress:
            findings.append(
                fail(
                    "egress",
                    'egress = "auto" but this host has no default route',
                    'add a default route or set egress = "IFNAME"',
                )
            )
    running = doc is not None
    v4 = any(n.version == 4 for n in config.pool)
    v6 = any(n.version == 6 for n in config.pool)
    # A relay with workers has a TUN per worker (the status lists them).
    tuns = [str(w["tun"]) for w in (doc or {}).get("workers") or [] if w.get("tun")] or [ids.tun]
    if running and egress:
        findings += check_forwarding(forwarding_status([*tuns, egress], v4=v4, v6=v6))
    if config.nat == "off":
        findings.append(ok("nat", 'nat = "off": route the pool back to this relay yourself'))
    elif running and egress:
        nat = make_nat(config.nat, ids)
        assert nat is not None
        try:
            missing = nat.missing(config.pool, egress)
        except NatError as e:
            findings.append(
                fail(
                    "nat",
                    f"cannot read the {nat.kind} NAT rules: {e}",
                    f"masqued cleanup {ids.name}, then restart it",
                )
            )
        else:
            findings += check_nat(nat.kind, missing, ids, config.pool, egress)
        res = _run("nft", "-j", "list", "ruleset")
        if res is not None and res.returncode == 0:
            with contextlib.suppress(ValueError):
                findings += check_nft_ruleset(json.loads(res.stdout), ids, tuns)
    cert = x509.load_pem_x509_certificates(config.certificate.read_bytes())[0]
    findings.append(
        check_certificate_dates(cert, dt.datetime.now(dt.UTC), f"certificate {config.certificate}")
    )
    return findings


def _client_checks(
    config: ClientConfig, ids: InstanceIds, doc: dict[str, Any] | None
) -> list[Finding]:
    findings: list[Finding] = []
    fwmark = ids.fwmark if config.fwmark is None else config.fwmark
    probe = probe_relay(config.relay_host, config.relay_port, config.server_name, fwmark)
    if config.http_version != "h2":
        findings.append(check_probe(probe, config.relay_host, config.relay_port))
    if config.http_version != "h3":
        h2_port = config.h2_port or config.relay_port
        h2 = probe_relay_h2(config.relay_host, h2_port, config.server_name, fwmark)
        findings.append(check_probe_h2(h2, probe, config.relay_host, h2_port))
    if probe.chain:
        ca = x509.load_pem_x509_certificates(config.ca.read_bytes())
        findings += check_relay_certificate(
            probe.chain, ca, config.server_name, dt.datetime.now(dt.UTC), str(config.ca)
        )
    try:
        relay_ip = str(socket.getaddrinfo(config.relay_host, config.relay_port)[0][4][0])
    except OSError:
        relay_ip = None
    if relay_ip is not None:
        from masqued.host.routes import route_get

        try:
            dev: str | None = route_get(ipaddress.ip_address(relay_ip), mark=fwmark)[0]
        except OSError:
            dev = None
        findings.append(check_route_loop(dev, ids.tun, relay_ip))
    from masqued.host.resolver import check as resolver_check

    findings += check_dns(config, doc, resolver_check, ids.tun)
    findings += check_kill_switch(config, doc)
    return findings


_DNS_FIXES = {
    "resolved": (
        "start systemd-resolved (systemctl enable --now systemd-resolved) and point "
        "/etc/resolv.conf at it (ln -sf /run/systemd/resolve/stub-resolv.conf "
        '/etc/resolv.conf), or set dns_backend = "file"'
    ),
    "resolvconf": (
        "resolvconf must own /etc/resolv.conf (Debian: the resolvconf package's "
        'symlink to /run/resolvconf/resolv.conf), or set dns_backend = "file"'
    ),
    "file": "check that nothing else (NetworkManager, dhclient) rewrites /etc/resolv.conf",
}


def check_dns(
    config: ClientConfig,
    doc: dict[str, Any] | None,
    live: Callable[[str, str, Sequence[Any]], str | None],
    tun: str,
) -> list[Finding]:
    """The host's resolver configuration against what the instance set and reports.
    ``live(backend, tun, servers)`` (masqued.host.resolver.check) looks at the host now."""
    host = config.host
    if not host.dns and not host.dns_from_relay:
        if config.full_tunnel:
            return [
                warn(
                    "dns",
                    "full tunnel without dns: name lookups go to the local network's "
                    "resolver, outside the tunnel",
                    'set dns = ["RESOLVER", ...] or dns = "relay" (a resolver the relay names)',
                )
            ]
        return [ok("dns", "dns not set: the host's resolvers answer as before")]
    findings: list[Finding] = []
    state = (doc or {}).get("dns") or {}
    backend = str(state.get("backend") or "")
    fix = _DNS_FIXES.get(backend, "see journalctl -u masqued@" + config.name)
    if doc is None:
        return [ok("dns", "instance not running: DNS is left as the host has it")]
    if state.get("state") == "failed":
        findings.append(
            fail("dns", f"setting DNS through {backend} failed: {state.get('error')}", fix)
        )
    elif state.get("state") == "waiting":
        findings.append(
            warn(
                "dns",
                'dns = "relay" but the relay names no resolvers: DNS left unchanged',
                "set dns on the relay (its dns key), or list resolvers in this client's dns",
            )
        )
    elif state.get("state") == "applied":
        servers = [ipaddress.ip_address(a) for a in state.get("servers") or []]
        problem = live(backend, tun, servers)
        if problem:
            findings.append(
                fail("dns", f"DNS set through {backend} but not in use: {problem}", fix)
            )
        else:
            findings.append(
                ok("dns", f"{', '.join(map(str, servers))} through {backend} ({state.get('why')})")
            )
        for server in servers:
            routed = any(server.version == r.version and server in r for r in config.routes)
            allowed = any(
                server.version == n.version and server in n for n in host.kill_switch_allow
            )
            if not routed and host.kill_switch and not allowed:
                findings.append(
                    fail(
                        "dns",
                        f"resolver {server} is outside the tunnel's routes and the kill "
                        "switch drops its queries",
                        "route it into the tunnel (routes) or add it to kill_switch_allow",
                    )
                )
            elif not routed:
                findings.append(
                    warn(
                        "dns",
                        f"resolver {server} is not routed into the tunnel: its queries "
                        "leave outside it",
                        "add its address to routes, or use a resolver inside them",
                    )
                )
    return findings


def check_kill_switch(config: ClientConfig, doc: dict[str, Any] | None) -> list[Finding]:
    if not config.host.kill_switch or doc is None:
        return []
    ks = doc.get("kill_switch") or {}
    if ks.get("installed"):
        return [ok("kill switch", f"installed in {ks.get('table')}")]
    return [
        fail(
            "kill switch",
            f"kill_switch = true but its rules are not installed ({ks.get('table')})",
            f"systemctl restart masqued@{config.name}; nft list ruleset shows what is there",
        )
    ]


def run_checks(path: Path, name: str) -> list[Finding]:
    findings: list[Finding] = []
    config: Config | None
    try:
        config = load_config(path, name)
        findings.append(ok("config", f"{path} is valid ({config.mode})"))
    except ConfigError as exc:
        config = None
        findings += [
            fail("config", f"{path}: {p}", f"edit {path}; masqued check {name} lists every problem")
            for p in exc.problems
        ]
    findings.append(check_tun_device())
    try:
        status_text = Path("/proc/self/status").read_text()
    except OSError:
        status_text = ""
    findings.append(check_net_admin(status_text))
    daemon, doc = check_daemon(name)
    findings.append(daemon)
    if config is None:
        return findings
    ids = InstanceIds(config.name)
    try:
        if isinstance(config, RelayConfig):
            findings += _relay_checks(config, ids, doc)
        else:
            findings += _client_checks(config, ids, doc)
    except Exception as exc:  # a check that breaks must not hide the others' findings
        findings.append(
            warn("doctor", f"a check failed to run: {type(exc).__name__}: {exc}", "report a bug")
        )
    return findings


def render(findings: Sequence[Finding], header: str) -> str:
    out = [header]
    for f in findings:
        out.append(f"  {f.level.upper():5} {f.check}: {f.message}")
        if f.fix and f.level != "ok":
            out.append(f"        fix: {f.fix}")
    failed = sum(f.level == "fail" for f in findings)
    warned = sum(f.level == "warn" for f in findings)
    out.append(
        "no problems found"
        if not failed and not warned
        else f"{failed} problem(s), {warned} warning(s)"
    )
    return "\n".join(out) + "\n"


def main(path: Path, name: str, as_json: bool = False) -> int:
    findings = run_checks(path, name)
    if as_json:
        print(json.dumps([asdict(f) for f in findings], indent=2))
    else:
        print(render(findings, f"masqued doctor {name} ({path})"), end="")
    return 1 if any(f.level == "fail" for f in findings) else 0
