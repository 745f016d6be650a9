"""``/etc/masque/NAME.conf`` -> a RelayConfig or ClientConfig, with every problem at once.

A config is flat top-level TOML keys; ``mode = "relay"`` or ``mode = "client"``
picks which keys are allowed. Every problem is collected and reported at once,
one per line, each as ``PATH: WHAT`` (``masqued check NAME`` prints them all, so
an operator fixes a config in one pass rather than one error per restart)."""

from __future__ import annotations

import difflib
import ipaddress
import os
import stat
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

from cryptography import x509

from masqued.config.host import load_client_host, load_relay_dns
from masqued.config.keys import (
    DEFAULT_FALLBACK_AFTER,
    DEFAULT_H3_RETRY,
    DEFAULT_KEEPALIVE,
    DEFAULT_LISTEN,
    DEFAULT_MTU,
    DEFAULT_PORT,
    DEFAULT_RECONNECT_MAX,
    EVENT_LOOPS,
    HTTP_VERSIONS,
    LOG_LEVELS,
    MAX_MTU,
    MIN_MTU,
    MIN_MTU_IPV6,
    NAT_MODES,
    QUIC_ENGINES,
    SECRET_FILE_ATTRS,
    TRANSPORTS,
    HttpVersion,
    NatMode,
    Network,
    Transport,
)
from masqued.config.model import ClientConfig, Config, ConfigError, RelayConfig
from masqued.config.reader import (
    Reader,
    check_egress,
    ip_or_none,
    is_hostname,
    parse_host_port,
    parse_metrics,
    show,
    spki,
    unknown_keys,
)
from masqued.gate.auth import TokenFileError, TokenStore
from masqued.gate.clients import ClientPolicy, check_addresses, load_clients_dir, parse_client
from masqued.host.naming import InvalidInstanceName, check_instance_name
from masqued.proto.template import TemplateError, UriTemplate


def _ipv6_reason(key: str, nets: Iterable[Network]) -> str | None:
    for net in nets:
        if net.version == 6:
            return f"{key} has {net}"
    return None


def _check_mtu(r: Reader, mtu: int, v6_reason: str | None) -> None:
    if v6_reason is not None and mtu < MIN_MTU_IPV6:
        r.error("mtu", f"{mtu} is below {MIN_MTU_IPV6}, the minimum for IPv6 ({v6_reason})")


def _load_relay(r: Reader, name: str) -> RelayConfig:
    listen = r.parsed("listen", parse_host_port, DEFAULT_LISTEN)
    listen_host = ""
    if listen is not None:
        ip = ip_or_none(listen[0])
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
        and spki(cert[1][0].public_key()) != spki(key[1].public_key())
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

    egress = r.parsed("egress", check_egress, "auto")
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
    dns, dns_search = load_relay_dns(r)
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
        dns=dns,
        dns_search=dns_search,
        quic_engine=quic_engine,
        event_loop=event_loop,
    )


def _load_engine(r: Reader) -> tuple[str, str]:
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


def _load_listen_tcp(r: Reader, udp_host: str, udp_port: int) -> tuple[str, int] | None:
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
    ip = ip_or_none(host)
    if ip is None:
        r.error("listen_tcp", f"{host!r} is not an IP address (use e.g. '0.0.0.0:443' or \"off\")")
        return None
    return str(ip), port


def _load_workers(r: Reader, pool: tuple[Network, ...] | None) -> int:
    """``workers``: an integer 1..MAX_WORKERS, or "auto" (one per CPU the process may
    use). Every worker needs its own share of each pool network."""
    from masqued.gate.ipam import MAX_WORKERS, pool_slice

    value = r.data.get("workers", 1)
    if value == "auto":
        workers = max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
    elif isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_WORKERS:
        workers = value
    else:
        r.error("workers", f'expected an integer 1..{MAX_WORKERS} or "auto", got {show(value)}')
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
    ip = ip_or_none(host)
    if ip is not None:
        return str(ip)
    if not is_hostname(host):
        raise ValueError(f"{host!r} is neither a valid host name nor an IP address")
    return host


def _load_client(r: Reader, name: str) -> ClientConfig:
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
            r.error("fwmark", f'expected "auto", "off" or an integer, got {show(value)}')

    relay_ip = ip_or_none(relay_host)
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
            if spki(ccert[1][0].public_key()) != spki(ckey[1].public_key()):
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
    host = load_client_host(r, fwmark)
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
        host=host,
        quic_engine=quic_engine,
        event_loop=event_loop,
    )


def _uri_template(r: Reader) -> str | None:
    """``uri_template``, validated as RFC 9484 §3 wants (TemplateError names the rule)."""
    if not r.has("uri_template"):
        return None
    text = r.string("uri_template")
    if text is None:
        return None
    try:
        UriTemplate.parse(text)
    except TemplateError as exc:
        r.error("uri_template", f"{show(text)}: {exc}")
        return None
    return text


AUTH_METHODS = ("mtls", "token")


def _load_auth(r: Reader) -> dict[str, Any]:
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
        r.error("auth", f'expected "none", "mtls", "token" or a list of them, got {show(raw)}')
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
    r: Reader, acl_default: str | None, pool: tuple[Network, ...] | None
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
        problems.append(f'mode: expected "relay" or "client", got {show(mode)}')
    elif mode not in ("relay", "client"):
        close = difflib.get_close_matches(mode, ("relay", "client"), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f'mode: {mode!r} is not "relay" or "client"{hint}')
    problems += unknown_keys(data, mode if isinstance(mode, str) else None)
    if mode not in ("relay", "client"):
        raise ConfigError(path, problems)

    reader = Reader(path, data)
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
