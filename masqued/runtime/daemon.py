"""One instance's life: host set-up, the data path, reload and clean shutdown.

Order on start: clean up leftovers of a crashed earlier run, create the TUN, set
addresses/routes/rules, forwarding and NAT, then open the socket and tell systemd
READY. On stop everything is torn down by the same name-derived cleanup that
``masqued cleanup NAME`` runs, so nothing depends on in-memory state surviving.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from masqued.config import ClientConfig, ConfigError, RelayConfig, load_config
from masqued.gate.access import AccessControl, LeaseStore, state_dir_for
from masqued.gate.ipam import AddressPool, pool_slice
from masqued.host.cleanup import cleanup_instance
from masqued.host.naming import (
    RULE_PRIORITY_SUPPRESS,
    RULE_PRIORITY_TABLE,
    InstanceIds,
)
from masqued.host.nat import NatBackend, make_nat
from masqued.host.routes import (
    NetState,
    Route,
    Router,
    Rule,
    default_interface,
    enable_forwarding,
)
from masqued.host.rtnetlink import RtNetlink
from masqued.host.sysctl import SysctlRecord
from masqued.host.tun import TunDevice, inherited_tun, open_tun
from masqued.observe.control import ControlSocketBusy
from masqued.observe.metrics import TrafficCounters
from masqued.observe.status import StatusService
from masqued.proto.request import TunnelParams
from masqued.runtime.service import (
    Notifier,
    StatusReporter,
    Watchdog,
    format_uptime,
    freeze_startup_objects,
    runtime_dir,
    set_level,
    watchdog_interval,
    write_reload_result,
)
from masqued.runtime.workers import (
    READY_TIMEOUT,
    Uplink,
    WorkerProcess,
    mark_worker,
    merge_snapshots,
)
from masqued.transport.balance import Balancer, RetryTokens
from masqued.transport.client import ClientSettings, ClientStatus, ClientTunnel
from masqued.transport.relay import RelayServer, RelaySettings
from masqued.transport.steering import reuseport_group

log = logging.getLogger("masqued")

MAIN_TABLE = 254
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class StartupError(Exception):
    """The instance cannot start; the message says why and what to do."""


class Instance:
    """Shared plumbing: signals, reload, status, shutdown."""

    def __init__(self, config: RelayConfig | ClientConfig, notifier: Notifier) -> None:
        self.config = config
        self.ids = InstanceIds(config.name)
        self.notifier = notifier
        self.loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        self.started = time.time()
        # WATCHDOG=1 from the loop itself: a stuck loop stops the pings.
        self.watchdog = Watchdog(notifier, watchdog_interval())
        self.watchdog.start(self.loop)
        self.status: StatusReporter | None = None
        self.reloads = 0

    def install_signals(self, reload: Callable[[], None]) -> None:
        # Handlers only wake the loop; the work happens in the loop.
        self.loop.add_signal_handler(signal.SIGTERM, self.stop_event.set)
        self.loop.add_signal_handler(signal.SIGINT, self.stop_event.set)
        self.loop.add_signal_handler(signal.SIGHUP, reload)

    def remove_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self.loop.remove_signal_handler(sig)
        self.watchdog.stop()
        if self.status is not None:
            self.status.stop()

    def report_status(self, line: Callable[[], str]) -> StatusReporter:
        """Keep STATUS= current from ``line()`` (sent on change and refreshed)."""
        self.status = StatusReporter(self.notifier, line)
        self.status.start(self.loop)
        return self.status

    def reload_done(self, ok: bool, message: str) -> None:
        """READY=1 again after RELOADING=1, and the verdict for ``masqued reload``."""
        self.reloads += 1
        write_reload_result(runtime_dir(), self.reloads, ok, message)
        if self.status is not None:
            self.status.ready()
        else:
            self.notifier.send("READY=1")

    def reread(self) -> RelayConfig | ClientConfig | None:
        """Load the config again; on error log it and keep the running one."""
        self.notifier.reloading()
        try:
            new = load_config(self.config.path, self.config.name)
        except ConfigError as exc:
            log.error("reload rejected, keeping the running configuration: %s", exc)
            self.reload_done(False, f"{exc} (running configuration kept)")
            return None
        if type(new) is not type(self.config):
            log.error("reload rejected: mode changed (restart the instance to change it)")
            self.reload_done(False, f"{new.path}: mode changed; restart the instance to change it")
            return None
        return new

    def cleanup(self) -> None:
        cleanup_instance(self.ids)  # logs each removal itself


async def start_status(service: StatusService) -> StatusService:
    """Open the control socket (and metrics); a live one means a second copy: refuse."""
    try:
        await service.start()
    except ControlSocketBusy as exc:
        raise StartupError(
            f"instance {service.ids.name} is already running (its control socket {exc} "
            "answers); stop it first"
        ) from None
    except OSError as exc:
        # Serving packets matters more than being observable: carry on without it.
        log.error(
            "cannot open the control socket %s: %s (masqued status will not see this instance)",
            service.control.path,
            exc.strerror or exc,
        )
    return service


def _changed_keys(old: Any, new: Any, keys: tuple[str, ...]) -> list[str]:
    return [k for k in keys if getattr(old, k) != getattr(new, k)]


# -- relay ---------------------------------------------------------------------------


# What a running relay cannot change on reload (pool growth is the exception, with one
# worker); the running values stay in force until a restart.
RELAY_RESTART_KEYS = ("listen_host", "listen_port", "pool", "egress", "nat", "mtu", "workers")


async def run_relay(config: RelayConfig, notifier: Notifier) -> int:
    inst = Instance(config, notifier)
    ids = inst.ids
    nl = RtNetlink()
    nat: NatBackend | None = None
    server: RelayServer | None = None
    tun = None
    extra: dict[str, Any] = {}
    workers: list[WorkerProcess] = []
    tuns: list[TunDevice] = []
    socks: list[socket.socket] = []
    shares: list[tuple[IPNetwork, ...]] = []

    def snapshot() -> dict[str, Any]:
        if server is None or not workers:
            return _not_yet(inst, server)
        own = mark_worker(server.snapshot(), 0)
        return merge_snapshots([own, *(w.snapshot for w in workers if w.snapshot is not None)])

    def extras() -> dict[str, Any]:
        if not workers:
            return extra
        main = {"index": 0, "pid": os.getpid(), "state": "running", "restarts": 0}
        return extra | {
            "workers": [
                {
                    **(main if w is None else w.describe()),
                    "tun": tuns[k].name,
                    "pool": [str(n) for n in shares[k]],
                }
                for k, w in enumerate([None, *workers])
            ]
        }

    # Before cleanup: a second copy of a running instance would tear down its TUN.
    service = await start_status(StatusService(lambda: inst.config, snapshot, extra=extras))
    inst.cleanup()  # leftovers of a crashed earlier run
    try:
        count = config.workers
        # Worker k serves its share of the pool on its own TUN (masqued.runtime.workers).
        shares.extend(pool_slice(config.pool, k, count) for k in range(count))
        pool = AddressPool(shares[0])
        for k in range(count):
            tuns.append(open_tun(ids.worker_tun(k), config.mtu))
            gateways = pool.gateways() if k == 0 else AddressPool(shares[k]).gateways()
            Router(nl, replace(ids, worker=k)).set(
                NetState(addresses=frozenset(gateways), routes=frozenset(), rules=frozenset())
            )
        tun = tuns[0]
        router = Router(nl, ids)  # worker 0's TUN: the one pool growth extends
        v4 = any(n.version == 4 for n in config.pool)
        v6 = any(n.version == 6 for n in config.pool)
        egress = config.egress
        if egress == "auto":
            found = default_interface(4 if v4 else 6) or default_interface(6 if v4 else 4)
            if found is None:
                raise StartupError(
                    'egress = "auto" but this host has no default route; '
                    'set egress = "IFNAME" in the config'
                )
            egress = found
        # Recorded, so that stop (and `masqued cleanup`) switches them back.
        record = SysctlRecord(ids.name)
        enable_forwarding([t.name for t in tuns] + [egress], v4=v4, v6=v6, record=record)
        nat = make_nat(config.nat, ids)
        if nat is not None:
            nat.apply(list(config.pool), egress)
            log.info(
                "NAT (%s): masquerading %s out of %s",
                nat.kind,
                ", ".join(map(str, config.pool)),
                egress,
            )
        access = _access_control(config)
        leases = LeaseStore(_lease_file(config, 0))
        try:
            socks.extend(reuseport_group(config.listen_host, config.listen_port, count))
        except OSError as exc:
            workers_note = f" with {count} workers" if count > 1 else ""
            raise StartupError(
                f"cannot listen on {config.listen_host}:{config.listen_port}/udp"
                f"{workers_note}: {exc.strerror or exc}"
            ) from exc
        # Workers share a Retry token key, to send new clients to the least busy one.
        retry_key = os.urandom(32)
        balancer = Balancer(0, count, RetryTokens(retry_key)) if count > 1 else None
        server = RelayServer(
            inst.loop,
            socks[0],
            tun,
            pool,
            _relay_settings(config, 0),
            access=access,
            leases=leases,
            balancer=balancer,
        )

        def loads() -> list[int]:
            """Sessions per worker: this process's own, the others' last reported."""
            assert server is not None
            return [len(server.sessions)] + [
                len(w.snapshot["sessions"]) if w.snapshot is not None else 0 for w in workers
            ]

        def status() -> str:
            # Counts only: STATUS= follows every session change, a full snapshot
            # (a dict per session) is for `masqued status`.
            reports = [w.snapshot["pool"] for w in workers if w.snapshot is not None]
            used = pool.used() + sum(r["used"] for r in reports)
            capacity = pool.capacity() + sum(r["capacity"] for r in reports)
            return (
                f"relay: {sum(loads())} clients, pool {used}/{capacity} used, listening on "
                f"{config.listen_host}:{config.listen_port}"
                + (f", {count} workers" if count > 1 else "")
            )

        reporter = inst.report_status(status)
        reported: list[int] = []

        def changed() -> None:
            """Sessions came or went somewhere: STATUS=, and every worker's loads."""
            reporter.update()
            if balancer is None:
                return
            now = loads()
            if now != reported:
                reported[:] = now
                balancer.report(now)
                for w in workers:
                    w.send({"loads": now})

        server.on_change = changed

        def reload() -> None:
            nonlocal config
            new = inst.reread()
            if not isinstance(new, RelayConfig):
                return
            restart = _changed_keys(config, new, RELAY_RESTART_KEYS)
            assert server is not None and tun is not None
            try:
                new_access = _access_control(new)
            except StartupError as exc:
                log.error("reload rejected, keeping the running configuration: %s", exc)
                inst.reload_done(False, str(exc))
                return
            added = _pool_growth(config.pool, new.pool)
            if "pool" in restart and added and count == 1:
                try:
                    _grow_pool(pool, added, new.pool, router, tun.name, egress, nat)
                except (OSError, ValueError) as exc:
                    log.error("reload: cannot grow the pool by %s: %s", added, exc)
                else:
                    server.pool_changed()
                    restart.remove("pool")
            if restart:
                log.warning(
                    "reload: %s changed; restart the instance to apply "
                    "(running sessions kept as they are)",
                    ", ".join(restart),
                )
                # Keep describing what really runs until the restart.
                new = replace(new, **{key: getattr(config, key) for key in restart})
            _apply_reload(server, new, 0, new_access)
            config = new
            inst.config = new
            for w in workers:  # each re-reads the file this process just accepted
                w.signal(signal.SIGHUP)
            log.info("reloaded %s", new.path)
            note = f"; needs a restart: {', '.join(restart)}" if restart else ""
            inst.reload_done(True, f"reloaded {new.path}{note}")

        inst.install_signals(reload)
        server.start()
        service.nat = nat
        extra["egress"] = egress
        if count > 1:
            workers.extend(
                WorkerProcess(
                    index=k,
                    count=count,
                    config_path=str(config.path),
                    name=config.name,
                    tun_fd=tuns[k].fileno(),
                    udp_fd=socks[k].fileno(),
                    vnet=tuns[k].vnet,
                    log_level=config.log_level,
                    pool=config.pool,
                    mtu=config.mtu,
                    on_change=changed,
                    shutting_down=inst.stop_event.is_set,
                    retry_key=retry_key,
                )
                for k in range(1, count)
            )
            try:
                await asyncio.gather(*(w.start() for w in workers))
            except RuntimeError as exc:
                raise StartupError(f"relay workers: {exc}") from exc
        log.info(
            "relay %s listening on %s:%d (udp), tun %s, pool %s%s",
            ids.name,
            config.listen_host,
            config.listen_port,
            ", ".join(t.name for t in tuns),
            ", ".join(map(str, config.pool)),
            f", {count} workers" if count > 1 else "",
        )
        freeze_startup_objects()
        reporter.ready()
        await inst.stop_event.wait()
        log.info("stopping")
        notifier.stopping()
        return 0
    finally:
        with contextlib.suppress(Exception):
            inst.remove_signals()
        await service.close()
        if workers:
            await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)
        if server is not None:
            server.close()
            # Give the CONNECTION_CLOSE frames a moment to leave.
            await asyncio.sleep(0.05)
        for sock in socks:
            sock.close()
        for t in tuns:
            t.close()
        inst.cleanup()
        nl.close()


