"""Source NAT (masquerade) for the relay's client pool, in objects we own.

Two backends (docs/architecture.md §4):

- ``NftablesNat``: an own table ``inet masqued_<name>`` with one ``postrouting`` nat
  chain, replaced atomically by one ``nft -f -`` transaction.
- ``IptablesNat``: python-iptables (libiptc, i.e. the *legacy* tables, which
  ``iptables-nft`` and ``nft`` do not show) with an own chain ``MASQUED-<name>`` and one
  jump rule from POSTROUTING tagged with the comment ``masqued:<name>``.

``cleanup_nat`` removes both kinds by name, whichever backend made them.
"""

from __future__ import annotations

import glob
import importlib.util
import ipaddress
import json
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Iterator, Sequence
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

    def missing(self, sources: Sequence[IPNetwork], egress: str) -> list[str]:
        """What ``apply(sources, egress)`` makes that the host lacks now, in the
        backend's own notation (doctor's NAT check); empty when all is in place."""
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
    lines += [f"\t\t{rule}" for rule in nft_rules(sources, egress)]
    lines += ["\t}", "}", ""]
    return "\n".join(lines)


def nft_rules(sources: Sequence[IPNetwork], egress: str) -> list[str]:
    """Our masquerade rules as ``nft list table`` prints them."""
    _check_ifname(egress)
    return [
        f'{"ip" if src.version == 4 else "ip6"} saddr {src} oifname "{egress}" masquerade'
        for src in sorted(sources, key=_net_key)
    ]


def absent(expected: Sequence[str], listing: str) -> list[str]:
    """The lines of ``expected`` that ``listing`` does not hold (spacing ignored)."""
    present = {line.strip() for line in listing.splitlines()}
    return [line for line in expected if line not in present]


def nft_missing(listing: str, table: str, sources: Sequence[IPNetwork], egress: str) -> list[str]:
    """What ``nft list table inet TABLE`` (``listing``) lacks of our ruleset."""
    if f"table inet {table} {{" not in {line.strip() for line in listing.splitlines()}:
        return [f"table inet {table}"]
    return absent(nft_rules(sources, egress), listing)


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

    def missing(self, sources: Sequence[IPNetwork], egress: str) -> list[str]:
        try:
            listing = _run_nft(None, "list", "table", "inet", self.table)
        except (NatError, OSError):
            listing = ""
        return nft_missing(listing, self.table, sources, egress)


# --------------------------------------------------------------------------- iptables
#
# libiptc/libxtables run in a short-lived helper process, one per operation (an apply,
# a removal, a description) for both address families:
#
# - libxtables (1.8.9, Debian 12) registers an extension only for the family that is
#   selected when its .so is first dlopen()ed. ``libxt_MASQUERADE.so`` holds both the
#   IPv4 and the IPv6 target, so after an IPv4 MASQUERADE the same process can never
#   find the IPv6 one ("can't find target MASQUERADE"), and re-running the init
#   function exit()s the process ("target already registered"). The helper therefore
#   forks (after importing iptc, before any extension is loaded) for every family but
#   the last it handles.
# - libxtables calls exit() on several internal errors: that must not be the daemon.
# - ``import iptc`` runs ``ldconfig -N -v`` to find the extensions, gcc (via ctypes'
#   find_library) to find its own libxtwrapper, and setuptools' distutils shim. With
#   XTABLES_LIBDIR, IPTABLES_LIBDIR and the standard library's distutils (settings the
#   libraries read) an apply's helper uses 0.15 s CPU instead of 2 x 0.35 s.


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


def ipt_missing(
    lines: dict[int, list[str]],
    chain: str,
    comment: str,
    sources: Sequence[IPNetwork],
    egress: str,
) -> list[str]:
    """What each family's ``iptables -t nat -S`` lines of ours (``lines``; a family
    absent from it has no nat table) lack for ``sources``."""
    out: list[str] = []
    for version in (4, 6):
        fam = [s for s in sources if s.version == version]
        if fam:
            expected = iptables_rules(chain, comment, fam, egress)
            out += absent(expected, "\n".join(lines.get(version, ())))
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


