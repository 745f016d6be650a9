"""Every config key of both modes, with the documentation `masqued check`, masqued.conf(5)
and the completion are made from; the defaults and bounds they name."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from masqued.config.host import client_key_docs, relay_key_docs

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
    'Prometheus endpoint (GET /metrics) served by the daemon: "IP:PORT" (IPv6 in '
    'brackets: "[::1]:9810"), an absolute unix socket path (mode 0600), or "off". '
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
        "0.0.0.0/0 and ::/0, for the families in pool",
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
        'How client traffic is masqueraded: "nftables" in an own table inet '
        'masqued_NAME; "iptables" in an own chain MASQUED-NAME of the legacy tables '
        '(python-iptables); "auto" picks iptables where the host\'s iptables is the '
        'legacy variant, else nftables; "off" does none (route the pool back '
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
        'fixed client addresses need 1. "auto": one per CPU the service may use, or '
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
        'token\'s NAME with token. "none": anyone who can reach the port (an open '
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
    *relay_key_docs(KeyDoc),
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
        '"auto"',
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
        'http_version = "auto": seconds between tries to move a tunnel on HTTP/2 back to HTTP/3.',
    ),
    KeyDoc(
        "h2_port",
        "integer 1..65535",
        "the PORT of relay",
        "The relay's TCP port for HTTP/2, when its listen_tcp uses another port than its UDP one.",
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
        '(wg-quick\'s loop guard). "auto": a mark derived from the instance name; '
        '"off": none, and a config whose routes cover the relay is refused.',
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
        "Client certificate for auth = mtls (with private_key); `masqued pki client` makes one.",
    ),
    KeyDoc("private_key", "path", "none", "Its private key (PEM, unencrypted; mode 0600)."),
    KeyDoc(
        "token_file",
        "path",
        "none",
        "File holding the NAME.SECRET token for auth = token (`masqued token new` on "
        "the relay); sent as Authorization: Bearer. Keep it mode 0600.",
    ),
    *client_key_docs(KeyDoc),
)
RELAY_KEYS = tuple(k.name for k in RELAY_KEY_DOCS)
CLIENT_KEYS = tuple(k.name for k in CLIENT_KEY_DOCS)


def key_doc(mode: str, name: str) -> KeyDoc | None:
    """The documentation of key ``name`` in a ``mode`` config."""
    docs = RELAY_KEY_DOCS if mode == "relay" else CLIENT_KEY_DOCS
    return next((k for k in docs if k.name == name), None)


# Attributes of a config that name files holding secrets (checked by check_permissions).
SECRET_FILE_ATTRS = ("private_key", "token_file")
