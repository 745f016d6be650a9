"""The client's tunnel: the TUN device <-> one CONNECT-IP session to the relay.

``ClientTunnel.run`` keeps a tunnel up for as long as the daemon runs: each attempt
makes a link (an HTTP/3 connection, or HTTP/2 over TLS over TCP), sends the extended
CONNECT once the relay's SETTINGS allow it, applies the relay's answer (addresses,
routes, MTU) through a callback, and moves packets. When the relay goes away the TUN
and routes stay and the client reconnects with capped exponential backoff.

``http_version = "auto"`` races the two the way Happy Eyeballs races address
families: HTTP/3 first, HTTP/2 as well once no QUIC handshake has completed within
``fallback_after`` (at once if UDP failed outright, or if the last tunnel had to fall
back), the first tunnel up wins. On HTTP/2 it tries HTTP/3 again every ``h3_retry``
seconds and moves the tunnel there once a CONNECT over it is admitted; the relay
gives the identity the same address, so the TUN, the routes and the flows stay.
The protocol itself is the ClientSession's (proto/session.py); how packets leave is
the data plane's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import ipaddress
import logging
import random
import socket
import time
from collections.abc import Callable
from typing import Any

from masqued.host.dns import DnsError, resolve_marked
from masqued.host.tun import Tun
from masqued.logutil import RateLimitedLog
from masqued.proto.drops import DROP_DISCONNECTED, DROP_MALFORMED, DROP_OVERSIZED, DROP_TUN_WRITE
from masqued.proto.errors import ProtocolError, ResponseError
from masqued.proto.framings import Mode
from masqued.proto.packet import addresses
from masqued.proto.request import TunnelParams
from masqued.transport import engines
from masqued.transport.attempt import (
    Attempt,
    ClientSettings,
    ClientStatus,
    TunnelFailed,
    TunnelRefused,
)
from masqued.transport.h2link import ALPN as H2_ALPN
from masqued.transport.h2link import H2Link
from masqued.transport.h3link import H3Link, monotonic
from masqued.transport.link import NullHandler
from masqued.transport.tcp import TlsPipe, client_context, tune_tcp
from masqued.transport.udp import Address, UdpSocket, tune_socket

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The settings and status types live with the attempt; the tunnel is where callers meet them.
__all__ = ["ClientSettings", "ClientStatus", "ClientTunnel", "TunnelFailed", "TunnelRefused"]

log = logging.getLogger("masqued.client")

# The handshake, SETTINGS and the CONNECT response must all arrive within this time.
CONNECT_TIMEOUT = 5.0
HTTP_VERSIONS = ("auto", "h3", "h2")
BACKOFF_INITIAL = 0.25
TUN_READ_BATCH = 256


class ClientTunnel:
    """Keeps one CONNECT-IP tunnel up and pumps packets between it and the TUN."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        settings: ClientSettings,
        tun: Tun,
        on_params: Callable[[TunnelParams], None],
        on_state: Callable[[ClientStatus], None] | None = None,
    ) -> None:
        if settings.http_version not in HTTP_VERSIONS:
            raise ValueError(f"unknown http_version {settings.http_version!r}")
        self.loop = loop
        self.settings = settings
        self.tun = tun
        # Packets from the relay, written to the TUN once per UDP batch (write_tun).
        self._tun_out: list[bytes] = []
        self.batching = False
        self.on_params = on_params
        self.on_state = on_state
        self.status = ClientStatus()
        self.current: Attempt | None = None  # the attempt whose tunnel is up
        self.attempt: Attempt | None = None  # the attempt in progress (or up)
        self.live: set[Attempt] = set()  # every attempt not yet over (races, probes)
        self.ratelog = RateLimitedLog(log)
        self._relay_addrs: list[tuple[int, Any]] = []  # the last (family, address) found
        self._stopping = False
        self._stop_event = asyncio.Event()
        # Set once the relay ended a tunnel in answer to an ADDRESS_REQUEST: later
        # attempts let it assign addresses unprompted (RFC 9484 allows either).
        self.without_address_request = False
        # Set when the last tunnel had to fall back to HTTP/2 (no QUIC handshake):
        # the next race starts both at once instead of giving HTTP/3 a head start.
        self.h3_blocked = False

    # -- lifecycle --------------------------------------------------------------------

    async def run(self, first_up: asyncio.Future[None] | None = None) -> None:
        """Connect and reconnect until ``stop()``; ``first_up`` resolves at the first tunnel."""
        self.loop.add_reader(self.tun.fileno(), self._tun_ready)
        backoff = BACKOFF_INITIAL
        try:
            while not self._stopping:
                began = monotonic()
                try:
                    reason = await self._attempt(first_up)
                except TunnelFailed as exc:
                    reason = str(exc)
                    self.status.last_error = reason
                except OSError as exc:
                    reason = f"cannot reach relay: {exc.strerror or exc}"
                    self.status.last_error = reason
                if self._stopping:
                    break
                if monotonic() - began > 2 * self.settings.dead_after:
                    backoff = BACKOFF_INITIAL  # the tunnel was up for a while: retry soon
                delay = min(backoff, self.settings.reconnect_max) * random.uniform(0.8, 1.2)
                self._set_state("reconnecting")
                # Keyed by reason: a new kind of failure (e.g. a 403 after a reset) is
                # always logged; repeats of one are rate-limited.
                self.ratelog.warning(
                    f"down:{reason[:80]}", "tunnel down: %s; reconnecting in %.1fs", reason, delay
                )
                backoff = min(backoff * 2, self.settings.reconnect_max)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop_event.wait(), delay)
        finally:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(self.tun.fileno())

    def stop(self) -> None:
        self._stopping = True
        self._stop_event.set()
        for attempt in list(self.live):
            attempt.fail("client shutting down")

    async def _resolve(self) -> list[tuple[int, Any]]:
        """The relay's addresses. Before the first tunnel (no routes of ours yet) and
        without a fwmark: the system resolver (it knows /etc/hosts and nsswitch).
        Once our routes are in place their queries would enter the tunnel, which is
        down when we reconnect: then they leave from sockets with the fwmark
        (masqued.host.dns), and when that finds nothing, the last addresses known."""
        settings = self.settings
        host, port = settings.relay_host, settings.relay_port
        try:
            ipaddress.ip_address(host)
            literal = True
        except ValueError:
            literal = False
        first = self.status.connects == 0 and not settings.marked_dns
        if literal or not settings.fwmark or first:
            infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            found: list[tuple[int, Any]] = [(info[0], info[4]) for info in infos]
            if not found:
                raise TunnelFailed(f"cannot resolve {host}")
        else:
            prefer = self._relay_addrs[0][0] if self._relay_addrs else socket.AF_INET
            try:
                found = list(
                    await self.loop.run_in_executor(
                        None,
                        functools.partial(
                            resolve_marked,
                            host,
                            port,
                            settings.fwmark,
                            prefer=prefer,
                            servers=settings.outside_dns or None,
                        ),
                    )
                )
            except DnsError as exc:
                if not self._relay_addrs and settings.marked_dns:
                    return await self._resolve_system(host, port, exc)
                if not self._relay_addrs:
                    raise TunnelFailed(f"cannot resolve {host} outside the tunnel: {exc}") from None
                self.ratelog.warning(
                    f"dns:{host}",
                    "cannot resolve %s outside the tunnel (%s): trying its last address %s",
                    host,
                    exc,
                    self._relay_addrs[0][1][0],
                )
                found = self._relay_addrs
        self._relay_addrs = found
        return found

    async def _resolve_system(self, host: str, port: int, why: DnsError) -> list[tuple[int, Any]]:
        """The system resolver after marked DNS found nothing (/etc/hosts, say)."""
        try:
            infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError:
            raise TunnelFailed(f"cannot resolve {host} outside the tunnel: {why}") from None
        self._relay_addrs = [(info[0], info[4]) for info in infos]
        return self._relay_addrs

    def _set_state(self, state: str) -> None:
        self.status.state = state
        if self.on_state is not None:
            self.on_state(self.status)

    async def _attempt(self, first_up: asyncio.Future[None] | None) -> str:
        """One tunnel, from connecting until it is over: returns why it ended."""
        self._set_state("connecting")
        attempt = await self._establish()
        keepalive: asyncio.Task[None] | None = None
        try:
            self._up(attempt)
            if first_up is not None and not first_up.done():
                first_up.set_result(None)
            while True:
                keepalive = self.loop.create_task(self._keepalive(attempt))
                reason, moved = await self._serve(attempt)
                keepalive.cancel()
                if moved is None:
                    return reason
                attempt = moved
        finally:
            if keepalive is not None:
                keepalive.cancel()
            self.current = None
            self.attempt = None
            for live in list(self.live):
                live.fail("attempt ended")

    def _up(self, attempt: Attempt) -> None:
        """``attempt`` carries the tunnel now: host state, status, log."""
        # The latest: capsules that came after the first answer (DNS_ASSIGN follows
        # the routes) but before this attempt carried the tunnel changed it already.
        params = attempt.session.params or attempt.ready.result()
        settings = self.settings
        st = self.status
        if params != st.params:
            self.on_params(params)
        self.current = self.attempt = attempt
        st.relay_addr = attempt.link.peer
        st.params = params
        st.connected_since = st.connected_since if st.state == "connected" else time.time()
        st.connects += 1
        st.handshakes.observe(monotonic() - attempt.started)
        st.last_error = None
        self._set_state("connected")
        log.info(
            "tunnel up: %s via %s over %s as %s, mtu %d (%s)",
            settings.authority,
            attempt.link.peer,
            "HTTP/3" if attempt.http == "h3" else "HTTP/2",
            ", ".join(str(a.ip) for a in params.addresses),
            params.mtu,
            st.http_reason,
        )

    async def _keepalive(self, attempt: Attempt) -> None:
        interval = min(self.settings.keepalive, 1.0)
        while not attempt.closed:
            await asyncio.sleep(interval)
            attempt.keepalive()

    # -- links ------------------------------------------------------------------------

    async def _address(self, http: str) -> tuple[int, Address]:
        """Where to reach the relay over ``http``: its first address, on h2_port for
        HTTP/2 (the same as HTTP/3's unless configured)."""
        found = await self._resolve()
        if self._stopping:
            raise TunnelFailed("client shutting down")
        family, addr = found[0]
        settings = self.settings
        if http == "h2" and settings.h2_port and settings.h2_port != settings.relay_port:
            addr = (addr[0], settings.h2_port, *addr[2:])
        return family, addr

    def _token(self) -> str | None:
        return self.settings.token()

    async def _start(self, http: str) -> Attempt:
        """Start an attempt over ``http`` ("h3" or "h2"); it is tracked in ``live``."""
        family, addr = await self._address(http)
        attempt = self._start_h3(family, addr) if http == "h3" else self._start_h2(family, addr)
        self.live.add(attempt)
        attempt.done.add_done_callback(lambda _: self.live.discard(attempt))
        return attempt

    def _start_h3(self, family: int, addr: Address) -> Attempt:
        settings = self.settings
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if settings.fwmark:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, settings.fwmark)
            tune_socket(sock)
            sock.connect(addr)
        except OSError:
            sock.close()
            raise
        engine = engines.load(settings.quic_engine)
        config = engine.configuration(
            is_client=True,
            server_name=settings.server_name,
            cafile=settings.ca,
            certificate=settings.certificate,
            private_key=settings.private_key,
        )
        token = self._token()
        quic = engine.client_connection(config)
        attempt: Attempt | None = None

        def on_batch(batch: list[tuple[bytes, Address]]) -> None:
            if attempt is not None and not attempt.closed:
                attempt.datagrams_received(batch)

        udp = UdpSocket(self.loop, sock, on_batch)
        link = H3Link(self.loop, quic, udp.send, NullHandler(), addr, engine)

        def release() -> None:
            link.cancel_timer()
            udp.close()

        attempt = Attempt(self, link, token, release)
        link.handler = attempt
        self.attempt = self.attempt or attempt
        udp.start()
        quic.connect(addr, now=monotonic())
        link.flush()
        return attempt

    def _start_h2(self, family: int, addr: Address) -> Attempt:
        settings = self.settings
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            tune_tcp(sock, settings.fwmark)
        except OSError:
            sock.close()
            raise
        context = client_context(settings.ca, H2_ALPN, settings.certificate, settings.private_key)
        token = self._token()
        pipe = TlsPipe(
            self.loop, sock, context, server_side=False, server_hostname=settings.server_name
        )
        link = H2Link(self.loop, pipe, NullHandler(), addr, client=True)
        attempt = Attempt(self, link, token, pipe.close)
        link.handler = attempt
        link.input = attempt.bytes_received
        self.attempt = self.attempt or attempt

        async def connect() -> None:
            try:
                await self.loop.sock_connect(sock, addr)
            except OSError as exc:
                attempt.fail(f"cannot reach relay over TCP: {exc.strerror or exc}")
                return
            if not attempt.closed:
                link.start()

        task = self.loop.create_task(connect())
        attempt.done.add_done_callback(lambda _: task.cancel())
        return attempt

    # -- choosing the HTTP version ----------------------------------------------------

    async def _establish(self) -> Attempt:
        """A tunnel over the configured HTTP version, or raced (auto)."""
        version = self.settings.http_version
        if version == "auto":
            return await self._race()
        attempt = await self._start(version)
        self.status.http_reason = f'http_version = "{version}"'
        await self._ready(attempt, CONNECT_TIMEOUT)
        return attempt

    async def _ready(self, attempt: Attempt, timeout: float) -> None:
        """Wait for ``attempt``'s tunnel; TunnelFailed (or TunnelRefused) if none comes."""
        try:
            await asyncio.wait_for(asyncio.shield(attempt.ready), max(0.0, timeout))
        except TimeoutError:
            attempt.fail("timed out connecting")
            hint = "relay down or UDP blocked?" if attempt.http == "h3" else "relay down?"
            raise TunnelFailed(f"no tunnel within {CONNECT_TIMEOUT:.0f}s ({hint})") from None

    async def _race(self) -> Attempt:
        """HTTP/3 first; HTTP/2 too once HTTP/3 has no QUIC handshake after
        ``fallback_after`` (or failed); the first tunnel up wins."""
        settings = self.settings
        head_start = 0.0 if self.h3_blocked else settings.fallback_after
        errors: dict[str, str] = {}
        h3: Attempt | None = None
        try:
            h3 = await self._start("h3")
        except OSError as exc:
            errors["h3"] = f"cannot reach relay: {exc.strerror or exc}"
        if h3 is not None and head_start > 0:
            first: set[asyncio.Future[Any]] = {h3.reachable, h3.ready}
            await asyncio.wait(first, timeout=head_start, return_when="FIRST_COMPLETED")
            if h3.reachable.done() and not h3.reachable.exception():
                # QUIC works: HTTP/3 it is, whatever the relay answers.
                self.h3_blocked = False
                self.status.http_reason = "HTTP/3 (auto)"
                await self._ready(h3, CONNECT_TIMEOUT - (monotonic() - h3.started))
                return h3
        if h3 is not None:
            if h3.closed:
                errors["h3"] = h3.done.result()
            else:
                errors["h3"] = f"no QUIC handshake within {head_start:.1f}s (UDP blocked?)"
        log.info("HTTP/3: %s; trying HTTP/2 as well", errors["h3"])
        h2: Attempt | None = None
        try:
            h2 = await self._start("h2")
        except OSError as exc:
            errors["h2"] = f"cannot reach relay: {exc.strerror or exc}"
        racing = {a: a.http for a in (h3, h2) if a is not None and not a.closed}
        deadline = {a: a.started + CONNECT_TIMEOUT for a in racing}
        while racing:
            remaining = min(deadline[a] for a in racing) - monotonic()
            readies: set[asyncio.Future[Any]] = {a.ready for a in racing}
            await asyncio.wait(readies, timeout=max(0.0, remaining), return_when="FIRST_COMPLETED")
            for attempt in list(racing):
                if attempt.ready.done():
                    del racing[attempt]
                    error = attempt.ready.exception()
                    if error is None:
                        return self._won(attempt, racing, errors)
                    if isinstance(error, TunnelRefused):
                        for other in racing:
                            other.fail("another attempt was refused")
                        raise error
                    errors[attempt.http] = str(error)
                elif monotonic() >= deadline[attempt]:
                    del racing[attempt]
                    attempt.fail("timed out connecting")
                    if attempt.http == "h3" and "h3" not in errors:
                        errors["h3"] = f"no tunnel within {CONNECT_TIMEOUT:.0f}s"
                    elif attempt.http == "h2":
                        errors["h2"] = f"no tunnel within {CONNECT_TIMEOUT:.0f}s"
        raise TunnelFailed(
            "; ".join(f"{'HTTP/3' if k == 'h3' else 'HTTP/2'}: {v}" for k, v in errors.items())
        )

    def _won(self, winner: Attempt, others: dict[Attempt, str], errors: dict[str, str]) -> Attempt:
        for other in others:
            other.fail(f"{'HTTP/3' if winner.http == 'h3' else 'HTTP/2'} was faster")
        if winner.http == "h3":
            self.h3_blocked = False
            self.status.http_reason = "HTTP/3 (auto)"
        else:
            self.h3_blocked = "h3" in errors and "QUIC handshake" in errors["h3"]
            self.status.http_reason = f"fallback to HTTP/2: HTTP/3 {errors.get('h3', 'slower')}"
        return winner

    async def _serve(self, attempt: Attempt) -> tuple[str, Attempt | None]:
        """Until ``attempt``'s tunnel ends: (why, None); or, in auto mode over HTTP/2,
        until a probe got a tunnel over HTTP/3: ("", that attempt)."""
        probing = self.settings.http_version == "auto" and attempt.http == "h2"
        if not probing:
            return await attempt.done, None
        probe = self.loop.create_task(self._probe_h3())
        try:
            either: set[asyncio.Future[Any]] = {attempt.done, probe}
            await asyncio.wait(either, return_when="FIRST_COMPLETED")
            asked = self._probing is not None and self._probing.stream_id is not None
            if not probe.done() and asked:
                # The relay may end the HTTP/2 tunnel before the new one's answer
                # reaches us (it replaces the identity's old tunnel): wait for it.
                await asyncio.wait({probe}, timeout=CONNECT_TIMEOUT)
            if probe.done() and not probe.cancelled() and probe.exception() is None:
                moved = probe.result()
                self._move(attempt, moved)
                return "", moved
            return await attempt.done, None
        finally:
            probe.cancel()
            if self._probing is not None and self._probing is not self.current:
                self._probing.fail("probe ended")
            self._probing = None

    _probing: Attempt | None = None

    async def _probe_h3(self) -> Attempt:
        """Every h3_retry seconds, try HTTP/3 again; return the first attempt over it
        that got a tunnel. A probe without a QUIC handshake in fallback_after ends
        quietly; only one that reached the relay sends a CONNECT."""
        settings = self.settings
        while True:
            await asyncio.sleep(settings.h3_retry)
            try:
                probe = await self._start("h3")
            except (OSError, TunnelFailed) as exc:
                log.debug("HTTP/3 probe: %s", exc)
                continue
            self._probing = probe
            await asyncio.wait(
                {probe.reachable}, timeout=settings.fallback_after, return_when="FIRST_COMPLETED"
            )
            if not probe.reachable.done() or probe.reachable.exception():
                probe.fail("probe: no QUIC handshake")
                self._probing = None
                log.debug("HTTP/3 probe: no QUIC handshake within %.1fs", settings.fallback_after)
                continue
            try:
                await self._ready(probe, CONNECT_TIMEOUT - (monotonic() - probe.started))
            except TunnelFailed as exc:
                self._probing = None
                self.ratelog.info(f"probe:{exc}"[:80], "HTTP/3 probe: no tunnel: %s", exc)
                continue
            return probe

    def _move(self, old: Attempt, new: Attempt) -> None:
        """The tunnel moves from ``old`` (HTTP/2) to ``new`` (HTTP/3)."""
        self.h3_blocked = False
        self.status.http_reason = "back on HTTP/3: a probe got a tunnel over it"
        self._up(new)
        old.fail("moved to HTTP/3")

    # -- packets ----------------------------------------------------------------------
    def packets_from_relay(self, packets: list[bytes]) -> None:
        """IP packets from the relay (records, HTTP Datagrams or DATAGRAM capsules) -> TUN."""
        counters = self.status.counters
        counters.last_rx = time.time()
        counters.rx_packets += len(packets)
        counters.rx_bytes += sum(map(len, packets))
        valid: list[bytes] = []
        for pkt in packets:
            try:
                addresses(pkt)
            except ProtocolError:
                counters.drops[DROP_MALFORMED] += 1
                continue
            valid.append(pkt)
        self._tun_out += valid
        if not self.batching:
            self.write_tun()

    def write_tun(self) -> None:
        """Write what the relay sent in this UDP batch to the TUN in one batch, so that
        consecutive TCP segments can go to the kernel as one (masqued.host.coalesce)."""
        if not self._tun_out:
            return
        packets, self._tun_out = self._tun_out, []
        dropped = self.tun.write_batch(packets)
        if dropped:
            self.status.counters.drops[DROP_TUN_WRITE] += dropped

    def _tun_ready(self) -> None:
        attempt = self.pump_tun()
        if attempt is not None:
            attempt.link.flush()

    def pump_tun(self) -> Attempt | None:
        """Hand every packet waiting on the TUN to the tunnel, without sending.

        Returns the attempt that has something new to send, or None. Called on TUN
        readiness and also right after a batch from the relay was written to the TUN:
        what the local stack answered meanwhile (TCP ACKs, new data the ACKs released)
        then leaves in the same flush as the QUIC ACKs instead of in packets of their own.
        """
        packets = self.tun.read_batch(TUN_READ_BATCH)
        if not packets:
            return None
        counters = self.status.counters
        attempt = self.current
        if attempt is None or attempt.closed or attempt.plane is None:
            counters.drops[DROP_DISCONNECTED] += len(packets)
            return None
        plane = attempt.plane
        packets, refused = attempt.session.uplink(packets, time.monotonic())
        if refused:
            self.tun.write_batch(refused)  # ICMP prohibited, to our own stack
        if plane.mode is Mode.DATAGRAM:
            room = plane.room()
            try:
                attempt.session.check_room(room)
            except ResponseError as exc:
                attempt.fail(exc.reason)
                return None
            big = [p for p in packets if len(p) > room]
            if big:
                counters.drops[DROP_OVERSIZED] += len(big)
                self.ratelog.warning(
                    "oversized",
                    "dropped a %d-byte packet: datagrams carry at most %d (lower mtu)",
                    len(big[0]),
                    room,
                )
                packets = [p for p in packets if len(p) <= room]
        try:
            sent = plane.send(packets, counters)
        except Exception as exc:
            # The engine raises if the stream is already closed for sending.
            attempt.fail(f"tunnel stream unusable: {exc}")
            return None
        return attempt if sent else None

    def address_request_refused(self) -> None:
        if not self.without_address_request:
            self.without_address_request = True
            log.warning(
                "the relay closed the tunnel right after our ADDRESS_REQUEST (some proxies "
                "do, though RFC 9484 §4.7.2 wants an answer): retrying without it; set "
                "address_request = false to skip it from the start"
            )

    def set_routes(self, routes: tuple[IPNetwork, ...]) -> None:
        """The host routes other CIDRs into the tunnel now (reload)."""
        self.settings = dataclasses.replace(self.settings, routes=routes)
        for attempt in self.live:
            attempt.session.set_routes(routes)

    def params_changed(self, attempt: Attempt, params: TunnelParams) -> None:
        """The relay sent new ADDRESS_ASSIGN / ROUTE_ADVERTISEMENT on a live tunnel."""
        if attempt is not self.current:
            return
        self.status.params = params
        log.info(
            "relay changed the tunnel: addresses %s, routes %s",
            ", ".join(map(str, params.addresses)) or "none",
            ", ".join(map(str, params.routes)) or "none",
        )
        self.on_params(params)
        self._set_state(self.status.state)

    def snapshot(self) -> dict[str, Any]:
        """The tunnel as plain data (docs/status.schema.json, client part).

        ``sessions`` holds the one tunnel; its counters are cumulative over the
        instance's life (they survive reconnects), its RTT and congestion window are
        those of the current connection (null while disconnected).
        """
        st = self.status
        attempt = self.current
        link = attempt.link if attempt is not None and not attempt.closed else None
        now = time.time()
        stats = (
            link.stats()
            if link is not None
            else {"rtt_ms": None, "cwnd": None, "bytes_in_flight": None}
        )
        mode = attempt.session.mode if attempt is not None else None
        tunnel = {
            "id": "tunnel",
            "identity": None,
            "peer": st.relay_addr or f"{self.settings.relay_host}:{self.settings.relay_port}",
            "addresses": [str(a) for a in st.params.addresses] if st.params else [],
            "transport": str(mode or Mode.STREAM),
            "http": link.http_version if link is not None else None,
            "http_reason": st.http_reason if link is not None else None,
            "state": st.state,
            "connected_since": st.connected_since if st.state == "connected" else None,
            **stats,
            **st.counters.snapshot(),
        }
        return {
            "role": "client",
            "time": now,
            "started": st.started,
            "uptime": now - st.started,
            "state": st.state,
            "relay_mtu": st.params.mtu if st.params else None,
            "relay_routes": [str(r) for r in st.params.routes] if st.params else [],
            "connects": st.connects,
            "last_error": st.last_error,
            "handshake": st.handshakes.snapshot(),
            "sessions": [tunnel],
            "totals": st.counters.snapshot(),
        }