def _pool_growth(old: tuple[IPNetwork, ...], new: tuple[IPNetwork, ...]) -> tuple[IPNetwork, ...]:
    """The networks a reload adds, if it only adds (else empty: needs a restart)."""
    if len(new) > len(old) and new[: len(old)] == old:
        return new[len(old) :]
    return ()


def _grow_pool(
    pool: AddressPool,
    added: tuple[IPNetwork, ...],
    networks: tuple[IPNetwork, ...],
    router: Router,
    tun: str,
    egress: str,
    nat: NatBackend | None,
) -> None:
    """Pool growth on reload: more client addresses, without touching sessions."""
    pool.add_networks(added)
    router.set(
        NetState(addresses=frozenset(pool.gateways()), routes=frozenset(), rules=frozenset())
    )
    families = {n.version for n in networks}
    enable_forwarding(
        [tun, egress], v4=4 in families, v6=6 in families, record=SysctlRecord(router.ids.name)
    )
    if nat is not None:
        nat.apply(list(networks), egress)
    log.info("reload: pool grown by %s", ", ".join(map(str, added)))


def _access_control(config: RelayConfig) -> AccessControl:
    """Credentials and per-client policy; an unreadable tokens file or CRL is fatal."""
    try:
        access = AccessControl(config)
    except (OSError, ValueError) as exc:
        raise StartupError(f"{config.path}: authentication: {exc}") from exc
    if access.open:
        log.warning(
            'auth = "none": anyone who can reach this relay can use it as a proxy; '
            'set auth = "mtls" and/or "token" unless the network is closed'
        )
    else:
        log.info(
            "authentication: %s; %d client policies", " or ".join(config.auth), len(config.clients)
        )
    return access


