"""Source NAT (masquerade) for the relay's client pool, in objects we own.

Two backends (DESIGN.md §4):

- ``NftablesNat``: an own table ``inet masqued_<name>`` with one ``postrouting`` nat
  chain, replaced atomically by one ``nft -f -`` transaction.
- ``IptablesNat``: python-iptables (libiptc, i.e. the *legacy* tables, which
  ``iptables-nft`` and ``nft`` do not show) with an own chain ``MASQUED-<name>`` and one
  jump rule from POSTROUTING tagged with the comment ``masqued:<name>``.

``cleanup_nat`` removes both kinds by name, whichever backend made them.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from masqued.host.naming import InstanceIds

log = logging.getLogger("masqued.host")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

NAT_KINDS = ("auto", "nftables", "iptables", "off")


class NatError(RuntimeError):
    pass


class NatBackend(Protocol):
    kind: str

    def apply(self, sources: Sequence[IPNetwork], egress: str) -> None:
        """Masquerade packets from ``sources`` leaving via ``egress`` (idempotent)."""
        ...

    def remove(self) -> None:
        """Remove everything this backend owns (idempotent)."""
        ...

    def describe(self) -> str:
        """The rules as the operator sees them, and the command to see them."""
        ...


def _net_key(net: IPNetwork) -> tuple[int, int, int]:
    return (net.version, int(net.network_address), net.prefixlen)


def _check_ifname(egress: str) -> str:
    if not egress or len(egress) > 15 or any(c in egress for c in ' "\\/\n\t'):
        raise ValueError(f"invalid egress interface name {egress!r}")
    return egress


# --------------------------------------------------------------------------- nftables


def nft_ruleset(table: str, sources: Sequence[IPNetwork], egress: str) -> str:
    """The ``nft -f`` script that (re)creates our table in one transaction.

    ``table inet T {}`` first makes ``delete`` succeed when the table does not exist
    yet; the whole file is one atomic transaction, so there is no moment without NAT.
    """
    _check_ifname(egress)
    lines = [
        f"table inet {table} {{}}",
        f"delete table inet {table}",
        f"table inet {table} {{",
        "\tchain postrouting {",
        "\t\ttype nat hook postrouting priority srcnat; policy accept;",
    ]
    for src in sorted(sources, key=_net_key):
        fam = "ip" if src.version == 4 else "ip6"
        lines.append(f'\t\t{fam} saddr {src} oifname "{egress}" masquerade')
    lines += ["\t}", "}", ""]
    return "\n".join(lines)


def nft_delete_script(table: str) -> str:
    """Delete our table, succeeding when it does not exist."""
    return f"table inet {table} {{}}\ndelete table inet {table}\n"


def _run_nft(script: str | None, *args: str) -> str:
    cmd = ["nft", *args] if script is None else ["nft", "-f", "-"]
    proc = subprocess.run(cmd, input=script, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise NatError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return proc.stdout


class NftablesNat:
    kind = "nftables"

    def __init__(self, ids: InstanceIds) -> None:
        self.table = ids.nft_table

    def apply(self, sources: Sequence[IPNetwork], egress: str) -> None:
        script = nft_ruleset(self.table, sources, egress)
        for line in script.splitlines():
            if "masquerade" in line:
                log.info("[#] nft add rule inet %s postrouting %s", self.table, line.strip())
        log.info("[#] nft -f - (replace table inet %s)", self.table)
        _run_nft(script)

    def remove(self) -> None:
        log.info("[#] nft delete table inet %s", self.table)
        _run_nft(nft_delete_script(self.table))

    def describe(self) -> str:
        cmd = f"nft list table inet {self.table}"
        try:
            out = _run_nft(None, "list", "table", "inet", self.table).rstrip()
        except (NatError, OSError) as e:
            out = f"(not present: {e})"
        return f"# {cmd}\n{out}"


# --------------------------------------------------------------------------- iptables


def iptables_rules(
    chain: str, comment: str, sources: Sequence[IPNetwork], egress: str
) -> list[str]:
    """The ``iptables -t nat -S`` lines we own (both families in one list, v4 first)."""
    _check_ifname(egress)
    out = [
        f'-A POSTROUTING -m comment --comment "{comment}" -j {chain}',
        f"-N {chain}",
    ]
    out += [
        f"-A {chain} -s {src} -o {egress} -j MASQUERADE" for src in sorted(sources, key=_net_key)
    ]
    return out


def _legacy_table_loaded(version: int) -> bool:
    """Whether the legacy nat table exists in this network namespace.

    Opening it through libiptc would load ``iptable_nat`` as a side effect; a host
    that never had it cannot hold anything of ours, so cleanup must not create it.
    """
    path = Path("/proc/net/ip_tables_names" if version == 4 else "/proc/net/ip6_tables_names")
    try:
        return "nat" in path.read_text().split()
    except OSError:
        return False


def _iptc() -> Any:
    import iptc

    return iptc


@contextmanager
def _nat_table(version: int) -> Iterator[Any]:
    """The libiptc nat table with autocommit off; commits on success.

    python-iptables caches one Table object per name and process and reads the kernel
    blob only on ``refresh()``: refresh first (someone else may have changed it), turn
    autocommit off so the whole change is one atomic replace, and always restore.
    """
    iptc = _iptc()
    table = iptc.Table(iptc.Table.NAT) if version == 4 else iptc.Table6(iptc.Table6.NAT)
    table.autocommit = False
    try:
        table.refresh()
        yield table
        table.commit()
    finally:
        try:
            table.refresh()  # drop uncommitted changes from the cached handle
        finally:
            table.autocommit = True


def _ensure_target(version: int, name: str) -> None:
    """Make libxtables know target ``name`` for ``version`` (python-iptables quirk).

    Extensions register only for the family that is current when their .so is first
    dlopen()ed, and a second dlopen() does not run the constructor again: after an
    IPv4 MASQUERADE, IPv6 MASQUERADE is "can't find target" (and vice versa). The fix
    is to call the extension's init function again with the other family selected.
    ``libxt_MASQUERADE.so`` is a link to ``libxt_NAT.so`` (init ``libxt_NAT_init``).
    """
    import ctypes

    xt_mod = _iptc().xtables
    proto = xt_mod.NFPROTO_IPV4 if version == 4 else xt_mod.NFPROTO_IPV6
    xt = xt_mod.xtables(proto)
    if xt.find_target(name):
        return
    libdir = xt_mod._xtables_libdir
    path = os.path.realpath(os.path.join(libdir, f"libxt_{name}.so"))
    base = os.path.basename(path).removesuffix(".so")
    init = getattr(ctypes.CDLL(path), f"{base}_init", None)
    if init is None:
        raise NatError(f"iptables extension {name} for IPv{version} not found in {libdir}")
    xt_mod.xtables._xtables_set_nfproto(proto)
    init()
    if not xt.find_target(name):
        raise NatError(f"iptables extension {name} for IPv{version} could not be loaded")


def _is_our_jump(rule: Any, chain: str, comment: str) -> bool:
    try:
        target = rule.target.name if rule.target is not None else ""
    except Exception:  # libiptc exposes odd targets (standard verdicts) oddly
        target = ""
    if target == chain:
        return True
    return any(m.name == "comment" and m.comment == comment for m in rule.matches)


def _ipt_remove(version: int, chain: str, comment: str) -> list[str]:
    """Remove our jump rules and chain from one family's legacy nat table."""
    if not _legacy_table_loaded(version):
        return []
    done: list[str] = []
    tool = "iptables" if version == 4 else "ip6tables"
    with _nat_table(version) as table:
        post = next(c for c in table.chains if c.name == "POSTROUTING")
        for rule in list(post.rules):
            if _is_our_jump(rule, chain, comment):
                post.delete_rule(rule)
                done.append(
                    f'{tool} -t nat -D POSTROUTING -m comment --comment "{comment}" -j {chain}'
                )
        if table.is_chain(chain):
            table.flush_entries(chain)
            table.delete_chain(chain)
            done += [f"{tool} -t nat -F {chain}", f"{tool} -t nat -X {chain}"]
    for cmd in done:
        log.info("[#] %s", cmd)
    return done


