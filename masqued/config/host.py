"""Config keys for living on a client (DNS, kill switch, hooks) and the relay's DNS push.

masqued.config.load builds ClientConfig and RelayConfig; the keys of this file are read
here (``load_client_host``, ``load_relay_dns``) so that load.py does not grow
with every host integration. Errors go to the same reader, one line per problem.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from masqued.proto.dns import MAX_DOMAINS, MAX_SERVERS, check_domain

if TYPE_CHECKING:
    from masqued.config.keys import KeyDoc
    from masqued.config.reader import Reader as _Reader

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
DnsBackendName = Literal["auto", "resolved", "resolvconf", "file"]
DNS_BACKENDS: tuple[DnsBackendName, ...] = ("auto", "resolved", "resolvconf", "file")
HOOKS = ("pre_up", "post_up", "pre_down", "post_down")
DEFAULT_HOOK_TIMEOUT = 30.0
MAX_HOOK_COMMANDS = 16


@dataclass(frozen=True)
class Hooks:
    """wg-quick's PreUp/PostUp/PreDown/PostDown: shell commands, %i = the TUN."""

    pre_up: tuple[str, ...] = ()
    post_up: tuple[str, ...] = ()
    pre_down: tuple[str, ...] = ()
    post_down: tuple[str, ...] = ()
    timeout: float = DEFAULT_HOOK_TIMEOUT

    def __bool__(self) -> bool:
        return bool(self.pre_up or self.post_up or self.pre_down or self.post_down)


@dataclass(frozen=True)
class ClientHost:
    """What a client changes on its host besides TUN and routes."""

    dns: tuple[IPAddress, ...] = ()
    dns_from_relay: bool = False  # dns = "relay"
    dns_search: tuple[str, ...] = ()
    dns_backend: DnsBackendName = "auto"
    kill_switch: bool = False
    kill_switch_allow: tuple[Network, ...] = ()
    hooks: Hooks = field(default_factory=Hooks)


def client_key_docs(doc: type[KeyDoc]) -> tuple[KeyDoc, ...]:
    return (
        doc(
            "dns",
            'array of IP addresses, or "relay"',
            "none",
            "Resolvers for the host while the tunnel is up (wg-quick's DNS =): set "
            "through systemd-resolved on the TUN (with the routing domain ~. for a full "
            "tunnel, so every name goes there), else resolvconf, else by rewriting "
            '/etc/resolv.conf (backed up and put back byte for byte). "relay": the '
            "resolvers the relay names (DNS_ASSIGN capsule, draft-ietf-masque-connect-ip-dns). "
            "Undone on stop and by `masqued cleanup NAME`.",
        ),
        doc(
            "dns_search",
            "array of domain names",
            "none",
            'Search domains set with dns (added to those of the relay with dns = "relay"). '
            "With systemd-resolved they also route their names to the tunnel's resolvers.",
        ),
        doc(
            "dns_backend",
            '"auto", "resolved", "resolvconf" or "file"',
            '"auto"',
            '"auto": systemd-resolved when it runs and manages /etc/resolv.conf (and the '
            "instance runs in its network namespace), else resolvconf when installed, "
            'else "file" (/etc/resolv.conf, written in place so a bind-mounted file works).',
        ),
        doc(
            "kill_switch",
            "boolean",
            "false",
            "Drop every packet that would leave the host other than through the TUN, "
            "in the instance's own nftables table (inet masqued_NAME): allowed are "
            "loopback, the tunnel's own UDP and TCP packets to the relay (they carry "
            "fwmark, which kill_switch needs), DHCP, IPv6 neighbour discovery and "
            "kill_switch_allow. Covers IPv4 and IPv6, stays while the client "
            "reconnects and until a clean stop or `masqued cleanup NAME`.",
        ),
        doc(
            "kill_switch_allow",
            "array of CIDRs",
            "none",
            "Destinations reachable outside the tunnel with kill_switch (e.g. the LAN).",
        ),
        *(
            doc(
                hook,
                "command or array of commands",
                "none",
                f"Run with /bin/sh {when}; %i is the TUN name, %% a literal %. Output is "
                "logged; each command may take hook_timeout seconds."
                + (" A failing pre_up aborts the start." if hook == "pre_up" else ""),
            )
            for hook, when in (
                ("pre_up", "before the TUN is created"),
                ("post_up", "once the first tunnel is up and routed"),
                ("pre_down", "on stop, before the TUN and routes go"),
                ("post_down", "on stop, after everything is removed"),
            )
        ),
        doc(
            "hook_timeout",
            "seconds 1..600",
            "30",
            "How long one hook command may run before it is killed (and counts as failed).",
        ),
    )