def _relay_settings(config: RelayConfig, worker: int) -> RelaySettings:
    count = config.workers
    return RelaySettings(
        mtu=config.mtu,
        routes=tuple(config.routes),
        certificate=str(config.certificate),
        private_key=str(config.private_key),
        # Each worker admits its part of the limit (it cannot see the others').
        max_clients=None if config.max_clients is None else -(-config.max_clients // count),
        worker=worker,
        workers=count,
    )


def _apply_reload(
    server: RelayServer, config: RelayConfig, worker: int, access: AccessControl
) -> None:
    """What a reload changes in a running relay worker (the main process's included)."""
    server.update_settings(_relay_settings(config, worker))
    server.update_access(access)
    set_level(config.log_level)


def _lease_file(config: RelayConfig, worker: int) -> Path | None:
    """Where worker ``worker`` keeps its identities' last addresses (with auth only)."""
    if not config.auth:
        return None
    return state_dir_for(config) / ("leases.json" if worker == 0 else f"leases-w{worker}.json")


async def run_worker(config: RelayConfig, index: int, fds: tuple[int, int, int], vnet: bool) -> int:
    """``masqued worker``: relay worker ``index`` of ``config.workers`` on the TUN and
    UDP socket its parent made (masqued.runtime.workers); reports over the ``ipc`` fd."""
    loop = asyncio.get_running_loop()
    tun_fd, udp_fd, ipc_fd = fds
    count = config.workers
    ids = InstanceIds(config.name, worker=index)
    tun = inherited_tun(tun_fd, ids.tun, config.mtu, vnet)
    sock = socket.socket(fileno=udp_fd)
    pool = AddressPool(pool_slice(config.pool, index, count))
    access = _access_control(config)
    leases = LeaseStore(_lease_file(config, index))
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=ipc_fd))
    # The first message: the Retry token key the workers share (masqued.transport.balance).
    try:
        first = json.loads(await asyncio.wait_for(reader.readline(), READY_TIMEOUT))
        retry_key = bytes.fromhex(first["retry_key"])
    except (TimeoutError, ValueError, KeyError, TypeError) as exc:
        raise StartupError(f"relay worker {index}: no key from the main process ({exc})") from None
    balancer = Balancer(index, count, RetryTokens(retry_key))
    server = RelayServer(
        loop,
        sock,
        tun,
        pool,
        _relay_settings(config, index),
        access=access,
        leases=leases,
        balancer=balancer,
    )
    uplink = Uplink(writer, server.snapshot)
    server.on_change = uplink.changed

    async def downlink() -> None:
        """The main process's messages (every worker's loads) until it goes away."""
        with contextlib.suppress(OSError):  # ECONNRESET: gone with our messages unread
            while line := await reader.readline():
                with contextlib.suppress(ValueError, TypeError, KeyError):
                    msg = json.loads(line)
                    if isinstance(msg, dict) and isinstance(msg.get("loads"), list):
                        balancer.report(msg["loads"])

    stop = asyncio.Event()

    def reload() -> None:
        nonlocal config
        try:
            new = load_config(config.path, config.name)
        except ConfigError as exc:
            log.error("reload: %s (keeping the running configuration)", exc)
            return
        if not isinstance(new, RelayConfig):
            return
        try:
            new_access = _access_control(new)
        except StartupError as exc:
            log.error("reload: %s (keeping the running configuration)", exc)
            return
        # As the main process does: what needs a restart keeps its running value.
        new = replace(new, **{k: getattr(config, k) for k in RELAY_RESTART_KEYS})
        _apply_reload(server, new, index, new_access)
        config = new
        log.info("relay worker %d: reloaded %s", index, new.path)

    # The main process stops the workers; Ctrl-C in a terminal reaches every process
    # of the group, so this one leaves SIGINT to it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    server.start()
    freeze_startup_objects()
    uplink.send({"ready": True, "pid": os.getpid()})
    uplink.changed()
    ticker = loop.create_task(uplink.tick())
    stopped = loop.create_task(stop.wait())
    orphaned = loop.create_task(downlink())  # ends once the main process is gone
    try:
        await asyncio.wait({stopped, orphaned}, return_when=asyncio.FIRST_COMPLETED)
        if orphaned.done():
            log.warning("relay worker %d: the main process is gone; stopping", index)
    finally:
        for task in (ticker, stopped, orphaned):
            task.cancel()
        server.close()
        await asyncio.sleep(0.05)  # CONNECTION_CLOSE frames
        uplink.close()
    return 0


