"""The host's resolver configuration while a client's tunnel is up (wg-quick's DNS =).

(masqued.host.dns is something else: how the client itself resolves the relay's name
from marked sockets.) Three backends, as wg-quick and the tools operators know:

- ``ResolvedBackend``: systemd-resolved, per link: ``resolvectl dns TUN ...`` and
  ``resolvectl domain TUN ...`` (the routing domain ``~.`` for a full tunnel, so
  every name goes to the tunnel's resolvers, plus the search domains) and
  ``resolvectl default-route TUN yes``. Undone by ``resolvectl revert TUN``, and by
  resolved itself when the TUN goes.
- ``ResolvconfBackend``: ``resolvconf -a IFACE -m 0 -x`` with the lines on stdin
  (openresolv and Debian's resolvconf; IFACE is ``tun.mq-NAME`` where
  /etc/resolvconf/interface-order exists, as wg-quick does), ``resolvconf -d IFACE -f``.
- ``FileBackend``: /etc/resolv.conf itself. The original bytes go to
  RUN_DIR/NAME/resolv.conf.orig first (a crash leaves the backup, and the next start
  or ``masqued cleanup NAME`` puts it back); then the file is written *in place*:
  ``ip netns exec`` and containers bind-mount a file over /etc/resolv.conf, and a
  bind-mounted file cannot be replaced by rename (EBUSY). A symlink (to a resolved
  or NetworkManager file) is replaced by a file and comes back as the same symlink.
  Restoring checks that the file is still ours (its first line names the instance):
  a file someone else wrote since is left alone.

Each backend notes what it did in RUN_DIR/NAME/dns.json, which cleanup reads.
``choose`` picks the backend for "auto"; ``check`` says whether the host really uses
what was set (doctor and status).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from masqued.host.naming import InstanceIds

log = logging.getLogger("masqued.host")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
RESOLV_CONF = Path("/etc/resolv.conf")
RESOLVED_RUN = Path("/run/systemd/resolve")
RESOLVED_STUB = "127.0.0.53"
RESOLVCONF_ORDER = Path("/etc/resolvconf/interface-order")
RECORD_FILE = "dns.json"
BACKUP_FILE = "resolv.conf.orig"
# glibc uses 3 nameservers (MAXNS) and 6 search domains in older versions.
GLIBC_MAXNS = 3

Runner = Callable[[Sequence[str], str | None], subprocess.CompletedProcess[str]]


class ResolverError(RuntimeError):
    """The resolver configuration could not be set or undone; the message says why."""


def run_command(cmd: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), input=stdin, capture_output=True, text=True, timeout=15)


def _run(runner: Runner, cmd: Sequence[str], stdin: str | None = None) -> str:
    try:
        proc = runner(cmd, stdin)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ResolverError(f"{' '.join(cmd)}: {exc}") from None
    if proc.returncode != 0:
        why = (proc.stderr or proc.stdout or "").strip() or f"exit status {proc.returncode}"
        raise ResolverError(f"{' '.join(cmd)} failed: {why}")
    return proc.stdout or ""


@dataclass(frozen=True)
class ResolverConfig:
    """What to set: the tunnel's resolvers, search domains, and whether every name
    goes there (a full tunnel) or only the search (and ``domains``) names."""

    servers: tuple[IPAddress, ...]
    search: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()  # routing-only domains (resolved); "" = every name
    all_names: bool = False

    def resolv_conf(self, marker: str) -> str:
        lines = [marker]
        lines += [f"nameserver {s}" for s in self.servers[:GLIBC_MAXNS]]
        if self.search:
            lines.append("search " + " ".join(self.search))
        return "\n".join(lines) + "\n"


class ResolverBackend(Protocol):
    kind: str

    def apply(self, config: ResolverConfig) -> None:
        """Set ``config`` (again: idempotent, replaces what this backend set)."""
        ...

    def remove(self) -> list[str]:
        """Undo everything this backend set; what was done (idempotent)."""
        ...


class _Record:
    """RUN_DIR/NAME/dns.json: which backend set what, for cleanup after a crash."""

    def __init__(self, run_dir: Path, name: str) -> None:
        self.dir = run_dir / name
        self.path = self.dir / RECORD_FILE

    def write(self, data: dict[str, Any]) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{RECORD_FILE}.tmp")
        tmp.write_text(json.dumps(data, sort_keys=True) + "\n")
        tmp.replace(self.path)

    def read(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def drop(self) -> None:
        self.path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- resolved


class ResolvedBackend:
    kind = "resolved"

    def __init__(self, ids: InstanceIds, run_dir: Path, runner: Runner = run_command) -> None:
        self.ifname = ids.tun
        self.record = _Record(run_dir, ids.name)
        self.runner = runner

    def apply(self, config: ResolverConfig) -> None:
        self.record.write({"kind": self.kind, "ifname": self.ifname})
        dev = self.ifname
        domains = [*config.search, *(f"~{d}" for d in config.domains if d)]
        if config.all_names or "" in config.domains:
            domains.append("~.")
        steps = [
            ["resolvectl", "dns", dev, *map(str, config.servers)],
            ["resolvectl", "domain", dev, *dict.fromkeys(domains)],
            ["resolvectl", "default-route", dev, "yes" if config.all_names else "no"],
        ]
        for cmd in steps:
            log.info("[#] %s", " ".join(cmd))
            _run(self.runner, cmd)

    def remove(self) -> list[str]:
        return _resolved_revert(self.ifname, self.runner, self.record)


def _resolved_revert(ifname: str, runner: Runner, record: _Record) -> list[str]:
    done = []
    if Path(f"/sys/class/net/{ifname}").exists():
        cmd = ["resolvectl", "revert", ifname]
        log.info("[#] %s", " ".join(cmd))
        try:
            _run(runner, cmd)
            done.append(" ".join(cmd))
        except ResolverError as exc:
            log.warning("%s", exc)
    record.drop()
    return done


# --------------------------------------------------------------------------- resolvconf


def resolvconf_iface(ids: InstanceIds) -> str:
    """Debian's resolvconf orders records by interface-name patterns: ``tun.*`` comes
    first there (wg-quick's prefix); openresolv takes the name as it is."""
    return f"tun.{ids.tun}" if RESOLVCONF_ORDER.exists() else ids.tun


class ResolvconfBackend:
    kind = "resolvconf"

    def __init__(self, ids: InstanceIds, run_dir: Path, runner: Runner = run_command) -> None:
        self.iface = resolvconf_iface(ids)
        self.marker = f"# masqued:{ids.name}"
        self.record = _Record(run_dir, ids.name)
        self.runner = runner

    def apply(self, config: ResolverConfig) -> None:
        self.record.write({"kind": self.kind, "iface": self.iface})
        cmd = ["resolvconf", "-a", self.iface, "-m", "0", "-x"]
        log.info("[#] %s", " ".join(cmd))
        _run(self.runner, cmd, config.resolv_conf(self.marker))

    def remove(self) -> list[str]:
        return _resolvconf_delete(self.iface, self.runner, self.record)


def _resolvconf_delete(iface: str, runner: Runner, record: _Record) -> list[str]:
    cmd = ["resolvconf", "-d", iface, "-f"]
    log.info("[#] %s", " ".join(cmd))
    done = []
    try:
        _run(runner, cmd)
        done.append(" ".join(cmd))
    except ResolverError as exc:
        log.warning("%s", exc)
    record.drop()
    return done


# --------------------------------------------------------------------------- the file


class FileBackend:
    kind = "file"

    def __init__(self, ids: InstanceIds, run_dir: Path, path: Path = RESOLV_CONF) -> None:
        self.name = ids.name
        self.path = path
        self.record = _Record(run_dir, ids.name)
        self.backup = run_dir / ids.name / BACKUP_FILE
        self.marker = f"# masqued:{ids.name} wrote this file; the original comes back on stop"

    def apply(self, config: ResolverConfig) -> None:
        if self.record.read() is None or not self.backup.exists():
            self._save_original()
        text = config.resolv_conf(self.marker)
        log.info("[#] write %s (nameserver %s)", self.path, " ".join(map(str, config.servers)))
        if self.path.is_symlink():
            _replace(self.path, text.encode())  # a link is replaced; restore makes it again
        else:
            write_in_place(self.path, text.encode())

    def _save_original(self) -> None:
        link = os.readlink(self.path) if self.path.is_symlink() else None
        try:
            original = self.path.read_bytes()
        except FileNotFoundError:
            original = None
        self.backup.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if original is not None:
            _replace(self.backup, original)
        log.info("[#] cp %s %s", self.path, self.backup)
        self.record.write(
            {
                "kind": self.kind,
                "path": str(self.path),
                "symlink": link,
                "existed": original is not None,
                "marker": self.marker,
            }
        )

    def remove(self) -> list[str]:
        return _file_restore(self.record, self.backup)


def write_in_place(path: Path, data: bytes) -> None:
    """Overwrite ``path``'s contents keeping its inode (a bind mount stays valid).
    Written before truncating, so the file is never empty in between."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.ftruncate(fd, len(data))
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.masqued.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    tmp.replace(path)


def _file_restore(record: _Record, backup: Path) -> list[str]:
    data = record.read()
    if data is None or data.get("kind") != "file":
        return []
    path = Path(str(data.get("path") or RESOLV_CONF))
    marker = str(data.get("marker") or "# masqued:")
    done: list[str] = []
    try:
        current = path.read_bytes() if path.exists() or path.is_symlink() else b""
    except OSError:
        current = b""
    if not current.startswith(marker.encode()):
        log.warning(
            "%s was changed since masqued wrote it: leaving it as it is (the original "
            "is dropped: %s)",
            path,
            backup,
        )
    else:
        link = data.get("symlink")
        if isinstance(link, str):
            tmp = path.with_name(f".{path.name}.masqued.tmp")
            tmp.unlink(missing_ok=True)
            os.symlink(link, tmp)
            tmp.replace(path)
            log.info("[#] ln -sf %s %s", link, path)
            done.append(f"ln -sf {link} {path}")
        elif data.get("existed") and backup.exists():
            write_in_place(path, backup.read_bytes())
            log.info("[#] restore %s from %s", path, backup)
            done.append(f"restore {path}")
        elif not data.get("existed"):
            path.unlink(missing_ok=True)
            log.info("[#] rm %s", path)
            done.append(f"rm {path}")
    backup.unlink(missing_ok=True)
    record.drop()
    return done


# --------------------------------------------------------------------------- choosing


def same_netns_as_init() -> bool:
    """True when this process shares PID 1's network namespace (where resolved runs);
    True as well when that cannot be told (/proc/1 hidden)."""
    try:
        return os.stat("/proc/self/ns/net").st_ino == os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return True


def resolved_manages(resolv_conf: Path = RESOLV_CONF) -> str | None:
    """None when systemd-resolved answers the host's lookups, else why not."""
    if shutil.which("resolvectl") is None:
        return "resolvectl is not installed"
    if (
        not (RESOLVED_RUN / "io.systemd.Resolve").exists()
        and not (RESOLVED_RUN / "resolv.conf").exists()
    ):
        return "systemd-resolved is not running"
    try:
        text = resolv_conf.read_text(errors="replace")
    except OSError as exc:
        return f"cannot read {resolv_conf}: {exc.strerror or exc}"
    target = os.path.realpath(resolv_conf)
    if not target.startswith(str(RESOLVED_RUN)) and RESOLVED_STUB not in text:
        return f"{resolv_conf} does not point to systemd-resolved (nor to {RESOLVED_STUB})"
    if not same_netns_as_init():
        return "this instance runs in another network namespace than systemd-resolved"
    return None


def choose(kind: str) -> tuple[str, str]:
    """The backend for ``dns_backend = kind`` and why it was chosen."""
    if kind != "auto":
        return kind, "configured"
    why_not = resolved_manages()
    if why_not is None:
        return "resolved", "systemd-resolved manages /etc/resolv.conf"
    if shutil.which("resolvconf") is not None:
        return "resolvconf", f"resolvconf is installed ({why_not})"
    return "file", f"neither systemd-resolved nor resolvconf ({why_not})"


def make_backend(kind: str, ids: InstanceIds, run_dir: Path) -> ResolverBackend:
    if kind == "resolved":
        return ResolvedBackend(ids, run_dir)
    if kind == "resolvconf":
        return ResolvconfBackend(ids, run_dir)
    if kind == "file":
        return FileBackend(ids, run_dir)
    raise ValueError(f"unknown DNS backend {kind!r}")


def cleanup_resolver(ids: InstanceIds, run_dir: Path | None = None) -> list[str]:
    """Undo what the record of ``ids`` says was set (before the TUN goes)."""
    if run_dir is None:
        from masqued.observe.control import run_dir as default_run_dir

        run_dir = default_run_dir()
    record = _Record(run_dir, ids.name)
    data = record.read()
    if data is None:
        return []
    kind = data.get("kind")
    try:
        if kind == "file":
            return _file_restore(record, run_dir / ids.name / BACKUP_FILE)
        if kind == "resolvconf":
            return _resolvconf_delete(str(data.get("iface") or ids.tun), run_command, record)
        if kind == "resolved":
            return _resolved_revert(str(data.get("ifname") or ids.tun), run_command, record)
    except OSError as exc:
        log.warning("DNS cleanup of %s failed: %s", ids.name, exc)
        return []
    record.drop()
    return []


# --------------------------------------------------------------------------- checking


def check(kind: str, ifname: str, servers: Sequence[IPAddress]) -> str | None:
    """None when the host uses ``servers`` as set by ``kind``, else what is wrong
    (for status and doctor)."""
    wanted = [str(s) for s in servers]
    if kind == "resolved":
        why_not = resolved_manages()
        if why_not is not None:
            return f"systemd-resolved does not answer this host's lookups: {why_not}"
        try:
            out = _run(run_command, ["resolvectl", "dns", ifname])
        except ResolverError as exc:
            return str(exc)
        missing = [s for s in wanted if s not in out]
        if missing:
            return f"resolvectl dns {ifname} lacks {', '.join(missing)} (got: {out.strip()})"
        return None
    try:
        text = RESOLV_CONF.read_text(errors="replace")
    except OSError as exc:
        return f"cannot read {RESOLV_CONF}: {exc.strerror or exc}"
    listed = [
        line.split()[1]
        for line in text.splitlines()
        if line.startswith("nameserver") and len(line.split()) > 1
    ]
    if not listed or listed[0] not in wanted:
        return (
            f"{RESOLV_CONF} lists nameserver {', '.join(listed) or 'none'} first, not the "
            f"tunnel's {', '.join(wanted)}"
            + (
                " (resolvconf did not write it: is it in charge of the file?)"
                if kind == "resolvconf"
                else ""
            )
        )
    return None


class FakeResolver:
    """A backend that keeps its configuration in memory, for tests of the layers above."""

    def __init__(self, kind: str = "fake") -> None:
        self.kind = kind
        self.config: ResolverConfig | None = None
        self.applied = 0

    def apply(self, config: ResolverConfig) -> None:
        self.config = config
        self.applied += 1

    def remove(self) -> list[str]:
        done = ["revert"] if self.config is not None else []
        self.config = None
        return done
