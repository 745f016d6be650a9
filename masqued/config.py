"""``/etc/masque/NAME.conf`` -> frozen dataclasses, with clear errors.

A config is flat top-level TOML keys; ``mode = "relay"`` or ``mode = "client"``
picks which keys are allowed. Every problem is collected and reported at once,
one per line, each as ``PATH: WHAT`` (``masqued check NAME`` prints them all, so
an operator fixes a config in one pass rather than one error per restart).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from masqued.gate.auth import TokenFileError, TokenStore
from masqued.gate.clients import ClientPolicy, check_addresses, load_clients_dir, parse_client
from masqued.host.naming import InvalidInstanceName, check_instance_name
from masqued.proto.template import TemplateError, UriTemplate

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
NatMode = Literal["auto", "nftables", "iptables", "off"]
Transport = Literal["stream", "datagram", "auto"]
HttpVersion = Literal["auto", "h3", "h2"]

DEFAULT_CONFIG_DIR = Path("/etc/masque")
DEFAULT_PORT = 443
DEFAULT_LISTEN = "0.0.0.0:443"
DEFAULT_MTU = 1300
MIN_MTU = 576  # RFC 791: every IPv4 host must accept 576-byte datagrams
MAX_MTU = 9000
MIN_MTU_IPV6 = 1280  # RFC 8200 §5
DEFAULT_KEEPALIVE = 1.0
DEFAULT_RECONNECT_MAX = 4.0
LOG_LEVELS = ("debug", "info", "warning", "error")
NAT_MODES: tuple[NatMode, ...] = ("auto", "nftables", "iptables", "off")
TRANSPORTS: tuple[Transport, ...] = ("stream", "datagram", "auto")
HTTP_VERSIONS: tuple[HttpVersion, ...] = ("auto", "h3", "h2")
QUIC_ENGINES = ("aioquic", "qh3")
EVENT_LOOPS = ("asyncio", "uvloop")
DEFAULT_FALLBACK_AFTER = 2.0
DEFAULT_H3_RETRY = 30.0
IFNAMSIZ = 16
MAX_PEM_BYTES = 1 << 20  # a certificate bundle is a few KiB; refuse to slurp huge files

@dataclass(frozen=True)
class KeyDoc:
    """One config key as operators read about it: ``masqued check`` knows the keys
    from these, and masqued.conf(5) and the shell completion are generated from them
    (packaging/gen-docs.py)."""

    name: str
    value: str  # what it takes, e.g. '"ADDR:PORT"'
    default: str | None  # None: required (or as ``text`` says)
    text: str


_METRICS_DOC = (
    "Prometheus endpoint (GET /metrics) served by the daemon: \"IP:PORT\" (IPv6 in "
    "brackets: \"[::1]:9810\"), an absolute unix socket path (mode 0600), or \"off\". "
    "Plain HTTP without authentication: keep it on loopback or a management network."
)
_ENGINE_DOC = (
    'QUIC library for HTTP/3: "aioquic" (pure Python, the reference) or "qh3" (its '
    "fork with a compiled packet core: less CPU per packet; no client certificates "
    "on a relay, a relay's receive windows fixed at ReceiveLimits.qh3_window: README, "
    "Choosing the QUIC engine). Relay and client choose independently; both speak the "
    "same QUIC."
)
_LOOP_DOC = (
    'Event loop: "asyncio" (the standard library\'s) or "uvloop" (libuv: cheaper '
    "socket and timer calls). The QUIC engine gets a precise clock either way."
)
_LOG_DOC = "Log level. Under systemd the log goes to the journal (journalctl -u masqued@NAME)."

RELAY_KEY_DOCS: tuple[KeyDoc, ...] = (
    KeyDoc("mode", '"relay"', None, "Role of the instance; selects the keys below."),
    KeyDoc(
        "listen",
        '"ADDR:PORT"',
        '"0.0.0.0:443"',
        "UDP address and port for HTTP/3. ADDR is an IP address; IPv6 goes in "
        'brackets, e.g. "[::]:443".',
    ),
    KeyDoc(
        "listen_tcp",
        '"ADDR:PORT" or "off"',
        "the address and port of listen",
        "TCP address and port for HTTP/2 over TLS (RFC 8441 extended CONNECT), for "
        'clients on networks that drop UDP; "off" serves HTTP/3 only. Workers share '
        "the port (SO_REUSEPORT).",
    ),
    KeyDoc(
        "certificate",
        "path",
        None,
        "TLS certificate (PEM, optionally followed by intermediates). It must name the "
        "host clients connect to (DNS name or IP in its subjectAltName) and carry "
        "serverAuth; `masqued pki relay` makes one.",
    ),
    KeyDoc(
        "private_key",
        "path",
        None,
        "The certificate's private key (PEM, unencrypted), matching it. Keep it mode "
        "0600: `masqued check` warns when others can read it.",
    ),
    KeyDoc(
        "pool",
        "array of CIDRs",
        None,
        "Client addresses, IPv4 and/or IPv6: networks without host bits that do not "
        "overlap and leave room for clients (IPv4 up to /30, IPv6 up to /126). The "
        "relay's TUN holds the first address of each.",
    ),
    KeyDoc(
        "routes",
        "array of CIDRs",
        '0.0.0.0/0 and ::/0, for the families in pool',
        "Destinations advertised to clients: what they may reach through the relay. "
        "Every route's family must be in pool.",
    ),
    KeyDoc(
        "uri_template",
        '"https://HOST[:PORT]/PATH..."',
        "none (the default template only)",
        "A URI template (RFC 9484 §3) this relay serves besides the default "
        "/.well-known/masque/ip/{target}/{ipproto}/, for clients configured with it; "
        "{target} and {ipproto} are optional (absent means any), e.g. "
        '"https://relay.example/vpn".',
    ),
    KeyDoc(
        "egress",
        '"auto" or an interface name',
        '"auto"',
        "Interface that forwarded traffic leaves by, and whose address NAT uses; "
        '"auto" is that of the default route.',
    ),
    KeyDoc(
        "nat",
        '"auto", "nftables", "iptables" or "off"',
        '"auto"',
        "How client traffic is masqueraded: \"nftables\" in an own table inet "
        "masqued_NAME; \"iptables\" in an own chain MASQUED-NAME of the legacy tables "
        "(python-iptables); \"auto\" picks iptables where the host's iptables is the "
        "legacy variant, else nftables; \"off\" does none (route the pool back "
        "yourself). `masqued status NAME` shows the rule.",
    ),
    KeyDoc(
        "mtu",
        "integer 576..9000",
        "1300",
        "MTU of the tunnel (TUN and the packets carried); at least 1280 when the pool "
        "or routes have IPv6. Leave room for QUIC, UDP and IP on the path to clients.",
    ),
    KeyDoc("log_level", '"debug", "info", "warning" or "error"', '"info"', _LOG_DOC),
    KeyDoc("quic_engine", '"aioquic" or "qh3"', '"aioquic"', _ENGINE_DOC),
    KeyDoc("event_loop", '"asyncio" or "uvloop"', '"asyncio"', _LOOP_DOC),
    KeyDoc(
        "max_clients",
        "integer >= 1",
        "no limit but the pool",
        "Most clients at once (divided among workers, rounded up).",
    ),
    KeyDoc(
        "workers",
        'integer 1..64 or "auto"',
        "1",
        "Relay processes sharing the UDP port, to use more CPU cores. Each serves its "
        "share of the pool on its own TUN (mq-NAME+1, ...); a client stays with its "
        "worker (by QUIC connection ID). Addresses are sticky only within a worker and "
        "fixed client addresses need 1. \"auto\": one per CPU the service may use, or "
        "1 when a client has a fixed address.",
    ),
    KeyDoc("metrics", 'endpoint or "off"', '"off"', _METRICS_DOC),
    KeyDoc(
        "metrics_per_client",
        "boolean",
        "false",
        "Also export per-client series (masqued_client_*_total{client,address}), for "
        "at most 256 sessions.",
    ),
    KeyDoc(
        "auth",
        '"none", "mtls", "token" or a list of them',
        '"none" (warned about at start)',
        "How clients prove who they are; any listed method suffices. The identity "
        "(what [clients.NAME] is keyed by) is the certificate's CN with mtls, the "
        "token's NAME with token. \"none\": anyone who can reach the port (an open "
        "proxy: closed networks only). Refusals get 401 or 403 and are logged with the "
        "peer address and the reason.",
    ),
    KeyDoc(
        "client_ca",
        "path",
        "required with auth = mtls",
        "CA certificate(s) that sign client certificates (`masqued pki client`).",
    ),
    KeyDoc(
        "crl",
        "path",
        "none",
        "Revocation list (PEM or DER, signed by client_ca), made by `masqued pki "
        "revoke`. Re-read on reload: revoked clients' sessions are closed.",
    ),
    KeyDoc(
        "revoked",
        "array of strings",
        "[]",
        'Identities or "serial:HEX" refused (auth = mtls); re-read on reload.',
    ),
    KeyDoc(
        "tokens_file",
        "path",
        "required with auth = token",
        "One NAME:sha256$SALT$HASH line per client (never the token itself); `masqued "
        "token new NAME --file PATH` appends one. Re-read on reload: a deleted line "
        "closes that client's session.",
    ),
    KeyDoc(
        "acl_default",
        '"allow" or "deny"',
        "required once a client has an acl",
        "What happens to a client's packet that no ACL rule matches.",
    ),
    KeyDoc(
        "clients",
        "tables [clients.NAME]",
        "none",
        "Per-client policy by identity: address (fixed addresses inside the pool), acl "
        '(ordered rules "allow|deny CIDR [PROTO [PORTS]]", first match wins) and '
        "acl_default. Denied packets are dropped, counted and answered with ICMP "
        "administratively prohibited. Applied on reload.",
    ),
    KeyDoc(
        "clients_dir",
        "path",
        "none",
        "A directory of NAME.conf files with the keys of [clients.NAME], re-read on reload.",
    ),
    KeyDoc(
        "state_dir",
        "path",
        "$STATE_DIRECTORY (systemd: /var/lib/masqued/NAME)",
        "Where address leases by identity are kept, so a client that reconnects gets "
        "its address back.",
    ),
)

CLIENT_KEY_DOCS: tuple[KeyDoc, ...] = (
    KeyDoc("mode", '"client"', None, "Role of the instance; selects the keys below."),
    KeyDoc(
        "relay",
        '"HOST:PORT" or "HOST"',
        None,
        'The relay: a DNS name or an IP address (IPv6 in brackets: "[2001:db8::1]:443"); '
        "port 443 if not given.",
    ),
    KeyDoc(
        "server_name",
        "DNS name or IP address",
        "the HOST of relay",
        "Name sent in TLS SNI and checked against the relay's certificate.",
    ),
    KeyDoc("ca", "path", None, "CA certificate(s) (PEM) the relay's certificate must chain to."),
    KeyDoc(
        "uri_template",
        '"https://HOST[:PORT]/PATH..."',
        "the default template at server_name:PORT",
        "The relay's URI template (RFC 9484 §3): the CONNECT's :authority and :path "
        "are its expansion, with {target} and {ipproto} as * (the whole tunnel). "
        "For proxies that serve another path than /.well-known/masque/ip/*/*/.",
    ),
    KeyDoc(
        "routes",
        "array of CIDRs",
        None,
        "Destinations sent through the tunnel; everything else uses the host's routes. "
        "0.0.0.0/0 and ::/0 make a full tunnel (the relay's own address stays out of "
        "it, see fwmark).",
    ),
    KeyDoc(
        "transport",
        '"stream", "datagram" or "auto"',
        '"stream"',
        '"stream": IP packets as length-prefixed records on the CONNECT stream '
        '(masqued\'s own, reliable); "datagram": standard RFC 9484, packets in HTTP '
        'Datagrams, works with any RFC 9484 proxy; "auto": datagram when the relay '
        "offers HTTP/3 datagrams, else stream.",
    ),
    KeyDoc(
        "http_version",
        '"auto", "h3" or "h2"',
        '"auto"',
        '"h3": HTTP/3 over QUIC only; "h2": HTTP/2 over TLS over TCP only (datagram '
        'mode, packets in DATAGRAM capsules); "auto": HTTP/3, and HTTP/2 as well when '
        "no QUIC handshake completes within fallback_after; on HTTP/2 it tries HTTP/3 "
        "again every h3_retry seconds and moves back, keeping the TUN, the routes and "
        "(with auth) the address.",
    ),
    KeyDoc(
        "fallback_after",
        "seconds 0.1..10",
        "2.0",
        'http_version = "auto": how long HTTP/3 may take to complete a QUIC handshake '
        "before HTTP/2 is tried as well.",
    ),
    KeyDoc(
        "h3_retry",
        "seconds 1..3600",
        "30",
        'http_version = "auto": seconds between tries to move a tunnel on HTTP/2 back '
        "to HTTP/3.",
    ),
    KeyDoc(
        "h2_port",
        "integer 1..65535",
        "the PORT of relay",
        "The relay's TCP port for HTTP/2, when its listen_tcp uses another port than "
        "its UDP one.",
    ),
    KeyDoc(
        "address_request",
        "boolean",
        "false",
        "Datagram mode: ask for addresses with ADDRESS_REQUEST capsules (some proxies "
        "reject them; RFC 9484 proxies assign addresses unasked).",
    ),
    KeyDoc(
        "mtu",
        "integer 576..9000",
        "1300",
        "MTU of the TUN; at least 1280 when a route is IPv6. Should match the relay's.",
    ),
    KeyDoc(
        "fwmark",
        '"auto", "off" or integer 1..4294967295',
        '"auto"',
        "Firewall mark on the QUIC and TCP sockets so that their packets bypass the tunnel "
        "(wg-quick's loop guard). \"auto\": a mark derived from the instance name; "
        "\"off\": none, and a config whose routes cover the relay is refused.",
    ),
    KeyDoc("log_level", '"debug", "info", "warning" or "error"', '"info"', _LOG_DOC),
    KeyDoc("quic_engine", '"aioquic" or "qh3"', '"aioquic"', _ENGINE_DOC),
    KeyDoc("event_loop", '"asyncio" or "uvloop"', '"asyncio"', _LOOP_DOC),
    KeyDoc(
        "keepalive",
        "seconds 0.2..60",
        "1.0",
        "Probe interval on an idle tunnel; a dead relay is noticed after "
        "max(3 s, 3 x keepalive) of silence.",
    ),
    KeyDoc(
        "reconnect_max",
        "seconds 0.1..3600",
        "4.0",
        "Upper bound of the backoff between reconnection attempts (0.25 s doubling).",
    ),
    KeyDoc("metrics", 'endpoint or "off"', '"off"', _METRICS_DOC),
    KeyDoc(
        "certificate",
        "path",
        "none",
        "Client certificate for auth = mtls (with private_key); `masqued pki client` "
        "makes one.",
    ),
    KeyDoc("private_key", "path", "none", "Its private key (PEM, unencrypted; mode 0600)."),
    KeyDoc(
        "token_file",
        "path",
        "none",
        "File holding the NAME.SECRET token for auth = token (`masqued token new` on "
        "the relay); sent as Authorization: Bearer. Keep it mode 0600.",
    ),
)
RELAY_KEYS = tuple(k.name for k in RELAY_KEY_DOCS)
CLIENT_KEYS = tuple(k.name for k in CLIENT_KEY_DOCS)


def key_doc(mode: str, name: str) -> KeyDoc | None:
    """The documentation of key ``name`` in a ``mode`` config."""
    docs = RELAY_KEY_DOCS if mode == "relay" else CLIENT_KEY_DOCS
    return next((k for k in docs if k.name == name), None)


# Attributes of a config that name files holding secrets (checked by check_permissions).
SECRET_FILE_ATTRS = ("private_key", "token_file")


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


SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1


def parse_metrics(text: str) -> MetricsEndpoint | None:
    """``"off"``, ``"IP:PORT"`` / ``"[V6]:PORT"``, or an absolute unix socket path."""
    if text == "off":
        return None
    if text.startswith("/"):
        if "\0" in text or len(text.encode()) > SUN_PATH_MAX or text.endswith("/"):
            raise ValueError(
                f"{text!r} is not a usable unix socket path (at most {SUN_PATH_MAX} bytes)"
            )
        return MetricsEndpoint(path=Path(text))
    if "/" in text:
        raise ValueError(f"{text!r}: a unix socket path must be absolute")
    host, port = parse_host_port(text, default_port=None)
    ip = _ip_or_none(host)
    if ip is None:
        raise ValueError(
            f"{text!r}: use an IP address and port (e.g. '127.0.0.1:9810'), "
            'a unix socket path or "off"'
        )
    return MetricsEndpoint(host=str(ip), port=port)


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


# --- small parsers; each raises ValueError with a message fit for an operator ---

_TOML_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "boolean"),  # before int: bool is a subclass of int
    (str, "string"),
    (int, "integer"),
    (float, "float"),
    (list, "array"),
    (dict, "table"),
)
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


# Characters str.splitlines() breaks at, shown escaped in error messages.
_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}


def _show(value: object) -> str:
    """A value for an error message: repr, cut short."""
    tname = next(
        (n for t, n in _TOML_TYPES if isinstance(value, t)),
        type(value).__name__,  # datetime, date, time
    )
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{tname} {text}"


def _is_hostname(name: str) -> bool:
    name = name.removesuffix(".")
    if not name or len(name) > 253:
        return False
    return all(_LABEL.match(label) for label in name.split("."))


def _ip_or_none(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def parse_host_port(text: str, default_port: int | None = DEFAULT_PORT) -> tuple[str, int]:
    """Split ``HOST:PORT`` / ``[V6]:PORT`` / ``HOST`` (port ``default_port``).

    Returns the host without brackets. Does not check what kind of host it is.
    """
    port_text: str | None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected ':PORT' after ']'")
        port_text = rest[1:] if rest else None
        ip = _ip_or_none(host)
        if ip is None or ip.version != 6:
            raise ValueError(f"{text!r}: only IPv6 addresses go in brackets")
    elif _ip_or_none(text) is not None:
        host, port_text = text, None  # a bare address, IPv6 included
    elif text.count(":") > 1:
        raise ValueError(f"{text!r}: put an IPv6 address in brackets, e.g. '[2001:db8::1]:443'")
    elif ":" in text:
        host, port_text = text.split(":")
    else:
        host, port_text = text, None
    if not host:
        raise ValueError(f"{text!r}: missing host")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"{text!r}: missing ':PORT'")
        return host, default_port
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"{text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} is out of range 1..65535")
    return host, port


def parse_network(text: str) -> Network:
    """A CIDR with an explicit prefix length and no host bits set."""
    if "/" not in text:
        raise ValueError(f"{text!r} is not a valid CIDR (missing '/PREFIX')")
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not a valid CIDR") from None
    raise ValueError(f"{text!r} has host bits set (did you mean '{loose}'?)")


def _check_egress(name: str) -> str:
    if name != "auto":
        _check_ifname(name)
    return name


def _check_ifname(name: str) -> None:
    """Linux ``dev_valid_name()``: 1..15 bytes, not '.'/'..', no '/', ':' or whitespace."""
    if not name or len(name.encode()) >= IFNAMSIZ:
        raise ValueError(f"{name!r} is not a valid interface name (1-15 characters)")
    if name in (".", "..") or any(c in "/:" or c.isspace() for c in name):
        raise ValueError(f"{name!r} is not a valid interface name (no '/', ':' or spaces)")
    if not name.isprintable():
        raise ValueError(f"{name!r} is not a valid interface name (no control characters)")


# --- the reader: one key at a time, errors collected ---

T = TypeVar("T")


class _Reader:
    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.base = Path(os.path.abspath(path)).parent
        self.data = data
        self.errors: list[str] = []

    def error(self, key: str, what: str) -> None:
        # One line per problem, whatever a value held (a file name with a newline).
        what = what.translate(_LINE_BREAKS)
        self.errors.append(f"{key}: {what}" if key else what)

    def has(self, key: str) -> bool:
        return key in self.data

    def _get(self, key: str, types: tuple[type, ...], expected: str, required: bool) -> Any:
        """The raw value if present with the right type; None if absent or wrong."""
        if key not in self.data:
            if required:
                self.error("", f"missing required key {key!r}")
            return None
        value = self.data[key]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            self.error(key, f"expected {expected}, got {_show(value)}")
            return None
        return value

    def string(self, key: str, default: str | None = None) -> str | None:
        value = self._get(key, (str,), "a string", default is None)
        return cast(str | None, value) if value is not None else default

    def choice(self, key: str, choices: Sequence[str], default: str) -> str:
        value = self.string(key, default)
        if value is None or value in choices:
            return value or default
        allowed = ", ".join(f'"{c}"' for c in choices)
        self.error(key, f"{value!r} is not one of {allowed}")
        return default

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        value = self._get(key, (int,), "an integer", False)
        if value is None:
            return default
        if not lo <= value <= hi:
            self.error(key, f"{value} is out of range {lo}..{hi}")
            return default
        return cast(int, value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, (bool,), "true or false", False)
        return default if value is None else bool(value)

    def number(self, key: str, default: float, lo: float, hi: float) -> float:
        value = self._get(key, (int, float), "a number", False)
        if value is None:
            return default
        if not lo <= value <= hi:  # also false for NaN
            self.error(key, f"{value} is out of range {lo}..{hi}")
            return default
        return float(value)

    def parsed(self, key: str, parse: Callable[[str], T], default: str | None = None) -> T | None:
        text = self.string(key, default)
        if text is None:
            return None
        try:
            return parse(text)
        except ValueError as e:
            self.error(key, str(e))
            return None

    def networks(self, key: str, required: bool) -> tuple[Network, ...] | None:
        value = self._get(key, (list,), "an array of CIDR strings", required)
        if value is None:
            return None
        if not value:
            self.error(key, "must not be empty")
            return None
        # Keep the good entries even when others are bad, so that checks built on
        # them (mtu, routing loop) still run and every problem shows in one pass.
        nets: list[Network] = []
        for item in value:
            if not isinstance(item, str):
                self.error(key, f"expected CIDR strings, got {_show(item)}")
                continue
            try:
                net = parse_network(item)
            except ValueError as e:
                self.error(key, str(e))
                continue
            if net in nets:
                self.error(key, f"{net} is listed twice")
                continue
            nets.append(net)
        return tuple(nets)

    def file(self, key: str) -> tuple[Path, bytes] | None:
        """A path (resolved against the config's directory) and its contents."""
        text = self.string(key)
        if text is None:
            return None
        if not text or "\0" in text:
            self.error(key, f"{text!r} is not a valid file name")
            return None
        path = self.base / text
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_PEM_BYTES + 1)
        except (FileNotFoundError, NotADirectoryError):
            self.error(key, f"file {path} does not exist")
            return None
        except IsADirectoryError:
            self.error(key, f"{path} is a directory, not a file")
            return None
        except PermissionError:
            self.error(key, f"file {path} is not readable (permission denied)")
            return None
        except OSError as e:
            self.error(key, f"cannot read {path}: {e.strerror or e}")
            return None
        if len(data) > MAX_PEM_BYTES:
            self.error(key, f"file {path} is too large for a PEM file")
            return None
        return path, data

    def certificates(self, key: str) -> tuple[Path, list[x509.Certificate]] | None:
        loaded = self.file(key)
        if loaded is None:
            return None
        path, data = loaded
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError:
            certs = []
        if not certs:
            self.error(key, f"{path} is not a PEM X.509 certificate")
            return None
        return path, certs

    def private_key(self, key: str) -> tuple[Path, PrivateKeyTypes] | None:
        loaded = self.file(key)
        if loaded is None:
            return None
        path, data = loaded
        try:
            return path, serialization.load_pem_private_key(data, password=None)
        except TypeError:
            self.error(key, f"{path} is encrypted; masqued needs an unencrypted PEM key")
        except (ValueError, UnsupportedAlgorithm):
            self.error(key, f"{path} is not a PEM private key")
        return None