# -- client ----------------------------------------------------------------------------


def client_netstate(
    ids: InstanceIds, routes: tuple[IPNetwork, ...], params: TunnelParams, fwmark: int
) -> NetState:
    """What the client's host should look like once the tunnel is up.

    With a fwmark (default) the tunnel routes live in the instance's own table,
    consulted for every packet not carrying the mark; the QUIC socket carries the
    mark, so the relay stays reachable whatever the routes cover. Full-tunnel routes
    also get wg-quick's ``suppress_prefixlength 0`` rule so that the main table's
    specific routes keep working.
    """
    families = {a.version for a in params.addresses}
    usable = tuple(r for r in routes if r.version in families)
    table = ids.table if fwmark else MAIN_TABLE
    route_set = frozenset(Route(dst=r, dev=ids.tun, table=table) for r in usable)
    rules: set[Rule] = set()
    if fwmark:
        for family in sorted({r.version for r in usable}):
            rules.add(
                Rule(
                    family=family,
                    priority=RULE_PRIORITY_TABLE,
                    table=ids.table,
                    fwmark=fwmark,
                    invert=True,
                )
            )
            if any(r.prefixlen == 0 for r in usable if r.version == family):
                rules.add(
                    Rule(
                        family=family,
                        priority=RULE_PRIORITY_SUPPRESS,
                        table=MAIN_TABLE,
                        fwmark=fwmark,
                        invert=True,
                        suppress_prefixlength=0,
                    )
                )
    return NetState(addresses=frozenset(params.addresses), routes=route_set, rules=frozenset(rules))


