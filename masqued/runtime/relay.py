"""A relay instance as wg-quick-style actions: TUNs, addresses, forwarding, NAT, listen,
serve, workers, reload, stop — each a method, each host change logged as it is made.

Order on start: clean up leftovers of a crashed earlier run, create the TUNs (one
per worker) with the pool's gateway addresses, turn on forwarding, apply NAT, open
the UDP sockets, serve, start the workers, then tell systemd READY. Everything is
torn down by the same name-derived cleanup that ``masqued cleanup NAME`` runs.
A worker process (``run_worker``) serves its share on what the main process made,
and reloads through the same ``reload_server`` as the main process.
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
from dataclasses import replace
from pathlib import Path
from typing import Any

from masqued.config import ConfigError, RelayConfig, load_config
from masqued.gate.access import AccessControl, LeaseStore, state_dir_for
from masqued.gate.ipam import AddressPool, pool_slice
from masqued.gate.policy import relay_addresses
from masqued.host.naming import InstanceIds
from masqued.host.nat import NatBackend, make_nat
from masqued.host.netstate import NetState
from masqued.host.routes import Router, default_interface, enable_forwarding
from masqued.host.rtnetlink import RtNetlink
from masqued.host.sysctl import SysctlRecord
from masqued.host.tun import TunDevice, inherited_tun, open_tun
from masqued.observe.status import StatusService
from masqued.proto.dns import DnsInfo
from masqued.proto.template import UriTemplate
from masqued.runtime.instance import Instance, StartupError, changed_keys, not_yet, start_status
from masqued.runtime.service import Notifier, freeze_startup_objects, set_level
from masqued.runtime.workers import (
    READY_TIMEOUT,
    Uplink,
    WorkerProcess,
    mark_worker,
    merge_snapshots,
)
from masqued.transport.balance import Balancer, RetryTokens
from masqued.transport.relay import RelayServer, RelaySettings
from masqued.transport.steering import reuseport_group
from masqued.transport.tcpendpoint import listen_tcp

log = logging.getLogger("masqued")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# What a running relay cannot change on reload (pool growth is the exception, with one
# worker); the running values stay in force until a restart.
RESTART_KEYS = (
    "listen_host",
    "listen_port",
    "listen_tcp",
    "pool",
    "egress",
    "nat",
    "mtu",
    "workers",
    "quic_engine",
    "event_loop",
)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def access_control(config: RelayConfig) -> AccessControl:
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


def relay_dns(config: RelayConfig) -> DnsInfo | None:
    """The resolvers the relay tells its clients: they serve every name ("" = the
    root, draft-ietf-masque-connect-ip-dns §3)."""
    if not config.dns:
        return None
    return DnsInfo(servers=config.dns, search=config.dns_search, domains=("",))


def relay_settings(config: RelayConfig, worker: int) -> RelaySettings:
    count = config.workers
    # Every worker's gateways (each share's subnets) are the relay's own addresses.
    shares = [n for k in range(count) for n in pool_slice(config.pool, k, count)]
    return RelaySettings(
        mtu=config.mtu,
        routes=tuple(config.routes),
        certificate=str(config.certificate),
        private_key=str(config.private_key),
        # Each worker admits its part of the limit (it cannot see the others').
        max_clients=None if config.max_clients is None else -(-config.max_clients // count),
        worker=worker,
        workers=count,
        templates=(UriTemplate.parse(config.uri_template),) if config.uri_template else (),
        client_ca=str(config.client_ca) if "mtls" in config.auth and config.client_ca else None,
        relay_addresses=relay_addresses([*config.pool, *shares]),
        dns=relay_dns(config),
        quic_engine=config.quic_engine,
    )


def lease_file(config: RelayConfig, worker: int) -> Path | None:
    """Where worker ``worker`` keeps its identities' last addresses (with auth only)."""
    if not config.auth:
        return None
    return state_dir_for(config) / ("leases.json" if worker == 0 else f"leases-w{worker}.json")


def reload_server(
    server: RelayServer,
    running: RelayConfig,
    new: RelayConfig,
    worker: int,
    access: AccessControl | None = None,
) -> tuple[RelayConfig, list[str]]:
    """What a reload changes in a running relay process (main or worker): settings,
    credentials, ACLs, log level. Returns the configuration now in force (keys that
    need a restart keep their running values) and those keys. StartupError if the new
    credentials cannot be loaded (the running ones stay)."""
    if access is None:
        access = access_control(new)
    restart = changed_keys(running, new, RESTART_KEYS)
    if restart:
        new = replace(new, **{key: getattr(running, key) for key in restart})
    server.update_settings(relay_settings(new, worker))
    server.update_access(access)
    set_level(new.log_level)
    return new, restart