def _spki(key: Any) -> bytes:
    return cast(
        bytes,
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )


def _unknown_keys(data: dict[str, Any], mode: str | None) -> list[str]:
    allowed: tuple[str, ...]
    other: tuple[str, tuple[str, ...]]
    if mode == "relay":
        allowed, other = RELAY_KEYS, ("client", CLIENT_KEYS)
    elif mode == "client":
        allowed, other = CLIENT_KEYS, ("relay", RELAY_KEYS)
    else:
        allowed, other = tuple(dict.fromkeys(RELAY_KEYS + CLIENT_KEYS)), ("", ())
    problems = []
    for key, value in data.items():
        if key in allowed:
            continue
        if key in other[1]:
            problems.append(f"key {key!r} is only valid in a {other[0]} config (mode = {mode!r})")
            continue
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        if isinstance(value, dict):
            problems.append(f"invalid table [{key}]{hint}; masqued configs use top-level keys only")
        else:
            problems.append(f"invalid key {key!r}{hint}")
    return problems


def _ipv6_reason(key: str, nets: Iterable[Network]) -> str | None:
    for net in nets:
        if net.version == 6:
            return f"{key} has {net}"
    return None


def _check_mtu(r: _Reader, mtu: int, v6_reason: str | None) -> None:
    if v6_reason is not None and mtu < MIN_MTU_IPV6:
        r.error("mtu", f"{mtu} is below {MIN_MTU_IPV6}, the minimum for IPv6 ({v6_reason})")


