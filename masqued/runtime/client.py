"""A client instance as wg-quick-style actions: TUN, routes and rules, the tunnel,
reload, stop — each a method, each host change logged as it is made.

Order on start: clean up leftovers, refuse a routing loop, pre_up, the kill switch,
create the TUN, then keep the tunnel up (ClientTunnel); every answer of the relay
(addresses, routes, resolvers) sets the host state the client should have
(host/routes.py client_state, then the resolvers: DNS goes to the tunnel only once
the routes are there). READY and post_up once the first tunnel is up. The TUN,
routes, DNS and kill switch stay while the client reconnects. Stop: pre_down, the
tunnel, DNS back, kill switch off, TUN and routes, post_down.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from pathlib import Path
from typing import Any

from masqued.config import ClientConfig
from masqued.host.killswitch import KillSwitch, KillSwitchError, KillSwitchRules
from masqued.host.resolver import (
    RESOLV_CONF,
    RESOLVED_RUN,
    RESOLVED_STUB,
    ResolverBackend,
    ResolverConfig,
    ResolverError,
    check,
    choose,
    make_backend,
)
from masqued.host.routes import Router, client_state
from masqued.host.rtnetlink import RtNetlink
from masqued.host.tun import TunDevice, open_tun
from masqued.observe.control import run_dir
from masqued.observe.status import StatusService
from masqued.proto.dns import DnsInfo
from masqued.proto.request import TunnelParams
from masqued.proto.template import UriTemplate
from masqued.runtime import hooks
from masqued.runtime.instance import Instance, StartupError, changed_keys, not_yet, start_status
from masqued.runtime.service import Notifier, format_uptime, freeze_startup_objects, set_level
from masqued.transport.client import ClientSettings, ClientTunnel

log = logging.getLogger("masqued")

RESTART_KEYS = (
    "uri_template",
    "relay_host",
    "relay_port",
    "server_name",
    "ca",
    "mtu",
    "fwmark",
    "transport",
    "address_request",
    "http_version",
    "fallback_after",
    "h3_retry",
    "h2_port",
    "quic_engine",
    "event_loop",
)
# Keys of config.host (masqued.config.host) a reload does not apply.
HOST_RESTART_KEYS = (
    "dns",
    "dns_from_relay",
    "dns_search",
    "dns_backend",
    "kill_switch",
    "kill_switch_allow",
    "hooks",
)


def _changes_dns(config: ClientConfig) -> bool:
    host = config.host
    return bool(host.dns or host.dns_from_relay or host.kill_switch)


def host_nameservers(
    path: Path = RESOLV_CONF, upstream: Path = RESOLVED_RUN / "resolv.conf"
) -> tuple[str, ...]:
    """The host's own nameservers, read before the client changes anything: those of
    /etc/resolv.conf, or, when that is resolved's stub (which would send the relay's
    name to the tunnel's resolvers, and whose own queries the kill switch drops),
    the upstream servers resolved lists in /run/systemd/resolve/resolv.conf."""
    servers = _nameservers(path)
    if RESOLVED_STUB in servers:
        servers = [s for s in _nameservers(upstream) if s != RESOLVED_STUB]
    return tuple(servers)


def _nameservers(path: Path) -> list[str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    servers = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            with contextlib.suppress(ValueError):
                servers.append(str(ipaddress.ip_address(parts[1])))
    return servers


def client_settings(config: ClientConfig, fwmark: int) -> ClientSettings:
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
        routes=tuple(config.routes),
        template=UriTemplate.parse(config.uri_template) if config.uri_template else None,
        http_version=config.http_version,
        fallback_after=config.fallback_after,
        h3_retry=config.h3_retry,
        h2_port=config.h2_port,
        outside_dns=host_nameservers() if _changes_dns(config) else (),
        marked_dns=config.host.kill_switch,
        quic_engine=config.quic_engine,
    )


class ClientInstance(Instance):
    """One client: its TUN, its routes, its tunnel."""

    config: ClientConfig

    def __init__(self, config: ClientConfig, notifier: Notifier) -> None:
        super().__init__(config, notifier)
        self.nl = RtNetlink()
        self.router = Router(self.nl, self.ids)
        self.fwmark = self.ids.fwmark if config.fwmark is None else config.fwmark
        self.routes = tuple(config.routes)
        self.tun: TunDevice | None = None
        self.tunnel: ClientTunnel | None = None
        self.params: TunnelParams | None = None
        self.killswitch: KillSwitch | None = None
        self.resolver: ResolverBackend | None = None
        self.dns: ResolverConfig | None = None  # what is set now
        self.dns_state: dict[str, Any] = {"state": "off"}
        self._stopped = False

    # -- host actions --------------------------------------------------------------------

    async def refuse_loop(self) -> None:
        """Without a fwmark, routes covering the relay would send QUIC into the tunnel."""
        config = self.config
        if self.fwmark:
            return
        try:
            infos = await self.loop.getaddrinfo(
                config.relay_host, config.relay_port, type=socket.SOCK_DGRAM
            )
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

    def add_tun(self) -> TunDevice:
        self.tun = open_tun(self.ids.tun, self.config.mtu)
        return self.tun

    def set_routes(self) -> None:
        """Addresses, routes and rules for what the relay gave and what we route."""
        if self.params is None:
            return
        reached = self.router.set(
            client_state(self.ids, self.routes, self.params.addresses, self.fwmark)
        )
        log.debug("host state: %s", reached)

    def add_kill_switch(self) -> None:
        """Before the TUN exists: nothing leaves but through it (or to the relay)."""
        config = self.config
        if not config.host.kill_switch:
            return
        self.killswitch = KillSwitch(self.ids)
        rules = KillSwitchRules(
            tun=self.ids.tun,
            fwmark=self.fwmark,
            udp_port=config.relay_port,
            tcp_port=None if config.http_version == "h3" else config.h2_port or config.relay_port,
            allow=config.host.kill_switch_allow,
        )
        try:
            self.killswitch.apply(rules)
        except (KillSwitchError, OSError, ValueError) as exc:
            raise StartupError(f"cannot install the kill switch: {exc}") from None

    def remove_kill_switch(self) -> None:
        if self.killswitch is None or self.killswitch.rules is None:
            return
        try:
            self.killswitch.remove()
        except (KillSwitchError, OSError) as exc:
            log.error("cannot remove the kill switch (masqued cleanup removes it): %s", exc)

    def wanted_dns(self) -> ResolverConfig | None:
        """The resolver configuration the config and the relay ask for now."""
        host = self.config.host
        told: DnsInfo | None = self.params.dns if self.params is not None else None
        if host.dns_from_relay:
            if not told or not told.servers:
                return None
            servers, search = told.servers, (*told.search, *host.dns_search)
            domains = tuple(d for d in told.domains if d)
        elif host.dns:
            servers, search, domains = host.dns, host.dns_search, ()
        else:
            return None
        return ResolverConfig(
            servers=tuple(servers),
            search=tuple(dict.fromkeys(search)),
            domains=domains,
            all_names=self.config.full_tunnel,
        )

    def set_dns(self) -> None:
        """Point the host's resolver at the tunnel's resolvers (after the routes)."""
        host = self.config.host
        wanted = self.wanted_dns()
        if wanted is None:
            if host.dns_from_relay and self.params is not None:
                # The relay stopped naming resolvers (restarted without dns): follow it.
                self.revert_dns()
                if self.dns_state.get("state") != "waiting":
                    log.info('dns = "relay" and the relay names no resolvers (yet): DNS unchanged')
                self.dns_state = {"state": "waiting", "source": "relay"}
            return
        if wanted == self.dns:
            return
        if self.resolver is None:
            kind, why = choose(host.dns_backend)
            log.info("DNS through %s: %s", kind, why)
            self.resolver = make_backend(kind, self.ids, run_dir())
            self.dns_state = {"backend": kind, "why": why}
        state = {
            "backend": self.resolver.kind,
            "why": self.dns_state.get("why"),
            "source": "relay" if host.dns_from_relay else "config",
            "servers": [str(a) for a in wanted.servers],
            "search": list(wanted.search),
            "all_names": wanted.all_names,
        }
        try:
            self.resolver.apply(wanted)
        except (ResolverError, OSError) as exc:
            log.error(
                "cannot set DNS through %s: %s (masqued doctor explains)", self.resolver.kind, exc
            )
            self.dns_state = {**state, "state": "failed", "error": str(exc)}
            return
        self.dns = wanted
        problem = check(self.resolver.kind, self.ids.tun, wanted.servers)
        if problem:
            log.warning("DNS set through %s but not in use: %s", self.resolver.kind, problem)
        self.dns_state = {**state, "state": "applied", "error": problem}

    def revert_dns(self) -> None:
        if self.resolver is None or self.dns is None:
            return
        try:
            self.resolver.remove()
        except (ResolverError, OSError) as exc:
            log.error("cannot put DNS back (masqued cleanup does): %s", exc)
        self.dns = None
        self.dns_state = {**self.dns_state, "state": "off"}

    async def run_hook(self, hook: str) -> bool:
        hooked = self.config.host.hooks
        commands: tuple[str, ...] = getattr(hooked, hook)
        if not commands:
            return True
        return await hooks.run(hook, commands, self.ids.tun, hooked.timeout)

    def on_params(self, params: TunnelParams) -> None:
        """The relay's answer (first, or changed): the host follows it."""
        if params.mtu != self.config.mtu:
            log.info("relay announces mtu %d (ours %d)", params.mtu, self.config.mtu)
        missing = [
            r
            for r in self.routes
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
        self.params = params
        self.set_routes()
        self.set_dns()

    # -- reload ------------------------------------------------------------------------

    def reload(self) -> None:
        new = self.reread()
        if not isinstance(new, ClientConfig):
            return
        restart = changed_keys(self.config, new, RESTART_KEYS)
        restart += changed_keys(self.config.host, new.host, HOST_RESTART_KEYS)
        if restart:
            log.warning("reload: %s changed; restart the instance to apply", ", ".join(restart))
        if new.routes != self.config.routes:
            self.routes = tuple(new.routes)
            self.set_routes()
            if self.tunnel is not None:
                self.tunnel.set_routes(self.routes)
            log.info("reload: routes now %s", ", ".join(map(str, self.routes)))
        set_level(new.log_level)
        self.config = new
        log.info("reloaded %s", new.path)
        note = f"; needs a restart: {', '.join(restart)}" if restart else ""
        self.reload_done(True, f"reloaded {new.path}{note}")

    # -- what it reports ---------------------------------------------------------------

    def status_line(self) -> str:
        config = self.config
        assert self.tunnel is not None
        st = self.tunnel.status
        if st.state == "connected" and st.params is not None:
            addrs = ", ".join(str(a.ip) for a in st.params.addresses)
            up = ""
            if st.connected_since is not None:
                up = f", up {format_uptime(time.time() - st.connected_since)}"
            current = self.tunnel.current
            over = ", over HTTP/2" if current is not None and current.http == "h2" else ""
            return (
                f"client: connected to {config.relay_host}:{config.relay_port} as {addrs}{up}{over}"
            )
        err = f" ({st.last_error})" if st.last_error else ""
        return f"client: {st.state} to {config.relay_host}:{config.relay_port}{err}"

    def snapshot(self) -> dict[str, Any]:
        doc = not_yet(self, self.tunnel)
        host = self.config.host
        configured: str | list[str] | None = (
            "relay" if host.dns_from_relay else [str(a) for a in host.dns] or None
        )
        doc["dns"] = {
            "configured": configured,
            "state": "off",
            **self.dns_state,
        }
        doc["kill_switch"] = (
            self.killswitch.describe()
            if self.killswitch is not None
            else {"enabled": False, "installed": False}
        )
        return doc

    # -- life --------------------------------------------------------------------------

    async def run(self) -> int:
        service = await start_status(StatusService(lambda: self.config, self.snapshot))
        self.cleanup()
        try:
            await self.refuse_loop()
            if not await self.run_hook("pre_up"):
                raise StartupError("pre_up failed: not starting (see the log for its output)")
            self.add_kill_switch()
            tun = self.add_tun()
            self.tunnel = tunnel = ClientTunnel(
                self.loop,
                client_settings(self.config, self.fwmark),
                tun,
                self.on_params,
                on_state=lambda st: reporter.update(),
            )
            reporter = self.report_status(self.status_line)
            self.install_signals(self.reload)
            freeze_startup_objects()
            first_up: asyncio.Future[None] = self.loop.create_future()
            runner = self.loop.create_task(tunnel.run(first_up))
            stopper = self.loop.create_task(self.stop_event.wait())
            waiters: set[asyncio.Future[Any]] = {first_up, stopper}
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if first_up.done():
                reporter.ready()
                await self.run_hook("post_up")
                await stopper
            log.info("stopping")
            self.notifier.stopping()
            await self.run_hook("pre_down")
            tunnel.stop()
            await asyncio.wait_for(runner, 2.0)
            self.stop()
            await self.run_hook("post_down")
            return 0
        finally:
            with contextlib.suppress(Exception):
                self.remove_signals()
            await service.close()
            self.stop()

    def stop(self) -> None:
        """Tear down in reverse (idempotent: the finally of run calls it again)."""
        if self.tunnel is not None:
            self.tunnel.stop()
        self.revert_dns()
        self.remove_kill_switch()
        if self.tun is not None:
            self.tun.close()
            self.tun = None
        if not self._stopped:
            self._stopped = True
            self.cleanup()
            self.nl.close()


async def run_client(config: ClientConfig, notifier: Notifier) -> int:
    return await ClientInstance(config, notifier).run()