def pool_growth(old: tuple[IPNetwork, ...], new: tuple[IPNetwork, ...]) -> tuple[IPNetwork, ...]:
    """The networks a reload adds, if it only adds (else empty: needs a restart)."""
    if len(new) > len(old) and new[: len(old)] == old:
        return new[len(old) :]
    return ()


class RelayInstance(Instance):
    """One relay: its host state, its server and workers."""

    config: RelayConfig

    def __init__(self, config: RelayConfig, notifier: Notifier) -> None:
        super().__init__(config, notifier)
        self.nl = RtNetlink()
        self.count = config.workers
        # Worker k serves its share of the pool on its own TUN (runtime/workers.py).
        self.shares = [pool_slice(config.pool, k, self.count) for k in range(self.count)]
        self.pool = AddressPool(self.shares[0])
        self.tuns: list[TunDevice] = []
        self.socks: list[socket.socket] = []
        self.tcp_socks: list[socket.socket] = []  # one per worker (HTTP/2), or none
        self.workers: list[WorkerProcess] = []
        self.egress = ""
        self.nat: NatBackend | None = None
        self.server: RelayServer | None = None
        self.balancer: Balancer | None = None
        self.retry_key = os.urandom(32)
        self.extra: dict[str, Any] = {}
        self._reported: list[int] = []

    # -- host actions --------------------------------------------------------------------

    def add_tuns(self) -> None:
        """One TUN per worker, holding the gateway address of each of its networks."""
        config = self.config
        for k in range(self.count):
            self.tuns.append(open_tun(self.ids.worker_tun(k), config.mtu))
            gateways = self.pool.gateways() if k == 0 else AddressPool(self.shares[k]).gateways()
            self.set_addresses(k, frozenset(gateways))

    def set_addresses(self, worker: int, addresses: frozenset[Any]) -> None:
        Router(self.nl, replace(self.ids, worker=worker)).set(
            NetState(addresses=addresses, routes=frozenset(), rules=frozenset())
        )

    def find_egress(self) -> str:
        config = self.config
        egress = config.egress
        if egress != "auto":
            return egress
        v4 = any(n.version == 4 for n in config.pool)
        found = default_interface(4 if v4 else 6) or default_interface(6 if v4 else 4)
        if found is None:
            raise StartupError(
                'egress = "auto" but this host has no default route; '
                'set egress = "IFNAME" in the config'
            )
        return found

    def set_forwarding(self, pool: tuple[IPNetwork, ...]) -> None:
        families = {n.version for n in pool}
        # Recorded, so that stop (and `masqued cleanup`) switches them back.
        enable_forwarding(
            [t.name for t in self.tuns] + [self.egress],
            v4=4 in families,
            v6=6 in families,
            record=SysctlRecord(self.ids.name),
        )

    def set_nat(self, pool: tuple[IPNetwork, ...]) -> None:
        if self.nat is None:
            self.nat = make_nat(self.config.nat, self.ids)
        if self.nat is not None:
            self.nat.apply(list(pool), self.egress)
            log.info(
                "NAT (%s): masquerading %s out of %s",
                self.nat.kind,
                ", ".join(map(str, pool)),
                self.egress,
            )

    def listen(self) -> None:
        """The UDP sockets (one per worker, steered by connection ID) and, unless
        listen_tcp is off, the TCP ones (SO_REUSEPORT)."""
        config = self.config
        workers_note = f" with {self.count} workers" if self.count > 1 else ""
        try:
            self.socks.extend(reuseport_group(config.listen_host, config.listen_port, self.count))
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {config.listen_host}:{config.listen_port}/udp"
                f"{workers_note}: {exc.strerror or exc}"
            ) from exc
        if config.listen_tcp is None:
            return
        host, port = config.listen_tcp
        try:
            self.tcp_socks.extend(listen_tcp(host, port, self.count))
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {_hostport(host, port)}/tcp{workers_note}: "
                f'{exc.strerror or exc} (set listen_tcp to another port, or "off")'
            ) from exc

    def serve(self) -> RelayServer:
        config = self.config
        # Workers share a Retry token key, to send new clients to the least busy one.
        if self.count > 1:
            self.balancer = Balancer(0, self.count, RetryTokens(self.retry_key))
        server = RelayServer(
            self.loop,
            self.socks[0],
            self.tuns[0],
            self.pool,
            relay_settings(config, 0),
            access=access_control(config),
            leases=LeaseStore(lease_file(config, 0)),
            balancer=self.balancer,
            tcp_socks=self.tcp_socks[:1],
        )
        server.on_change = self.changed
        self.server = server
        return server

    async def start_workers(self) -> None:
        config = self.config
        self.workers.extend(
            WorkerProcess(
                index=k,
                count=self.count,
                config_path=str(config.path),
                name=config.name,
                tun_fd=self.tuns[k].fileno(),
                udp_fd=self.socks[k].fileno(),
                tcp_fd=self.tcp_socks[k].fileno() if self.tcp_socks else -1,
                vnet=self.tuns[k].vnet,
                log_level=config.log_level,
                pool=config.pool,
                mtu=config.mtu,
                on_change=self.changed,
                shutting_down=self.stop_event.is_set,
                retry_key=self.retry_key,
            )
            for k in range(1, self.count)
        )
        try:
            await asyncio.gather(*(w.start() for w in self.workers))
        except RuntimeError as exc:
            raise StartupError(f"relay workers: {exc}") from exc

    def grow_pool(self, added: tuple[IPNetwork, ...], networks: tuple[IPNetwork, ...]) -> None:
        """Pool growth on reload: more client addresses, without touching sessions."""
        assert self.server is not None
        self.pool.add_networks(added)
        self.set_addresses(0, frozenset(self.pool.gateways()))
        self.set_forwarding(networks)
        self.set_nat(networks)
        self.server.pool_changed()
        log.info("reload: pool grown by %s", ", ".join(map(str, added)))

    # -- reload ------------------------------------------------------------------------

    def reload(self) -> None:
        new = self.reread()
        if not isinstance(new, RelayConfig):
            return
        running = self.config
        server = self.server
        assert server is not None
        try:
            access = access_control(new)
        except StartupError as exc:
            log.error("reload rejected, keeping the running configuration: %s", exc)
            self.reload_done(False, str(exc))
            return
        added = pool_growth(running.pool, new.pool)
        if added and self.count == 1:
            try:
                self.grow_pool(added, new.pool)
            except (OSError, ValueError) as exc:
                log.error("reload: cannot grow the pool by %s: %s", added, exc)
            else:
                running = replace(running, pool=new.pool)
        applied, restart = reload_server(server, running, new, 0, access)
        if restart:
            log.warning(
                "reload: %s changed; restart the instance to apply "
                "(running sessions kept as they are)",
                ", ".join(restart),
            )
        self.config = applied
        for w in self.workers:  # each re-reads the file this process just accepted
            w.signal(signal.SIGHUP)
        log.info("reloaded %s", new.path)
        note = f"; needs a restart: {', '.join(restart)}" if restart else ""
        self.reload_done(True, f"reloaded {new.path}{note}")

    # -- what it reports ---------------------------------------------------------------

    def loads(self) -> list[int]:
        """Sessions per worker: this process's own, the others' last reported."""
        assert self.server is not None
        return [len(self.server.tunnels)] + [
            len(w.snapshot["sessions"]) if w.snapshot is not None else 0 for w in self.workers
        ]

    def changed(self) -> None:
        """Sessions came or went somewhere: STATUS=, and every worker's loads."""
        if self.status is not None:
            self.status.update()
        if self.balancer is None:
            return
        now = self.loads()
        if now != self._reported:
            self._reported = now
            self.balancer.report(now)
            for w in self.workers:
                w.send({"loads": now})

    def status_line(self) -> str:
        # Counts only: STATUS= follows every session change, a full snapshot (a dict
        # per session) is for `masqued status`.
        config = self.config
        reports = [w.snapshot["pool"] for w in self.workers if w.snapshot is not None]
        used = self.pool.used() + sum(r["used"] for r in reports)
        capacity = self.pool.capacity() + sum(r["capacity"] for r in reports)
        tcp = " (udp, tcp)" if config.listen_tcp == (config.listen_host, config.listen_port) else ""
        if config.listen_tcp is not None and not tcp:
            tcp = f" (udp), {_hostport(*config.listen_tcp)} (tcp)"
        return (
            f"relay: {sum(self.loads())} clients, pool {used}/{capacity} used, listening on "
            f"{_hostport(config.listen_host, config.listen_port)}{tcp}"
            + (f", {self.count} workers" if self.count > 1 else "")
        )

    def snapshot(self) -> dict[str, Any]:
        if self.server is None or not self.workers:
            return not_yet(self, self.server)
        own = mark_worker(self.server.snapshot(), 0)
        return merge_snapshots([own, *(w.snapshot for w in self.workers if w.snapshot is not None)])

    def extras(self) -> dict[str, Any]:
        if not self.workers:
            return self.extra
        main = {"index": 0, "pid": os.getpid(), "state": "running", "restarts": 0}
        return self.extra | {
            "workers": [
                {
                    **(main if w is None else w.describe()),
                    "tun": self.tuns[k].name,
                    "pool": [str(n) for n in self.shares[k]],
                }
                for k, w in enumerate([None, *self.workers])
            ]
        }

    # -- life --------------------------------------------------------------------------

    async def run(self) -> int:
        # Before cleanup: a second copy of a running instance would tear down its TUN.
        service = await start_status(
            StatusService(lambda: self.config, self.snapshot, extra=self.extras)
        )
        self.cleanup()  # leftovers of a crashed earlier run
        try:
            config = self.config
            self.add_tuns()
            self.egress = self.find_egress()
            self.set_forwarding(config.pool)
            self.set_nat(config.pool)
            self.listen()
            server = self.serve()
            reporter = self.report_status(self.status_line)
            self.install_signals(self.reload)
            server.start()
            service.nat = self.nat
            self.extra["egress"] = self.egress
            if self.count > 1:
                await self.start_workers()
            log.info(
                "relay %s listening on %s (udp)%s, tun %s, pool %s%s",
                self.ids.name,
                _hostport(config.listen_host, config.listen_port),
                f" and {_hostport(*config.listen_tcp)} (tcp, HTTP/2)" if config.listen_tcp else "",
                ", ".join(t.name for t in self.tuns),
                ", ".join(map(str, config.pool)),
                f", {self.count} workers" if self.count > 1 else "",
            )
            freeze_startup_objects()
            reporter.ready()
            await self.stop_event.wait()
            log.info("stopping")
            self.notifier.stopping()
            return 0
        finally:
            with contextlib.suppress(Exception):
                self.remove_signals()
            await service.close()
            await self.stop()

    async def stop(self) -> None:
        if self.workers:
            await asyncio.gather(*(w.stop() for w in self.workers), return_exceptions=True)
        if self.server is not None:
            self.server.close()
            # Give the CONNECTION_CLOSE frames a moment to leave.
            await asyncio.sleep(0.05)
        for sock in self.socks + self.tcp_socks:
            sock.close()
        for t in self.tuns:
            t.close()
        self.cleanup()
        self.nl.close()