def _load_relay(r: _Reader, name: str) -> RelayConfig:
    listen = r.parsed("listen", parse_host_port, DEFAULT_LISTEN)
    listen_host = ""
    if listen is not None:
        ip = _ip_or_none(listen[0])
        if ip is None:
            r.error(
                "listen",
                f"{listen[0]!r} is not an IP address (use e.g. '0.0.0.0:443' or '[::]:443')",
            )
        else:
            listen_host = str(ip)
    listen_tcp = _load_listen_tcp(r, listen_host, listen[1] if listen else DEFAULT_PORT)

    cert = r.certificates("certificate")
    key = r.private_key("private_key")
    if (
        cert is not None
        and key is not None
        and _spki(cert[1][0].public_key()) != _spki(key[1].public_key())
    ):
        r.error("private_key", f"{key[0]} does not match certificate {cert[0]}")

    pool = r.networks("pool", required=True)
    if pool is not None:
        for i, net in enumerate(pool):
            if net.prefixlen >= net.max_prefixlen - 1:
                r.error("pool", f"{net} is too small (no client addresses)")
            for other in pool[:i]:
                if net.overlaps(other):
                    r.error("pool", f"{net} overlaps {other}")

    routes = r.networks("routes", required=False)
    if routes is None and not r.has("routes") and pool is not None:
        families = {n.version for n in pool}
        routes = tuple(
            ipaddress.ip_network(default)
            for version, default in ((4, "0.0.0.0/0"), (6, "::/0"))
            if version in families
        )
    if routes is not None and pool is not None:
        families = {n.version for n in pool}
        for route in routes:
            if route.version not in families:
                r.error(
                    "routes",
                    f"{route} is IPv{route.version} but the pool has no IPv{route.version} network",
                )

    egress = r.parsed("egress", _check_egress, "auto")
    nat = r.choice("nat", NAT_MODES, "auto")
    mtu = r.integer("mtu", DEFAULT_MTU, MIN_MTU, MAX_MTU)
    _check_mtu(r, mtu, _ipv6_reason("pool", pool or ()) or _ipv6_reason("routes", routes or ()))
    log_level = r.choice("log_level", LOG_LEVELS, "info")
    max_clients: int | None = None
    if r.has("max_clients"):
        max_clients = r.integer("max_clients", 1, 1, 1 << 24)
    workers = _load_workers(r, pool)
    metrics = r.parsed("metrics", parse_metrics) if r.has("metrics") else None
    metrics_per_client = r.boolean("metrics_per_client", False)
    auth = _load_auth(r)
    quic_engine, event_loop = _load_engine(r)
    if quic_engine == "qh3" and "mtls" in auth["methods"]:
        r.error(
            "quic_engine",
            '"qh3" cannot ask HTTP/3 clients for a certificate, and auth has "mtls" '
            '(use quic_engine = "aioquic", or auth = ["token"])',
        )
    acl_default = (
        r.choice("acl_default", ("allow", "deny"), "deny") if r.has("acl_default") else None
    )
    clients, clients_dir = _load_clients(r, acl_default, pool)
    fixed = sorted(name for name, policy in clients.items() if policy.addresses)
    if fixed and r.data.get("workers") == "auto":
        workers = 1  # "auto" never makes a config invalid: fixed addresses need one
    if workers > 1 and fixed:
        r.error(
            "workers",
            f"{workers} workers but {', '.join(fixed)} ha{'s' if len(fixed) == 1 else 've'} "
            "a fixed address: each worker hands out addresses from its own share of "
            "the pool, so fixed addresses need workers = 1",
        )
    state_dir = None
    if r.has("state_dir"):
        text = r.string("state_dir")
        if text and "\0" in text:
            r.error("state_dir", f"{text!r} is not a valid directory name")
        elif text:
            state_dir = r.base / text

    uri_template = _uri_template(r)
    if r.errors:
        raise ConfigError(r.path, r.errors)
    assert cert is not None and key is not None and pool is not None and routes is not None
    assert egress is not None
    return RelayConfig(
        name=name,
        path=r.path,
        listen_host=listen_host,
        listen_port=listen[1] if listen else DEFAULT_PORT,
        listen_tcp=listen_tcp,
        certificate=cert[0],
        private_key=key[0],
        pool=pool,
        routes=routes,
        egress=egress,
        nat=cast(NatMode, nat),
        mtu=mtu,
        log_level=log_level,
        max_clients=max_clients,
        workers=workers,
        metrics=metrics,
        metrics_per_client=metrics_per_client,
        auth=auth["methods"],
        client_ca=auth["client_ca"],
        crl=auth["crl"],
        revoked=auth["revoked"],
        tokens_file=auth["tokens_file"],
        acl_default=acl_default,
        clients=clients,
        clients_dir=clients_dir,
        state_dir=state_dir,
        uri_template=uri_template,
        quic_engine=quic_engine,
        event_loop=event_loop,
    )


