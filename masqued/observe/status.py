"""The status document: built inside the daemon, shown by ``masqued status``.

Daemon side, ``StatusService`` answers ``status`` on the control socket and feeds the
Prometheus endpoint; both read the same snapshot, taken on the event loop (O(sessions),
no I/O). Only the live NAT rule listing needs a subprocess; it runs in a worker thread
and is cached for a few seconds so that ``--watch`` does not fork ``nft`` every second.

CLI side: ``render_text`` prints a document the way ``wg show`` does, ``--json`` prints
it as is (schema: docs/status.schema.json, ``schema_version`` 1), ``--watch`` redraws it
with per-session rates computed from two consecutive documents.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from masqued import __version__
from masqued.config import ClientConfig, Config, RelayConfig
from masqued.host.naming import InstanceIds
from masqued.host.nat import NatBackend
from masqued.observe.control import ControlServer, server_socket_path, socket_path

if TYPE_CHECKING:
    from masqued.observe.exposition import MetricsServer


log = logging.getLogger("masqued")

SCHEMA_VERSION = 1
NAT_CACHE_SECONDS = 5.0
NAT_DESCRIBE_TIMEOUT = 10.0


# -- daemon side -------------------------------------------------------------------------


def parse_nat_description(kind: str, text: str) -> dict[str, Any]:
    """``NatBackend.describe()`` text -> {"backend", "commands", "rules"}."""
    commands = [line[2:].strip() for line in text.splitlines() if line.startswith("# ")]
    rules = [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]
    return {"backend": kind, "commands": commands, "rules": rules}


class StatusService:
    """Serves the status document (control socket) and metrics (optional endpoint)."""

    def __init__(
        self,
        get_config: Callable[[], Config],
        snapshot: Callable[[], dict[str, Any]],
        *,
        nat: NatBackend | None = None,
        extra: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.get_config = get_config
        self.snapshot = snapshot
        self.nat = nat
        self.extra = extra
        config = get_config()
        self.ids = InstanceIds(config.name)
        self.control = ControlServer(server_socket_path(config.name), {"status": self._status})
        self.metrics: MetricsServer | None = None
        self._nat_cache: tuple[float, dict[str, Any]] | None = None
        self._nat_lock = asyncio.Lock()

    async def start(self) -> None:
        """Open the control socket (and the metrics endpoint when configured).

        Raises ControlSocketBusy when another live process serves this instance.
        """
        await self.control.start()
        endpoint = self.get_config().metrics
        if endpoint is not None:
            from masqued.observe.exposition import MetricsServer, make_registry

            per_client = getattr(self.get_config(), "metrics_per_client", False)
            registry = make_registry(self.document, per_client)
            self.metrics = MetricsServer(
                registry, host=endpoint.host, port=endpoint.port, path=endpoint.path
            )
            try:
                await self.metrics.start()
            except OSError as exc:
                self.metrics = None
                log.error("metrics: cannot listen on %s: %s", endpoint, exc.strerror or exc)
            else:
                log.info("metrics: serving http://%s/metrics", self.metrics.address)

    async def close(self) -> None:
        await self.control.close()
        if self.metrics is not None:
            await self.metrics.close()

    def document(self) -> dict[str, Any]:
        """The status document without the live NAT listing (cheap; for metrics)."""
        config = self.get_config()
        doc: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "instance": config.name,
            "role": config.mode,
            "pid": os.getpid(),
            "masqued_version": __version__,
            "config": str(config.path),
            "tun": {"name": self.ids.tun, "mtu": config.mtu},
            "metrics": None if config.metrics is None else str(config.metrics),
        }
        if isinstance(config, RelayConfig):
            doc |= {
                "listen": _hostport(config.listen_host, config.listen_port),
                "listen_tcp": _hostport(*config.listen_tcp) if config.listen_tcp else None,
                "http_versions": ["h3", "h2"] if config.listen_tcp else ["h3"],
                "relay": None,
                "transports": ["stream", "datagram"],  # every relay serves both
                "routes": [str(r) for r in config.routes],
                "pool_networks": [str(n) for n in config.pool],
                "egress": config.egress,
                "fwmark": None,
                "state": "running",
                "nat": {"backend": config.nat, "commands": [], "rules": []}
                if config.nat != "off"
                else None,
            }
        else:
            assert isinstance(config, ClientConfig)
            doc |= {
                "listen": None,
                "relay": _hostport(config.relay_host, config.relay_port),
                "server_name": config.server_name,
                "transports": [config.transport],
                "http_versions": [config.http_version],
                "routes": [str(r) for r in config.routes],
                "pool_networks": [],
                "egress": None,
                "fwmark": self.ids.fwmark if config.fwmark is None else config.fwmark,
                "nat": None,
            }
        doc |= self.snapshot()
        if self.extra is not None:
            doc |= self.extra()
        # The data planes actually carrying traffic, summed over the sessions.
        in_use: dict[str, int] = {}
        for session in doc.get("sessions", []):
            if session.get("state") == "connected" and session.get("transport"):
                in_use[session["transport"]] = in_use.get(session["transport"], 0) + 1
        doc["transports_in_use"] = in_use
        doc.setdefault("results", {})
        doc.setdefault("connects", 0)
        doc.setdefault("last_error", None)
        doc.setdefault("pool", None)
        return doc

    async def _status(self, args: dict[str, Any]) -> dict[str, Any]:
        doc = self.document()
        if self.nat is not None and args.get("nat", True) is not False:
            doc["nat"] = await self._nat_description()
        return doc

    async def _nat_description(self) -> dict[str, Any]:
        assert self.nat is not None
        async with self._nat_lock:
            now = time.monotonic()
            if self._nat_cache is not None and now - self._nat_cache[0] < NAT_CACHE_SECONDS:
                return self._nat_cache[1]
            loop = asyncio.get_running_loop()
            try:
                text = await asyncio.wait_for(
                    loop.run_in_executor(None, self.nat.describe), NAT_DESCRIBE_TIMEOUT
                )
            except Exception as exc:  # the listing is informative; never fail status for it
                text = f"# {self.nat.kind}\n(cannot list the rules: {exc})"
            desc = parse_nat_description(self.nat.kind, text)
            self._nat_cache = (now, desc)
            return desc


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- CLI side: formatting ------------------------------------------------------------------


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    parts = []
    for size, name in ((86400, "day"), (3600, "hour"), (60, "minute"), (1, "second")):
        value, seconds = divmod(seconds, size)
        if value:
            parts.append(f"{value} {name}{'s' if value != 1 else ''}")
    return ", ".join(parts[:2])


def human_rate(bits_per_second: float) -> str:
    for unit in ("bit/s", "kbit/s", "Mbit/s", "Gbit/s"):
        if bits_per_second < 1000 or unit == "Gbit/s":
            digits = 0 if unit == "bit/s" else 1
            return f"{bits_per_second:.{digits}f} {unit}"
        bits_per_second /= 1000
    raise AssertionError("unreachable")


def _ago(now: float, then: float | None) -> str:
    if not then:
        return "never"
    return f"{human_duration(now - then)} ago"


def _drops(drops: dict[str, int]) -> str:
    shown = {k: v for k, v in sorted(drops.items()) if v}
    return ", ".join(f"{k} {v}" for k, v in shown.items()) or "none"


def _nat_lines(nat: dict[str, Any]) -> list[str]:
    rules = nat.get("rules", [])
    interesting = [r for r in rules if "masquerade" in r.lower() or "-j MASQUED" in r]
    return interesting or rules


Rates = dict[str, dict[str, float]]


def compute_rates(prev: dict[str, Any] | None, cur: dict[str, Any]) -> Rates:
    """Per session id (and "total"): rx/tx bit/s and packets/s between two documents."""
    if prev is None:
        return {}
    dt_s = float(cur.get("time", 0)) - float(prev.get("time", 0))
    if dt_s <= 0:
        return {}
    before = {s["id"]: s for s in prev.get("sessions", [])}
    before["total"] = prev.get("totals", {})
    rates: Rates = {}
    pairs = [(s["id"], s) for s in cur.get("sessions", [])] + [("total", cur.get("totals", {}))]
    for sid, s in pairs:
        old = before.get(sid)
        if not old:
            continue
        rates[sid] = {
            f"{d}_{k}": max(0.0, (s.get(f"{d}_{src}", 0) - old.get(f"{d}_{src}", 0)) / dt_s)
            * (8 if k == "bps" else 1)
            for d in ("rx", "tx")
            for k, src in (("bps", "bytes"), ("pps", "packets"))
        }
    return rates


def _rate_line(r: dict[str, float]) -> str:
    return (
        f"rx {human_rate(r['rx_bps'])} ({r['rx_pps']:.0f} pkt/s), "
        f"tx {human_rate(r['tx_bps'])} ({r['tx_pps']:.0f} pkt/s)"
    )


def _dns_line(dns: dict[str, Any]) -> str:
    state = dns.get("state", "off")
    if dns.get("configured") is None:
        return "unchanged (no dns key)"
    if state == "waiting":
        return 'waiting: dns = "relay" and the relay named no resolvers'
    servers = ", ".join(dns.get("servers") or [])
    search = " ".join(dns.get("search") or [])
    line = f"{state} via {dns.get('backend', '?')}: {servers or 'none'}"
    if search:
        line += f" (search {search})"
    if dns.get("source") == "relay":
        line += ", named by the relay"
    if dns.get("error"):
        line += f"; {dns['error']}"
    return line


def render_text(doc: dict[str, Any], rates: Rates | None = None) -> str:
    """A status document the way ``wg show`` prints an interface and its peers."""
    now = float(doc.get("time") or time.time())
    role = doc.get("role", "?")
    out: list[str] = [f"instance: {doc.get('instance')}"]

    def kv(key: str, value: object, indent: int = 2) -> None:
        out.append(f"{' ' * indent}{key}: {value}")

    kv("role", f"{role}, pid {doc.get('pid')}, up {human_duration(doc.get('uptime', 0))}")
    if role == "relay":
        in_use = doc.get("transports_in_use") or {}
        used = ", ".join(f"{mode} {n}" for mode, n in sorted(in_use.items())) or "none"
        tcp = doc.get("listen_tcp")
        where = f"{doc.get('listen')} (udp)"
        if tcp:
            where = (
                f"{doc.get('listen')} (udp, tcp)"
                if tcp == doc.get("listen")
                else (f"{where}, {tcp} (tcp)")
            )
        by_http: dict[str, int] = {}
        for s in doc.get("sessions", []):
            if s.get("http"):
                by_http[s["http"]] = by_http.get(s["http"], 0) + 1
        http = ", ".join(f"{v} {n}" for v, n in sorted(by_http.items(), reverse=True))
        kv(
            "listening",
            f"{where}, serves {' and '.join(doc['transports'])}, "
            f"sessions by transport: {used}" + (f", by HTTP version: {http}" if http else ""),
        )
    else:
        state = doc.get("state", "?")
        err = f" (last error: {doc['last_error']})" if doc.get("last_error") else ""
        kv("relay", f"{doc.get('relay')} ({doc.get('server_name', '')}), {state}{err}")
        wanted = ", ".join(doc.get("transports", []))
        sessions = doc.get("sessions") or [{}]
        now_mode, http = sessions[0].get("transport"), sessions[0].get("http")
        in_use = f" -> {now_mode} over {http}" if state == "connected" and http else ""
        kv("transport", f"{wanted}{in_use}")
        why = sessions[0].get("http_reason")
        versions = ", ".join(doc.get("http_versions") or [])
        kv("http", f"{versions}" + (f" -> {http} ({why})" if state == "connected" and http else ""))
    tun = doc.get("tun", {})
    kv("tun", f"{tun.get('name')}, mtu {tun.get('mtu')}")
    if role == "relay":
        pool = doc.get("pool") or {}
        kv(
            "pool",
            f"{', '.join(doc.get('pool_networks', []))} "
            f"({pool.get('used', 0)}/{pool.get('capacity', 0)} in use)",
        )
        for w in doc.get("workers") or []:
            restarts = f", restarted {w['restarts']}x" if w.get("restarts") else ""
            kv(
                f"worker {w['index']}",
                f"pid {w.get('pid')}, {w.get('state')}{restarts}, tun {w.get('tun')}, "
                f"pool {', '.join(w.get('pool', []))}",
            )
        kv("routes", ", ".join(doc.get("routes", [])) or "none")
        kv("egress", doc.get("egress"))
        nat = doc.get("nat")
        if nat is None:
            kv("nat", "off")
        else:
            cmds = "; ".join(nat.get("commands", []))
            kv("nat", f"{nat.get('backend')}" + (f" ({cmds})" if cmds else ""))
            out += [f"    {line}" for line in _nat_lines(nat)]
        results = doc.get("results", {})
        kv("requests", ", ".join(f"{k} {v}" for k, v in sorted(results.items())) or "none yet")
    else:
        fwmark = doc.get("fwmark")
        kv("routes", ", ".join(doc.get("routes", [])) or "none")
        kv("fwmark", f"{fwmark:#x}" if fwmark else "off")
        kv("connects", f"{doc.get('connects', 0)}")
        if doc.get("dns"):
            kv("dns", _dns_line(doc["dns"]))
        ks = doc.get("kill_switch") or {}
        if ks.get("enabled"):
            allow = ", ".join(ks.get("allow") or []) or "nothing else"
            where = "installed" if ks.get("installed") else "NOT installed"
            kv("kill switch", f"{where} ({ks.get('table')}), allows {allow}")
    hs = doc.get("handshake") or {}
    if hs.get("count"):
        kv("handshakes", f"{hs['count']}, average {hs['sum'] / hs['count'] * 1000:.1f} ms")
    totals = doc.get("totals", {})
    kv(
        "transfer",
        f"{human_bytes(totals.get('rx_bytes', 0))} received ({totals.get('rx_packets', 0)} "
        f"packets), {human_bytes(totals.get('tx_bytes', 0))} sent "
        f"({totals.get('tx_packets', 0)} packets)",
    )
    kv("drops", _drops(totals.get("drops", {})))
    if rates and "total" in rates:
        kv("rate", _rate_line(rates["total"]))
    if doc.get("metrics"):
        kv("metrics", f"http://{doc['metrics']}/metrics")

    for s in doc.get("sessions", []):
        out.append("")
        if role == "relay":
            out.append(f"session: {s.get('id')}")
            if "worker" in s:
                kv("worker", s["worker"])
            if s.get("identity"):
                kv("identity", s["identity"])
            kv("remote", s.get("peer"))
        else:
            out.append(f"tunnel: {s.get('peer')}")
        kv("addresses", ", ".join(s.get("addresses", [])) or "none")
        kv("transport", f"{s.get('transport')}, {s.get('state')}")
        if s.get("connected_since"):
            since = dt.datetime.fromtimestamp(s["connected_since"]).strftime("%Y-%m-%d %H:%M:%S")
            kv("connected", f"{_ago(now, s['connected_since'])} (since {since})")
        kv(
            "transfer",
            f"{human_bytes(s.get('rx_bytes', 0))} received ({s.get('rx_packets', 0)} packets), "
            f"{human_bytes(s.get('tx_bytes', 0))} sent ({s.get('tx_packets', 0)} packets)",
        )
        if rates and s.get("id") in rates:
            kv("rate", _rate_line(rates[s["id"]]))
        kv("drops", _drops(s.get("drops", {})))
        rtt = s.get("rtt_ms")
        cwnd = s.get("cwnd")
        quic = [f"rtt {rtt:.1f} ms" if rtt is not None else "rtt n/a"]
        if cwnd is not None:
            quic.append(f"cwnd {human_bytes(cwnd)}")
        if s.get("bytes_in_flight") is not None:
            quic.append(f"in flight {human_bytes(s['bytes_in_flight'])}")
        # The connection under the session: QUIC for HTTP/3, TCP (TCP_INFO) for HTTP/2.
        kv("tcp" if s.get("http") == "h2" else "quic", ", ".join(quic))
        last = max(s.get("last_rx") or 0, s.get("last_tx") or 0) or None
        kv("latest packet", _ago(now, last))
    return "\n".join(out) + "\n"


# -- CLI side: fetching ------------------------------------------------------------------


def fetch(name: str, nat: bool = True, timeout: float = 10.0) -> dict[str, Any]:
    """The status document of a running instance (raises OSError / ControlError)."""
    from masqued.observe.control import request

    return request(name, "status", {"nat": nat}, timeout=timeout)


def watch(
    name: str,
    interval: float = 1.0,
    count: int | None = None,
    write: Callable[[str], object] | None = None,
    clear: bool = True,
) -> None:
    """Redraw the status of ``name`` every ``interval`` seconds with rates (like watch(1)).

    One control connection is kept for the whole run. ``count`` bounds the number of
    refreshes (None: until interrupted).
    """
    import sys

    from masqued.observe.control import ControlClient

    out = write or sys.stdout.write
    interval = max(0.1, interval)
    prev: dict[str, Any] | None = None
    shown = 0
    with ControlClient(socket_path(name)) as client:
        while count is None or shown < count:
            doc = client.request("status", {"nat": prev is None})
            if prev is not None and prev.get("nat") is not None:
                doc["nat"] = prev["nat"]  # listed once; the rule does not change by itself
            rates = compute_rates(prev, doc)
            head = f"Every {interval:g}s: masqued status {name}    {time.strftime('%H:%M:%S')}\n\n"
            with contextlib.suppress(BrokenPipeError):
                out(("\x1b[H\x1b[2J" if clear else "") + head + render_text(doc, rates))
                if write is None:
                    sys.stdout.flush()
            prev = doc
            shown += 1
            if count is None or shown < count:
                time.sleep(interval)
