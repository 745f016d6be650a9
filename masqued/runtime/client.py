"""A client instance as wg-quick-style actions: TUN, routes and rules, the tunnel,
reload, stop — each a method, each host change logged as it is made.

Order on start: clean up leftovers, refuse a routing loop, create the TUN, then keep
the tunnel up (ClientTunnel); every answer of the relay (addresses, routes) sets the
host state the client should have (host/routes.py client_state). READY once the
first tunnel is up. The TUN and routes stay while the client reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from typing import Any

from masqued.config import ClientConfig
from masqued.host.routes import Router, client_state
from masqued.host.rtnetlink import RtNetlink
from masqued.host.tun import TunDevice, open_tun
from masqued.observe.status import StatusService
from masqued.proto.request import TunnelParams
from masqued.proto.template import UriTemplate
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

    # -- reload ------------------------------------------------------------------------

    def reload(self) -> None:
        new = self.reread()
        if not isinstance(new, ClientConfig):
            return
        restart = changed_keys(self.config, new, RESTART_KEYS)
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
                f"client: connected to {config.relay_host}:{config.relay_port} as {addrs}{up}"
                f"{over}"
            )
        err = f" ({st.last_error})" if st.last_error else ""
        return f"client: {st.state} to {config.relay_host}:{config.relay_port}{err}"

    def snapshot(self) -> dict[str, Any]:
        return not_yet(self, self.tunnel)

    # -- life --------------------------------------------------------------------------

    async def run(self) -> int:
        service = await start_status(StatusService(lambda: self.config, self.snapshot))
        self.cleanup()
        try:
            await self.refuse_loop()
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
                await stopper
            log.info("stopping")
            self.notifier.stopping()
            tunnel.stop()
            await asyncio.wait_for(runner, 2.0)
            return 0
        finally:
            with contextlib.suppress(Exception):
                self.remove_signals()
            await service.close()
            self.stop()

    def stop(self) -> None:
        if self.tunnel is not None:
            self.tunnel.stop()
        if self.tun is not None:
            self.tun.close()
        self.cleanup()
        self.nl.close()


async def run_client(config: ClientConfig, notifier: Notifier) -> int:
    return await ClientInstance(config, notifier).run()