def relay_key_docs(doc: type[KeyDoc]) -> tuple[KeyDoc, ...]:
    return (
        doc(
            "dns",
            "array of IP addresses",
            "none",
            'Resolvers told to clients (their dns = "relay" uses them): in a DNS_ASSIGN '
            "capsule (draft-ietf-masque-connect-ip-dns) after the routes in datagram "
            "mode, in the masqued-dns header in stream mode. Peers that do not know "
            "the capsule skip it. Applied to new tunnels on reload.",
        ),
        doc(
            "dns_search",
            "array of domain names",
            "none",
            "Search domains told to clients with dns.",
        ),
    )


def _list_of_str(r: _Reader, key: str, limit: int) -> list[str]:
    value = r.data.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        r.error(key, "expected a string or an array of strings")
        return []
    if len(value) > limit:
        r.error(key, f"{len(value)} entries; at most {limit}")
        return []
    return list(value)


def _servers(r: _Reader, key: str) -> tuple[IPAddress, ...]:
    out: list[IPAddress] = []
    for item in _list_of_str(r, key, MAX_SERVERS):
        try:
            if "%" in item:
                raise ValueError(item)
            addr = ipaddress.ip_address(item)
        except ValueError:
            r.error(key, f"{item!r} is not an IP address")
            continue
        if addr.is_unspecified or addr.is_multicast:
            r.error(key, f"{addr} cannot be a resolver")
        elif addr in out:
            r.error(key, f"{addr} is listed twice")
        else:
            out.append(addr)
    return tuple(out)


def _domains(r: _Reader, key: str) -> tuple[str, ...]:
    out: list[str] = []
    for item in _list_of_str(r, key, MAX_DOMAINS):
        try:
            name = check_domain(item)
        except ValueError as exc:
            r.error(key, str(exc))
            continue
        if name not in out:
            out.append(name)
    return tuple(out)


def _hook(r: _Reader, key: str) -> tuple[str, ...]:
    commands = _list_of_str(r, key, MAX_HOOK_COMMANDS)
    for command in commands:
        if not command.strip() or "\0" in command:
            r.error(key, f"{command!r} is not a command")
            return ()
    return tuple(commands)


def load_client_host(r: _Reader, fwmark: int | None) -> ClientHost:
    """The keys of ``client_key_docs``; ``fwmark`` as parsed (0: off)."""
    dns: tuple[IPAddress, ...] = ()
    from_relay = False
    raw: Any = r.data.get("dns")
    if raw == "relay":
        from_relay = True
    elif raw is not None:
        if isinstance(raw, str):
            r.error("dns", f'expected an array of IP addresses or "relay", got {raw!r}')
        else:
            if raw == []:
                r.error("dns", "must not be empty (leave the key out for no DNS changes)")
            dns = _servers(r, "dns")
    search = _domains(r, "dns_search")
    if search and not (dns or from_relay):
        r.error("dns_search", "needs dns (the resolvers the search domains are for)")
    backend = r.choice("dns_backend", DNS_BACKENDS, "auto")
    kill_switch = r.boolean("kill_switch", False)
    allow: tuple[Network, ...] = ()
    if r.has("kill_switch_allow"):
        allow = r.networks("kill_switch_allow", required=False) or ()
        if not kill_switch:
            r.error("kill_switch_allow", "has no effect without kill_switch = true")
    if kill_switch and fwmark == 0:
        r.error(
            "kill_switch",
            'needs the fwmark (fwmark = "off"): the tunnel\'s own packets to the relay '
            "are recognised by it",
        )
    hooks = Hooks(
        **{h: _hook(r, h) for h in HOOKS},
        timeout=r.number("hook_timeout", DEFAULT_HOOK_TIMEOUT, 1.0, 600.0),
    )
    return ClientHost(
        dns=dns,
        dns_from_relay=from_relay,
        dns_search=search,
        dns_backend=backend,  # type: ignore[arg-type]
        kill_switch=kill_switch,
        kill_switch_allow=allow,
        hooks=hooks,
    )


def load_relay_dns(r: _Reader) -> tuple[tuple[IPAddress, ...], tuple[str, ...]]:
    """The relay's ``dns`` and ``dns_search``."""
    if r.data.get("dns") == []:
        r.error("dns", "must not be empty (leave the key out to tell clients nothing)")
    servers = _servers(r, "dns") if r.has("dns") else ()
    search = _domains(r, "dns_search")
    if search and not servers:
        r.error("dns_search", "needs dns (the resolvers the search domains are for)")
    return servers, search