def _load_engine(r: _Reader) -> tuple[str, str]:
    """``quic_engine`` and ``event_loop``; one whose library cannot be imported here is
    an error (a .deb carries both)."""
    quic_engine = r.choice("quic_engine", QUIC_ENGINES, "aioquic")
    if r.has("quic_engine") and quic_engine != "aioquic":
        from masqued.transport import engines

        problem = engines.available(quic_engine)
        if problem is not None:
            r.error("quic_engine", f"{quic_engine!r} cannot be used: {problem}")
    event_loop = r.choice("event_loop", EVENT_LOOPS, "asyncio")
    if event_loop == "uvloop" and r.has("event_loop"):
        try:
            import uvloop  # noqa: F401
        except ImportError as exc:
            r.error("event_loop", f'"uvloop" cannot be used: {exc}')
    return quic_engine, event_loop


def _load_listen_tcp(r: _Reader, udp_host: str, udp_port: int) -> tuple[str, int] | None:
    """``listen_tcp``: "ADDR:PORT" (port: listen's when left out), "off", or, when
    absent, listen's address and port."""
    if not r.has("listen_tcp"):
        return (udp_host, udp_port) if udp_host else None
    text = r.string("listen_tcp")
    if text is None or text == "off":
        return None
    try:
        host, port = parse_host_port(text, default_port=udp_port)
    except ValueError as e:
        r.error("listen_tcp", f'{e} (or "off")')
        return None
    ip = _ip_or_none(host)
    if ip is None:
        r.error("listen_tcp", f"{host!r} is not an IP address (use e.g. '0.0.0.0:443' or \"off\")")
        return None
    return str(ip), port


