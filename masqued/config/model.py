"""What a loaded config is: frozen dataclasses for each mode, ConfigError, where configs live."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from masqued.config.host import ClientHost
from masqued.config.keys import (
    DEFAULT_CONFIG_DIR,
    DEFAULT_FALLBACK_AFTER,
    DEFAULT_H3_RETRY,
    DEFAULT_KEEPALIVE,
    DEFAULT_MTU,
    DEFAULT_RECONNECT_MAX,
    HttpVersion,
    IPAddress,
    NatMode,
    Network,
    Transport,
)
from masqued.gate.clients import ClientPolicy
from masqued.host.naming import check_instance_name


class ConfigError(Exception):
    """A config that cannot be used. ``str()`` is one ``PATH: WHAT`` line per problem."""

    def __init__(self, path: Path | str, problems: str | Sequence[str]) -> None:
        self.path = Path(path)
        self.problems: tuple[str, ...] = (
            (problems,) if isinstance(problems, str) else tuple(problems)
        )
        super().__init__("\n".join(f"{path}: {p}" for p in self.problems))


@dataclass(frozen=True)
class MetricsEndpoint:
    """Where the Prometheus endpoint listens: ``host:port`` (TCP) or a unix ``path``."""

    host: str = ""
    port: int = 0
    path: Path | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return str(self.path)
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class RelayConfig:
    name: str
    path: Path
    listen_host: str
    listen_port: int
    certificate: Path
    private_key: Path
    pool: tuple[Network, ...]
    routes: tuple[Network, ...]  # advertised to clients: what they may reach
    egress: str  # "auto" or an interface name
    nat: NatMode
    mtu: int = DEFAULT_MTU
    log_level: str = "info"
    # TCP (HTTP/2) listener (host, port); None: off
    listen_tcp: tuple[str, int] | None = None
    max_clients: int | None = None
    # relay processes sharing the UDP port, each with its share of the pool and TUN
    workers: int = 1
    metrics: MetricsEndpoint | None = None
    metrics_per_client: bool = False
    # authentication: methods accepted ("mtls", "token"); empty = open relay
    auth: tuple[str, ...] = ()
    client_ca: Path | None = None
    crl: Path | None = None
    revoked: tuple[str, ...] = ()
    tokens_file: Path | None = None
    # per-client policy, keyed by identity
    acl_default: str | None = None
    clients: Mapping[str, ClientPolicy] = field(default_factory=dict)
    clients_dir: Path | None = None
    state_dir: Path | None = None
    uri_template: str | None = None  # served besides the default one (RFC 9484 §3)
    quic_engine: str = "aioquic"  # masqued.transport.engines
    event_loop: str = "asyncio"  # or "uvloop"
    dns: tuple[IPAddress, ...] = ()  # resolvers told to clients (masqued.proto.dns)
    dns_search: tuple[str, ...] = ()

    mode: Literal["relay"] = "relay"


@dataclass(frozen=True)
class ClientConfig:
    name: str
    path: Path
    relay_host: str
    relay_port: int
    server_name: str
    ca: Path
    routes: tuple[Network, ...]
    transport: Transport = "auto"
    address_request: bool = False  # datagram mode: send ADDRESS_REQUEST (RFC 9484 §4.7.2)
    http_version: HttpVersion = "auto"
    fallback_after: float = DEFAULT_FALLBACK_AFTER
    h3_retry: float = DEFAULT_H3_RETRY
    h2_port: int | None = None  # None: relay_port
    mtu: int = DEFAULT_MTU
    fwmark: int | None = None  # None: the instance default; 0: no mark ("off")
    log_level: str = "info"
    keepalive: float = DEFAULT_KEEPALIVE
    reconnect_max: float = DEFAULT_RECONNECT_MAX
    metrics: MetricsEndpoint | None = None
    certificate: Path | None = None  # client certificate for mTLS
    private_key: Path | None = None
    token_file: Path | None = None
    uri_template: str | None = None  # the relay's template (RFC 9484 §3); None: default
    quic_engine: str = "aioquic"  # masqued.transport.engines
    event_loop: str = "asyncio"  # or "uvloop"
    # DNS, kill switch, hooks (masqued.config.host)
    host: ClientHost = field(default_factory=ClientHost)

    mode: Literal["client"] = "client"

    @property
    def full_tunnel(self) -> bool:
        """True if any route is a default route (0.0.0.0/0 or ::/0)."""
        return any(r.prefixlen == 0 for r in self.routes)


Config = RelayConfig | ClientConfig


def config_dir() -> Path:
    """Directory of instance configs: ``$MASQUED_CONFIG_DIR`` or ``/etc/masque``."""
    return Path(os.environ.get("MASQUED_CONFIG_DIR") or DEFAULT_CONFIG_DIR)


def config_path(name: str) -> Path:
    """``config_dir()/NAME.conf``; raises InvalidInstanceName for a bad name."""
    return config_dir() / f"{check_instance_name(name)}.conf"