class IptablesNat:
    kind = "iptables"

    def __init__(self, ids: InstanceIds) -> None:
        self.chain = ids.ipt_chain
        self.comment = ids.comment

    def apply(self, sources: Sequence[IPNetwork], egress: str) -> None:
        _check_ifname(egress)
        for version in (4, 6):
            fam = [s for s in sources if s.version == version]
            if fam:
                self._apply_family(version, fam, egress)
            else:
                _ipt_remove(version, self.chain, self.comment)

    def _apply_family(self, version: int, sources: Sequence[IPNetwork], egress: str) -> None:
        iptc = _iptc()
        tool = "iptables" if version == 4 else "ip6tables"
        want = [(str(s), egress) for s in sorted(sources, key=str)]
        with _nat_table(version) as table:
            if table.is_chain(self.chain):
                chain = iptc.Chain(table, self.chain)
                have = [(_rule_src(r), r.out_interface) for r in chain.rules]
            else:
                log.info("[#] %s -t nat -N %s", tool, self.chain)
                chain = table.create_chain(self.chain)
                have = []
            if have != want:
                # Replace the chain's contents; the commit swaps the table atomically.
                if have:
                    log.info("[#] %s -t nat -F %s", tool, self.chain)
                    table.flush_entries(self.chain)
                _ensure_target(version, "MASQUERADE")
                for src, oif in want:
                    log.info(
                        "[#] %s -t nat -A %s -s %s -o %s -j MASQUERADE", tool, self.chain, src, oif
                    )
                    rule = iptc.Rule() if version == 4 else iptc.Rule6()
                    rule.src = src
                    rule.out_interface = oif
                    rule.create_target("MASQUERADE")
                    chain.append_rule(rule)
            post = iptc.Chain(table, "POSTROUTING")
            jumps = [r for r in post.rules if _is_our_jump(r, self.chain, self.comment)]
            for extra in jumps[1:]:
                post.delete_rule(extra)
            if not jumps:
                log.info(
                    '[#] %s -t nat -A POSTROUTING -m comment --comment "%s" -j %s',
                    tool,
                    self.comment,
                    self.chain,
                )
                rule = iptc.Rule() if version == 4 else iptc.Rule6()
                match = rule.create_match("comment")
                match.comment = self.comment
                rule.create_target(self.chain)
                post.append_rule(rule)

    def remove(self) -> None:
        for version in (4, 6):
            _ipt_remove(version, self.chain, self.comment)

    def describe(self) -> str:
        parts: list[str] = []
        for version, tool in ((4, "iptables-legacy"), (6, "ip6tables-legacy")):
            cmd = f"{tool} -t nat -S"
            if not _legacy_table_loaded(version):
                parts.append(f"# {cmd}\n(nat table not loaded)")
                continue
            lines = _ipt_lines(version, self.chain, self.comment)
            parts.append(f"# {cmd} | grep {self.chain}\n" + "\n".join(lines))
        return "\n".join(parts)