def _load_workers(r: _Reader, pool: tuple[Network, ...] | None) -> int:
    """``workers``: an integer 1..MAX_WORKERS, or "auto" (one per CPU the process may
    use). Every worker needs its own share of each pool network."""
    from masqued.gate.ipam import MAX_WORKERS, pool_slice

    value = r.data.get("workers", 1)
    if value == "auto":
        workers = max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
    elif isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_WORKERS:
        workers = value
    else:
        r.error("workers", f'expected an integer 1..{MAX_WORKERS} or "auto", got {_show(value)}')
        return 1
    if pool is not None and workers > 1:
        try:
            for k in range(workers):
                pool_slice(pool, k, workers)
        except ValueError as exc:
            r.error("workers", f"{workers} workers: {exc}")
            return 1
    return workers


def _check_relay_host(host: str) -> str:
    ip = _ip_or_none(host)
    if ip is not None:
        return str(ip)
    if not _is_hostname(host):
        raise ValueError(f"{host!r} is neither a valid host name nor an IP address")
    return host


def _load_client(r: _Reader, name: str) -> ClientConfig:
    relay = r.parsed("relay", parse_host_port)
    relay_host = ""
    if relay is not None:
        try:
            relay_host = _check_relay_host(relay[0])
        except ValueError as e:
            r.error("relay", str(e))
    server_name = r.parsed("server_name", _check_relay_host) if r.has("server_name") else None

    ca = r.certificates("ca")
    routes = r.networks("routes", required=True)

    transport = r.choice("transport", TRANSPORTS, "auto")
    address_request = r.boolean("address_request", False)
    http_version = r.choice("http_version", HTTP_VERSIONS, "auto")
    if http_version == "h2" and transport == "stream":
        r.error(
            "transport",
            '"stream" needs HTTP/3, and http_version = "h2": over HTTP/2 packets travel '
            'in DATAGRAM capsules (use transport = "datagram" or "auto")',
        )
    quic_engine, event_loop = _load_engine(r)
    fallback_after = r.number("fallback_after", DEFAULT_FALLBACK_AFTER, 0.1, 10.0)
    h3_retry = r.number("h3_retry", DEFAULT_H3_RETRY, 1.0, 3600.0)
    h2_port = r.integer("h2_port", 0, 1, 65535) if r.has("h2_port") else None

    mtu = r.integer("mtu", DEFAULT_MTU, MIN_MTU, MAX_MTU)
    _check_mtu(r, mtu, _ipv6_reason("routes", routes or ()))

    fwmark: int | None = None
    if r.has("fwmark"):
        value = r.data["fwmark"]
        if value == "auto":
            fwmark = None
        elif value == "off":
            fwmark = 0
        elif isinstance(value, int) and not isinstance(value, bool):
            fwmark = r.integer("fwmark", 0, 1, 0xFFFFFFFF)
        else:
            r.error("fwmark", f'expected "auto", "off" or an integer, got {_show(value)}')

    relay_ip = _ip_or_none(relay_host)
    if fwmark == 0 and relay_ip is not None and routes is not None:
        for route in routes:
            if relay_ip.version == route.version and relay_ip in route:
                r.error(
                    "routes",
                    f'{route} covers the relay address {relay_ip}; with fwmark = "off" this '
                    'would route the relay into the tunnel (routing loop); remove fwmark = "off" '
                    "or exclude the relay's address from routes",
                )

    log_level = r.choice("log_level", LOG_LEVELS, "info")
    keepalive = r.number("keepalive", DEFAULT_KEEPALIVE, 0.2, 60.0)
    reconnect_max = r.number("reconnect_max", DEFAULT_RECONNECT_MAX, 0.1, 3600.0)
    metrics = r.parsed("metrics", parse_metrics) if r.has("metrics") else None
    client_cert: Path | None = None
    client_key: Path | None = None
    if r.has("certificate") or r.has("private_key"):
        ccert = r.certificates("certificate")
        ckey = r.private_key("private_key")
        if ccert is not None and ckey is not None:
            if _spki(ccert[1][0].public_key()) != _spki(ckey[1].public_key()):
                r.error("private_key", f"{ckey[0]} does not match certificate {ccert[0]}")
            client_cert, client_key = ccert[0], ckey[0]
    token_file = None
    if r.has("token_file"):
        loaded = r.file("token_file")
        if loaded is not None:
            token_file = loaded[0]
            if not loaded[1].strip() or b"." not in loaded[1]:
                r.error("token_file", f"{token_file} does not hold a token (NAME.SECRET)")

    template = _uri_template(r)
    if r.errors:
        raise ConfigError(r.path, r.errors)
    assert relay is not None and ca is not None and routes is not None
    return ClientConfig(
        name=name,
        path=r.path,
        relay_host=relay_host,
        relay_port=relay[1],
        server_name=server_name or relay_host,
        ca=ca[0],
        routes=routes,
        transport=cast(Transport, transport),
        address_request=address_request,
        http_version=cast(HttpVersion, http_version),
        fallback_after=fallback_after,
        h3_retry=h3_retry,
        h2_port=h2_port or None,
        mtu=mtu,
        fwmark=fwmark,
        log_level=log_level,
        keepalive=keepalive,
        reconnect_max=reconnect_max,
        metrics=metrics,
        certificate=client_cert,
        private_key=client_key,
        token_file=token_file,
        uri_template=template,
        quic_engine=quic_engine,
        event_loop=event_loop,
    )