def _xtables_libdir() -> str | None:
    """Where libxtables' extensions are (python-iptables otherwise asks ldconfig)."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    candidates = [f"/usr/lib/{multiarch}/xtables"] if multiarch else []
    candidates += ["/usr/lib64/xtables", "/usr/lib/xtables"]
    candidates += sorted(glob.glob("/usr/lib/*/xtables"))
    for d in candidates:
        if os.path.isfile(os.path.join(d, "libxt_standard.so")):
            return d
    return None


def _helper_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("SETUPTOOLS_USE_DISTUTILS", "stdlib")
    libdir = _xtables_libdir()
    if libdir is not None:
        env.setdefault("XTABLES_LIBDIR", libdir)
    # python-iptables' own C helper, found there directly instead of by running gcc.
    spec = importlib.util.find_spec("libxtwrapper")
    if spec is not None and spec.origin:
        env.setdefault("IPTABLES_LIBDIR", os.path.dirname(spec.origin))
    return env


IptRequest = tuple[int, str, dict[str, Any]]  # (family 4|6, op, arguments)


def _ipt_run(requests: Sequence[IptRequest]) -> list[Any]:
    """Run ``requests`` (ops of ``_child_main``) in one helper process; their results
    in order. No process at all for no requests."""
    if not requests:
        return []
    payload = json.dumps([{"version": v, "op": op, "args": args} for v, op, args in requests])
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "masqued.host.nat"],
            input=payload,
            capture_output=True,
            text=True,
            timeout=60,
            env=_helper_env(),
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NatError(f"iptables helper failed: {e}") from None
    try:
        replies = json.loads(proc.stdout.strip().splitlines()[-1])
        if not isinstance(replies, list) or len(replies) != len(requests):
            raise ValueError("wrong reply")
    except (ValueError, IndexError):
        replies = [{"ok": False, "error": f"exit {proc.returncode}"}] * len(requests)
    results: list[Any] = []
    for (version, op, _), reply in zip(requests, replies, strict=True):
        if not isinstance(reply, dict) or not reply.get("ok"):
            error = reply.get("error", "") if isinstance(reply, dict) else reply
            err = (proc.stderr.strip() + " " + str(error)).strip()
            raise NatError(f"iptables (IPv{version}) {op}: {err}")
        results.append(reply["result"])
    return results


def _ipt_call(version: int, op: str, **args: Any) -> Any:
    """One operation for one family, in a helper process."""
    return _ipt_run([(version, op, args)])[0]


# The functions below run inside the child (``python -m masqued.host.nat``).


def _iptc() -> Any:
    import iptc

    return iptc


@contextmanager
def _nat_table(version: int) -> Iterator[Any]:
    """The libiptc nat table with autocommit off; commits on success.

    python-iptables caches one Table object per name and reads the kernel blob only
    on ``refresh()``: refresh first, turn autocommit off so the whole change is one
    atomic table replace at ``commit()``.
    """
    iptc = _iptc()
    table = iptc.Table(iptc.Table.NAT) if version == 4 else iptc.Table6(iptc.Table6.NAT)
    table.autocommit = False
    table.refresh()
    yield table
    table.commit()
    table.refresh()


def _is_our_jump(rule: Any, chain: str, comment: str) -> bool:
    target = rule.target.name if rule.target is not None else ""
    if target == chain:
        return True
    return any(m.name == "comment" and m.comment == comment for m in rule.matches)


def _rule_src(rule: Any) -> str:
    """libiptc reports ``198.18.200.0/255.255.255.0``; normalise to CIDR."""
    return str(ipaddress.ip_network(str(rule.src), strict=False))


def _ipt_remove_here(version: int, chain: str, comment: str) -> list[str]:
    done: list[str] = []
    tool = "iptables" if version == 4 else "ip6tables"
    with _nat_table(version) as table:
        post = _iptc().Chain(table, "POSTROUTING")
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
    return done


def _ipt_apply_here(
    version: int, chain: str, comment: str, sources: list[str], egress: str
) -> list[str]:
    iptc = _iptc()
    tool = "iptables" if version == 4 else "ip6tables"
    new_rule = iptc.Rule if version == 4 else iptc.Rule6
    want = [(src, egress) for src in sources]
    done: list[str] = []
    with _nat_table(version) as table:
        if table.is_chain(chain):
            ours = iptc.Chain(table, chain)
            have = [(_rule_src(r), r.out_interface) for r in ours.rules]
        else:
            done.append(f"{tool} -t nat -N {chain}")
            ours = table.create_chain(chain)
            have = []
        if have != want:
            # Replace the chain's contents; the commit swaps the table atomically.
            if have:
                done.append(f"{tool} -t nat -F {chain}")
                table.flush_entries(chain)
            for src, oif in want:
                done.append(f"{tool} -t nat -A {chain} -s {src} -o {oif} -j MASQUERADE")
                rule = new_rule()
                rule.src = src
                rule.out_interface = oif
                rule.create_target("MASQUERADE")
                ours.append_rule(rule)
        post = iptc.Chain(table, "POSTROUTING")
        jumps = [r for r in post.rules if _is_our_jump(r, chain, comment)]
        for extra in jumps[1:]:
            done.append(f'{tool} -t nat -D POSTROUTING -m comment --comment "{comment}" -j {chain}')
            post.delete_rule(extra)
        if not jumps:
            done.append(f'{tool} -t nat -A POSTROUTING -m comment --comment "{comment}" -j {chain}')
            rule = new_rule()
            match = rule.create_match("comment")
            match.comment = comment
            rule.create_target(chain)
            post.append_rule(rule)
    return done


def _ipt_lines_here(version: int, chain: str, comment: str) -> list[str]:
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


_OPS: dict[str, Callable[..., list[str]]] = {
    "apply": _ipt_apply_here,
    "remove": _ipt_remove_here,
    "lines": _ipt_lines_here,
}


def _run_family(requests: list[tuple[int, dict[str, Any]]]) -> list[tuple[int, dict[str, Any]]]:
    out = []
    for index, req in requests:
        try:
            result = _OPS[req["op"]](req["version"], **req["args"])
            out.append((index, {"ok": True, "result": result}))
        except Exception as e:
            out.append((index, {"ok": False, "error": f"{type(e).__name__}: {e}"}))
    return out


def _run_forked(requests: list[tuple[int, dict[str, Any]]]) -> list[tuple[int, dict[str, Any]]]:
    """``_run_family`` in a fork: a process in which no extension is loaded yet."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not collected
        os.close(rfd)
        code = 0
        try:
            with os.fdopen(wfd, "w") as w:
                w.write(json.dumps(_run_family(requests)))
        except BaseException:
            code = 1
        os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd) as r:
        data = r.read()
    _, status = os.waitpid(pid, 0)
    try:
        return [(int(i), reply) for i, reply in json.loads(data)]
    except (ValueError, TypeError):
        error = f"helper for IPv{requests[0][1].get('version')} died (wait status {status})"
        return [(i, {"ok": False, "error": error}) for i, _ in requests]


