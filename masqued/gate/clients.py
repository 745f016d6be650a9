"""Per-client policy in the relay config: fixed addresses and ACLs.

Clients are described either inline, as ``[clients.NAME]`` tables in the relay
config, or one file per client in ``clients_dir`` (``NAME.conf``, same keys), which
keeps hundreds of clients readable and lets tools add or remove one client by
writing or deleting one file. Keys of a client::

    address = "198.18.200.50"                # or a list: one IPv4 and/or one IPv6
    acl = ["allow 198.19.0.2/32 tcp 8080"]   # ordered rules, first match wins
    acl_default = "deny"                     # overrides the relay's acl_default

NAME is the client's identity: its certificate's CN with mTLS, or the name of its
token in the tokens file.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from masqued.gate.policy import Acl, PolicyError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
CLIENT_KEYS = ("address", "acl", "acl_default")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
MAX_CLIENT_FILES = 100_000


ALLOW_ALL = Acl((), True)


@dataclass(frozen=True)
class ClientPolicy:
    name: str
    addresses: tuple[IPAddress, ...] = ()
    acl: Acl = ALLOW_ALL


def parse_client(
    name: str, table: Mapping[str, Any], where: str, acl_default: str | None
) -> tuple[ClientPolicy | None, list[str]]:
    """One client's policy from its table; ``where`` prefixes error messages."""
    errors: list[str] = []
    if not _NAME_RE.match(name):
        return None, [f"{where}: invalid client name {name!r}"]
    for key in table:
        if key not in CLIENT_KEYS:
            close = difflib.get_close_matches(key, CLIENT_KEYS, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"{where}: invalid key {key!r}{hint}")
    addresses: list[IPAddress] = []
    raw = table.get("address", [])
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not all(isinstance(a, str) for a in items):
        errors.append(f"{where}: address: expected an address or a list of addresses")
        items = []
    for text in items:
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            errors.append(f"{where}: address: {text!r} is not an IP address")
            continue
        if any(a.version == addr.version for a in addresses):
            errors.append(f"{where}: address: more than one IPv{addr.version} address")
            continue
        addresses.append(addr)
    rules = table.get("acl", [])
    if not isinstance(rules, list) or not all(isinstance(x, str) for x in rules):
        errors.append(f'{where}: acl: expected a list of rules like "allow 198.19.0.0/24 tcp 443"')
        rules = []
    default = table.get("acl_default", acl_default)
    if default is None:
        if rules:
            errors.append(
                f'{where}: acl: set acl_default = "allow" or "deny" (here or in the '
                "relay config): what happens to packets no rule matches must be explicit"
            )
        default = "allow"
    if default not in ("allow", "deny"):
        errors.append(f'{where}: acl_default: expected "allow" or "deny", got {default!r}')
        default = "deny"
    try:
        acl = Acl.parse(rules, default)
    except PolicyError as exc:
        errors.append(f"{where}: acl: {exc}")
        acl = Acl((), False)
    if errors:
        return None, errors
    return ClientPolicy(name, tuple(addresses), acl), []


def load_clients_dir(
    directory: Path, acl_default: str | None
) -> tuple[dict[str, ClientPolicy], list[str]]:
    """Every ``NAME.conf`` in ``directory`` (other files are ignored)."""
    out: dict[str, ClientPolicy] = {}
    errors: list[str] = []
    try:
        files = sorted(p for p in directory.iterdir() if p.suffix == ".conf")
    except OSError as exc:
        return {}, [f"clients_dir: cannot read {directory}: {exc.strerror or exc}"]
    if len(files) > MAX_CLIENT_FILES:
        return {}, [f"clients_dir: {directory} has more than {MAX_CLIENT_FILES} files"]
    for path in files:
        try:
            table = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError) as exc:
            errors.append(f"{path}: cannot read: {exc}")
            continue
        except tomllib.TOMLDecodeError as exc:
            errors.append(f"{path}: TOML syntax error: {exc}")
            continue
        policy, errs = parse_client(path.stem, table, str(path), acl_default)
        errors += errs
        if policy is not None:
            out[policy.name] = policy
    return out, errors


def check_addresses(
    clients: Mapping[str, ClientPolicy],
    pool: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...],
) -> list[str]:
    """Fixed addresses must be client addresses of the pool and given only once."""
    errors: list[str] = []
    seen: dict[IPAddress, str] = {}
    for name, policy in clients.items():
        for addr in policy.addresses:
            nets = [n for n in pool if n.version == addr.version and addr in n]
            if not nets:
                errors.append(f"clients.{name}: address: {addr} is not inside the pool")
            else:
                net = nets[0]
                first = net.network_address + 1
                last_bcast = net.version == 4 and addr == net.broadcast_address
                if addr in (net.network_address, first) or last_bcast:
                    errors.append(
                        f"clients.{name}: address: {addr} is the network, gateway or "
                        "broadcast address of the pool"
                    )
            if addr in seen:
                errors.append(f"clients.{name}: address: {addr} is also given to {seen[addr]}")
            seen[addr] = name
    return errors