def _uri_template(r: _Reader) -> str | None:
    """``uri_template``, validated as RFC 9484 §3 wants (TemplateError names the rule)."""
    if not r.has("uri_template"):
        return None
    text = r.string("uri_template")
    if text is None:
        return None
    try:
        UriTemplate.parse(text)
    except TemplateError as exc:
        r.error("uri_template", f"{_show(text)}: {exc}")
        return None
    return text


AUTH_METHODS = ("mtls", "token")


def _load_auth(r: _Reader) -> dict[str, Any]:
    """``auth`` = "none" | "mtls" | "token" | a list of them (any one suffices)."""
    out: dict[str, Any] = {
        "methods": (),
        "client_ca": None,
        "crl": None,
        "revoked": (),
        "tokens_file": None,
    }
    raw = r.data.get("auth", "none")
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        r.error("auth", f'expected "none", "mtls", "token" or a list of them, got {_show(raw)}')
        return out
    methods = tuple(dict.fromkeys(x for x in items if x != "none"))
    for m in methods:
        if m not in AUTH_METHODS:
            close = difflib.get_close_matches(m, AUTH_METHODS, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            r.error("auth", f"unknown method {m!r}{hint}; use mtls and/or token, or none")
    if "none" in items and methods:
        r.error("auth", '"none" cannot be combined with other methods')
    out["methods"] = tuple(m for m in methods if m in AUTH_METHODS)
    if "mtls" in methods:
        ca = r.certificates("client_ca") if r.has("client_ca") else None
        if not r.has("client_ca"):
            r.error(
                "client_ca", "required with auth = mtls (the CA that signs client certificates)"
            )
        if ca is not None:
            out["client_ca"] = ca[0]
        if r.has("crl"):
            crl = r.file("crl")
            if crl is not None:
                try:
                    loaded = (
                        x509.load_pem_x509_crl(crl[1])
                        if b"-----BEGIN" in crl[1]
                        else x509.load_der_x509_crl(crl[1])
                    )
                except ValueError:
                    r.error("crl", f"{crl[0]} is not a PEM or DER X.509 CRL")
                else:
                    if ca is not None and not any(
                        loaded.is_signature_valid(c.public_key())  # type: ignore[arg-type]
                        for c in ca[1]
                    ):
                        r.error("crl", f"{crl[0]} is not signed by client_ca")
                    out["crl"] = crl[0]
        revoked = r.data.get("revoked", [])
        if not isinstance(revoked, list) or not all(isinstance(x, str) for x in revoked):
            r.error("revoked", 'expected a list of names or "serial:HEX"')
        else:
            out["revoked"] = tuple(revoked)
    if "token" in methods:
        if not r.has("tokens_file"):
            r.error(
                "tokens_file",
                "required with auth = token (create entries with "
                "'masqued token new NAME --file PATH')",
            )
        else:
            loaded_tokens = r.file("tokens_file")
            if loaded_tokens is not None:
                try:
                    TokenStore.parse(loaded_tokens[1].decode("utf-8", "replace"), loaded_tokens[0])
                except TokenFileError as exc:
                    for line in str(exc).splitlines():
                        r.error("tokens_file", line)
                out["tokens_file"] = loaded_tokens[0]
    return out


def _load_clients(
    r: _Reader, acl_default: str | None, pool: tuple[Network, ...] | None
) -> tuple[dict[str, ClientPolicy], Path | None]:
    clients: dict[str, ClientPolicy] = {}
    table = r.data.get("clients", {})
    if not isinstance(table, dict):
        r.error("clients", "expected tables like [clients.alice]")
        table = {}
    for name, entry in table.items():
        if not isinstance(entry, dict):
            r.error(f"clients.{name}", "expected a table")
            continue
        policy, errs = parse_client(name, entry, f"clients.{name}", acl_default)
        r.errors += errs
        if policy is not None:
            clients[name] = policy
    clients_dir = None
    if r.has("clients_dir"):
        text = r.string("clients_dir")
        if text and "\0" in text:
            r.error("clients_dir", f"{text!r} is not a valid directory name")
        elif text:
            clients_dir = r.base / text
            more, errs = load_clients_dir(clients_dir, acl_default)
            r.errors += errs
            for name, policy in more.items():
                if name in clients:
                    r.error("clients_dir", f"{name} is also defined as [clients.{name}]")
                clients[name] = policy
    if pool is not None:
        r.errors += check_addresses(clients, pool)
    return clients, clients_dir


def load_config(path: Path, name: str | None = None) -> Config:
    """Read and check one instance config. Raises ConfigError listing every problem.

    ``name`` (the instance name) defaults to the file's stem. Relative file paths
    in the config are resolved against the config file's directory.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(path, f"cannot read config: {e.strerror or e}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(path, f"not valid UTF-8 (at line {line})") from None
    except tomllib.TOMLDecodeError as e:
        # tomllib says "(at line L, column C)", or "(at end of document)": give a line there too
        last = raw.rstrip(b"\n").count(b"\n") + 1
        what = str(e).replace("(at end of document)", f"(at end of document, line {last})")
        raise ConfigError(path, f"TOML syntax error: {what}") from None

    problems: list[str] = []
    name = path.stem if name is None else name
    try:
        check_instance_name(name)
    except InvalidInstanceName as e:
        problems.append(str(e))

    mode = data.get("mode")
    if "mode" not in data:
        problems.append('missing required key \'mode\' ("relay" or "client")')
    elif not isinstance(mode, str):
        problems.append(f'mode: expected "relay" or "client", got {_show(mode)}')
    elif mode not in ("relay", "client"):
        close = difflib.get_close_matches(mode, ("relay", "client"), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f'mode: {mode!r} is not "relay" or "client"{hint}')
    problems += _unknown_keys(data, mode if isinstance(mode, str) else None)
    if mode not in ("relay", "client"):
        raise ConfigError(path, problems)

    reader = _Reader(path, data)
    reader.errors = problems
    if mode == "relay":
        return _load_relay(reader, name)
    return _load_client(reader, name)


def _mode_warning(path: Path, what: str) -> list[str]:
    try:
        st = path.stat()
    except OSError as e:
        return [f"{path}: cannot check permissions: {e.strerror or e}"]
    warnings = []
    if st.st_mode & stat.S_IWOTH:
        warnings.append(f"{path}: {what} is world-writable; anyone can change it (chmod o-w)")
    if st.st_mode & stat.S_IROTH:
        warnings.append(f"{path}: {what} is world-readable (chmod o-r)")
    return warnings


def check_permissions(path: Path, cfg: Config) -> list[str]:
    """Warnings (not errors) about files others can read or change, as wg-quick warns.

    A world-readable config or a world-readable file holding secrets (private
    key, token file) gets a warning; so does anything world-writable.
    """
    warnings = _mode_warning(Path(path), "config file")
    for attr in SECRET_FILE_ATTRS:
        secret = getattr(cfg, attr, None)
        if isinstance(secret, Path):
            warnings += [
                w.replace(" is world-readable", " is world-readable (holding secrets)")
                for w in _mode_warning(secret, attr.replace("_", " "))
            ]
    return warnings