def _child_main() -> int:
    """Entry of the helper process: a JSON list of requests on stdin, the list of
    replies on stdout. Families after the first run in forks (see above)."""
    try:
        reqs = json.loads(sys.stdin.read())
        if not isinstance(reqs, list) or not all(isinstance(r, dict) for r in reqs):
            raise ValueError("expected a list of requests")
    except Exception as e:
        print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}), flush=True)
        return 1
    families: dict[object, list[tuple[int, dict[str, Any]]]] = {}
    for index, req in enumerate(reqs):
        families.setdefault(req.get("version"), []).append((index, req))
    groups = list(families.values())
    replies: dict[int, dict[str, Any]] = {}
    for group in groups[1:]:
        replies.update(_run_forked(group))
    if groups:
        replies.update(_run_family(groups[0]))
    ordered = [replies[i] for i in range(len(reqs))]
    print(json.dumps(ordered), flush=True)
    return 0 if all(r["ok"] for r in ordered) else 1


def _ipt_remove_requests(chain: str, comment: str) -> list[IptRequest]:
    """Removal of our jump rules and chain, for each family whose legacy nat table exists."""
    return [
        (v, "remove", {"chain": chain, "comment": comment})
        for v in (4, 6)
        if _legacy_table_loaded(v)
    ]


def _log_done(results: Sequence[list[str]]) -> list[str]:
    done = [cmd for result in results for cmd in result]
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
        requests: list[IptRequest] = []
        for version in (4, 6):
            fam = [str(s) for s in sorted(sources, key=_net_key) if s.version == version]
            if fam:
                args = {"chain": self.chain, "comment": self.comment, "sources": fam}
                requests.append((version, "apply", {**args, "egress": egress}))
            elif _legacy_table_loaded(version):
                requests.append((version, "remove", {"chain": self.chain, "comment": self.comment}))
        _log_done(_ipt_run(requests))

    def remove(self) -> None:
        _log_done(_ipt_run(_ipt_remove_requests(self.chain, self.comment)))

    def describe(self) -> str:
        tools = {4: "iptables-legacy", 6: "ip6tables-legacy"}
        try:
            lines = self._lines()
        except NatError as e:
            loaded = [v for v in (4, 6) if _legacy_table_loaded(v)]
            lines = {v: [f"({e})"] for v in loaded}
        parts: list[str] = []
        for version in (4, 6):
            cmd = f"{tools[version]} -t nat -S"
            if version not in lines:
                parts.append(f"# {cmd}\n(nat table not loaded)")
            else:
                parts.append(f"# {cmd} | grep {self.chain}\n" + "\n".join(lines[version]))
        return "\n".join(parts)

    def missing(self, sources: Sequence[IPNetwork], egress: str) -> list[str]:
        return ipt_missing(self._lines(), self.chain, self.comment, sources, egress)

    def _lines(self) -> dict[int, list[str]]:
        loaded = [v for v in (4, 6) if _legacy_table_loaded(v)]
        results = _ipt_run(
            [(v, "lines", {"chain": self.chain, "comment": self.comment}) for v in loaded]
        )
        return dict(zip(loaded, results, strict=True))


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
    try:
        done += _log_done(_ipt_run(_ipt_remove_requests(ids.ipt_chain, ids.comment)))
    except NatError as e:
        log.warning("iptables cleanup of %s failed: %s", ids.ipt_chain, e)
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

    def missing(self, sources: Sequence[IPNetwork], egress: str) -> list[str]:
        have = (
            iptables_rules(self.ids.ipt_chain, self.ids.comment, self.sources, self.egress)
            if self.egress is not None
            else []
        )
        want = iptables_rules(self.ids.ipt_chain, self.ids.comment, sources, egress)
        return absent(want, "\n".join(have))

    def describe(self) -> str:
        if self.egress is None:
            return "# fake\n(none)"
        return "# fake\n" + "\n".join(
            iptables_rules(self.ids.ipt_chain, self.ids.comment, self.sources, self.egress)
        )


if __name__ == "__main__":
    sys.exit(_child_main())