async def run_client(config: ClientConfig, notifier: Notifier) -> int:
    inst = Instance(config, notifier)
    ids = inst.ids
    nl = RtNetlink()
    router = Router(nl, ids)
    fwmark = ids.fwmark if config.fwmark is None else config.fwmark
    tunnel: ClientTunnel | None = None
    tun = None
    routes = tuple(config.routes)
    service = await start_status(StatusService(lambda: inst.config, lambda: _not_yet(inst, tunnel)))
    inst.cleanup()
    try:
        if not fwmark:
            await _refuse_loop(config)
        tun = open_tun(ids.tun, config.mtu)
        last_params: TunnelParams | None = None

        def on_params(params: TunnelParams) -> None:
            nonlocal last_params
            if params.mtu != config.mtu:
                log.info("relay announces mtu %d (ours %d)", params.mtu, config.mtu)
            missing = [
                r
                for r in routes
                if not any(
                    r.version == a.version and r.subnet_of(a)  # type: ignore[arg-type]
                    for a in params.routes
                )
            ]
            if missing:
                log.warning(
                    "relay does not advertise %s; packets there may be dropped",
                    ", ".join(map(str, missing)),
                )
            reached = router.set(client_netstate(ids, routes, params, fwmark))
            log.debug("host state: %s", reached)
            last_params = params

        def status_line(st: ClientStatus | None = None) -> str:
            assert tunnel is not None
            st = tunnel.status
            if st.state == "connected" and st.params is not None:
                addrs = ", ".join(str(a.ip) for a in st.params.addresses)
                up = ""
                if st.connected_since is not None:
                    up = f", up {format_uptime(time.time() - st.connected_since)}"
                return (
                    f"client: connected to {config.relay_host}:{config.relay_port} as {addrs}{up}"
                )
            err = f" ({st.last_error})" if st.last_error else ""
            return f"client: {st.state} to {config.relay_host}:{config.relay_port}{err}"

        tunnel = ClientTunnel(
            inst.loop,
            _client_settings(config, fwmark),
            tun,
            on_params,
            on_state=lambda st: reporter.update(),
        )
        reporter = inst.report_status(status_line)

        def reload() -> None:
            nonlocal config, routes
            new = inst.reread()
            if not isinstance(new, ClientConfig):
                return
            restart = _changed_keys(
                config,
                new,
                (
                    "relay_host",
                    "relay_port",
                    "server_name",
                    "ca",
                    "mtu",
                    "fwmark",
                    "transport",
                    "address_request",
                ),
            )
            if restart:
                log.warning("reload: %s changed; restart the instance to apply", ", ".join(restart))
            if new.routes != config.routes:
                routes = tuple(new.routes)
                if last_params is not None:
                    router.set(client_netstate(ids, routes, last_params, fwmark))
                log.info("reload: routes now %s", ", ".join(map(str, routes)))
            set_level(new.log_level)
            config = new
            inst.config = new
            log.info("reloaded %s", new.path)
            note = f"; needs a restart: {', '.join(restart)}" if restart else ""
            inst.reload_done(True, f"reloaded {new.path}{note}")

        inst.install_signals(reload)
        freeze_startup_objects()
        first_up: asyncio.Future[None] = inst.loop.create_future()
        runner = inst.loop.create_task(tunnel.run(first_up))
        stopper = inst.loop.create_task(inst.stop_event.wait())
        waiters: set[asyncio.Future[Any]] = {first_up, stopper}
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if first_up.done():
            reporter.ready()
            await stopper
        log.info("stopping")
        notifier.stopping()
        tunnel.stop()
        await asyncio.wait_for(runner, 2.0)
        return 0
    finally:
        with contextlib.suppress(Exception):
            inst.remove_signals()
        await service.close()
        if tunnel is not None:
            tunnel.stop()
        if tun is not None:
            tun.close()
        inst.cleanup()
        nl.close()