def _rule_src(rule: Any) -> str:
    """libiptc reports ``198.18.200.0/255.255.255.0``; normalise to CIDR."""
    return str(ipaddress.ip_network(str(rule.src), strict=False))


def _ipt_lines(version: int, chain: str, comment: str) -> list[str]:
    iptc = _iptc()
    table = iptc.Table(iptc.Table.NAT) if version == 4 else iptc.Table6(iptc.Table6.NAT)
    table.refresh()
    lines: list[str] = []
    for rule in iptc.Chain(table, "POSTROUTING").rules:
        if _is_our_jump(rule, chain, comment):
            lines.append(f'-A POSTROUTING -m comment --comment "{comment}" -j {chain}')
    if table.is_chain(chain):
        lines.append(f"-N {chain}")
        for rule in iptc.Chain(table, chain).rules:
            lines.append(f"-A {chain} -s {_rule_src(rule)} -o {rule.out_interface} -j MASQUERADE")
    return lines


# --------------------------------------------------------------------------- choice


def iptables_is_legacy() -> bool:
    """True when the host's ``iptables`` is the legacy variant (``iptables -V``)."""
    if shutil.which("iptables") is None:
        return False
    try:
        out = subprocess.run(["iptables", "-V"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return False
    return "(legacy)" in out


def make_nat(kind: str, ids: InstanceIds) -> NatBackend | None:
    """The backend for config value ``nat = kind``; None for ``off``."""
    if kind == "off":
        return None
    if kind == "auto":
        kind = "iptables" if iptables_is_legacy() else "nftables"
    if kind == "nftables":
        return NftablesNat(ids)
    if kind == "iptables":
        return IptablesNat(ids)
    raise ValueError(f"invalid nat kind {kind!r}: use one of {', '.join(NAT_KINDS)}")


def cleanup_nat(ids: InstanceIds) -> list[str]:
    """Remove our nft table and our iptables chain/jumps (v4, v6), whoever made them."""
    done: list[str] = []
    if shutil.which("nft") is not None:
        try:
            existed = (
                subprocess.run(
                    ["nft", "list", "table", "inet", ids.nft_table],
                    capture_output=True,
                    timeout=30,
                ).returncode
                == 0
            )
            if existed:
                NftablesNat(ids).remove()
                done.append(f"nft delete table inet {ids.nft_table}")
        except (NatError, OSError) as e:
            log.warning("nft cleanup of %s failed: %s", ids.nft_table, e)
    for version in (4, 6):
        try:
            done += _ipt_remove(version, ids.ipt_chain, ids.comment)
        except ImportError:
            break  # no python-iptables: it cannot have made anything
        except Exception as e:  # iptc.IPTCError, or libiptc unable to load
            log.warning("iptables cleanup of %s (IPv%d) failed: %s", ids.ipt_chain, version, e)
    return done


class FakeNat:
    """A NAT backend that keeps its rules in memory, for tests of the layers above."""

    def __init__(self, ids: InstanceIds, kind: str = "fake") -> None:
        self.kind = kind
        self.ids = ids
        self.sources: tuple[IPNetwork, ...] = ()
        self.egress: str | None = None

    def apply(self, sources: Sequence[IPNetwork], egress: str) -> None:
        _check_ifname(egress)
        self.sources = tuple(sorted(sources, key=str))
        self.egress = egress

    def remove(self) -> None:
        self.sources = ()
        self.egress = None

    def describe(self) -> str:
        if self.egress is None:
            return "# fake\n(none)"
        return "# fake\n" + "\n".join(
            iptables_rules(self.ids.ipt_chain, self.ids.comment, self.sources, self.egress)
        )