async def run_relay(config: RelayConfig, notifier: Notifier) -> int:
    return await RelayInstance(config, notifier).run()


async def run_worker(
    config: RelayConfig, index: int, fds: tuple[int, int, int], vnet: bool, tcp_fd: int = -1
) -> int:
    """``masqued worker``: relay worker ``index`` of ``config.workers`` on the TUN and
    UDP socket (and listening TCP socket) its parent made (runtime/workers.py); reports
    over the ``ipc`` fd."""
    loop = asyncio.get_running_loop()
    tun_fd, udp_fd, ipc_fd = fds
    count = config.workers
    ids = InstanceIds(config.name, worker=index)
    tun = inherited_tun(tun_fd, ids.tun, config.mtu, vnet)
    sock = socket.socket(fileno=udp_fd)
    pool = AddressPool(pool_slice(config.pool, index, count))
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=ipc_fd))
    # The first message: the Retry token key the workers share (transport/balance.py).
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
        relay_settings(config, index),
        access=access_control(config),
        leases=LeaseStore(lease_file(config, index)),
        balancer=balancer,
        tcp_socks=[socket.socket(fileno=tcp_fd)] if tcp_fd >= 0 else [],
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
            config, _ = reload_server(server, config, new, index)
        except StartupError as exc:
            log.error("reload: %s (keeping the running configuration)", exc)
            return
        log.info("relay worker %d: reloaded %s", index, new.path)

    # The main process stops the workers; Ctrl-C in a terminal reaches every process
    # of the group, so this one leaves SIGINT to it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def guarded_reload() -> None:
        try:
            reload()
        except Exception as exc:  # the main process answers systemd; this one logs
            log.exception("relay worker %d: reload failed: %s", index, exc)

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGHUP, guarded_reload)
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