def _not_yet(inst: Instance, part: RelayServer | ClientTunnel | None) -> dict[str, Any]:
    """The running part's snapshot, or a minimal one while the instance still starts."""
    if part is not None:
        return part.snapshot()
    now = time.time()
    return {
        "role": inst.config.mode,
        "time": now,
        "started": inst.started,
        "uptime": now - inst.started,
        "state": "starting",
        "sessions": [],
        "totals": TrafficCounters().snapshot(),
    }


def _client_settings(config: ClientConfig, fwmark: int) -> ClientSettings:
    return ClientSettings(
        relay_host=config.relay_host,
        relay_port=config.relay_port,
        server_name=config.server_name,
        ca=str(config.ca),
        mtu=config.mtu,
        fwmark=fwmark,
        keepalive=config.keepalive,
        reconnect_max=config.reconnect_max,
        transport=config.transport,
        address_request=config.address_request,
        certificate=str(config.certificate) if config.certificate else None,
        private_key=str(config.private_key) if config.private_key else None,
        token_file=str(config.token_file) if config.token_file else None,
        request_versions=tuple(sorted({r.version for r in config.routes})),
    )


async def _refuse_loop(config: ClientConfig) -> None:
    """Without a fwmark, routes covering the relay would send QUIC into the tunnel."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(config.relay_host, config.relay_port, type=socket.SOCK_DGRAM)
    except OSError:
        return  # resolution failures are reported by the connect loop
    for info in infos:
        addr = ipaddress.ip_address(info[4][0])
        for route in config.routes:
            if addr.version == route.version and addr in route:
                raise StartupError(
                    f"{config.path}: routes: {route} covers the relay {addr} and fwmark is "
                    "off: the tunnel would carry its own packets (routing loop); "
                    'remove fwmark = "off" or narrow the routes'
                )


def run(config: RelayConfig | ClientConfig, notifier: Notifier | None = None) -> int:
    """Run one instance until SIGTERM/SIGINT; returns the exit code."""
    notifier = notifier or Notifier()
    try:
        if isinstance(config, RelayConfig):
            return asyncio.run(run_relay(config, notifier))
        return asyncio.run(run_client(config, notifier))
    except StartupError as exc:
        log.error("%s", exc)
        notifier.status(f"failed: {exc}")
        return 1
    finally:
        notifier.close()
