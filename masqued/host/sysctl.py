"""The sysctls an instance switched on, recorded so that cleanup puts them back.

Start turns forwarding on where it is off (``routes.enable_forwarding``). Each change
is recorded with the previous value in ``RUN_DIR/NAME/sysctl.json`` (the unit's
``RuntimeDirectory``; /run, because sysctls do not outlive a boot either) before it
is made, so that a crash leaves the record behind for the next cleanup.

Instances share sysctls (two relays with one egress interface): a value is only put
back when no other running instance needs it. Every record therefore lists all the
sysctls its instance needs, and for each the value from before any instance changed
it (copied from the running instance that made the change). Whichever instance stops
last puts it back.

Writing ``net.ipv6.conf.all.forwarding`` sets every interface's (and ``default``'s)
IPv6 forwarding too, so the record keeps those values and restores them after it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("masqued.host")

PROC_SYS = Path("/proc/sys")
RECORD_FILE = "sysctl.json"
IPV6_ALL = "net.ipv6.conf.all.forwarding"


def key_path(key: str, root: Path = PROC_SYS) -> Path:
    """``net.ipv4.conf.eth0.forwarding`` -> /proc/sys/net/ipv4/conf/eth0/forwarding.

    Interface names may hold dots, so only the known shape is split: family, "conf",
    the interface, the setting.
    """
    parts = key.split(".")
    if len(parts) >= 5 and parts[2] == "conf":
        return root.joinpath(*parts[:3], ".".join(parts[3:-1]), parts[-1])
    return root.joinpath(*parts)


def path_key(path: Path, root: Path = PROC_SYS) -> str:
    return ".".join(path.relative_to(root).parts)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


@dataclass
class Entry:
    """One sysctl an instance needs: its value before masqued, if masqued changed it."""

    key: str
    previous: str | None = None  # None: it already had the value; nothing to restore
    # Set along with the key by the kernel (IPv6 "all"): their values before.
    also: dict[str, str] = field(default_factory=dict)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SysctlRecord:
    """``RUN_DIR/NAME/sysctl.json`` of one instance (``run_dir`` as in masqued.observe.control)."""

    def __init__(self, name: str, run_dir: Path | None = None, root: Path = PROC_SYS) -> None:
        if run_dir is None:
            from masqued.observe.control import run_dir as default_run_dir

            run_dir = default_run_dir()
        self.name = name
        self.run_dir = run_dir
        self.root = root
        self.path = run_dir / name / RECORD_FILE
        # This process's own record (a reload that switches on more) is extended.
        loaded = self._load(self.path)
        self.entries: dict[str, Entry] = (
            loaded[1] if loaded is not None and loaded[0] == os.getpid() else {}
        )

    # -- reading records ------------------------------------------------------------

    @staticmethod
    def _load(path: Path) -> tuple[int, dict[str, Entry]] | None:
        try:
            data = json.loads(path.read_text())
            entries = {
                e["key"]: Entry(e["key"], e.get("previous"), dict(e.get("also", {})))
                for e in data["sysctls"]
            }
            return int(data["pid"]), entries
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _others(self) -> Iterator[dict[str, Entry]]:
        """Records of the other instances that are running."""
        try:
            dirs = sorted(p for p in self.run_dir.iterdir() if p.is_dir() and p.name != self.name)
        except OSError:
            return
        for d in dirs:
            loaded = self._load(d / RECORD_FILE)
            if loaded is not None and _pid_alive(loaded[0]):
                yield loaded[1]

    # -- start -----------------------------------------------------------------------

    def set(self, key: str, value: str) -> bool:
        """Give sysctl ``key`` ``value``, recording what to restore; True if it changed.

        The record is written before the sysctl, so a crash in between leaves at most
        a value to restore that is already the current one.
        """
        path = key_path(key, self.root)
        current = path.read_text().strip()
        entry = self.entries.get(key) or Entry(key)
        if current == value:
            if entry.previous is None:
                # Already on; if another running instance switched it on, take over
                # its record of the original value, to restore it if we stop last.
                for other in self._others():
                    if key in other and other[key].previous is not None:
                        entry.previous, entry.also = other[key].previous, other[key].also
                        break
            self.entries[key] = entry
            self._save()
            return False
        if entry.previous is None:
            entry.previous = current
            if key == IPV6_ALL:
                entry.also = self._ipv6_interfaces()
        self.entries[key] = entry
        self._save()
        path.write_text(value + "\n")
        return True

    def _ipv6_interfaces(self) -> dict[str, str]:
        out: dict[str, str] = {}
        conf = self.root / "net/ipv6/conf"
        with contextlib.suppress(OSError):
            for d in sorted(conf.iterdir()):
                if d.name == "all":
                    continue
                value = _read(d / "forwarding")
                if value is not None:
                    out[path_key(d / "forwarding", self.root)] = value
        return out

    def _save(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        data: dict[str, Any] = {
            "pid": os.getpid(),
            "sysctls": [
                {"key": e.key, "previous": e.previous, "also": e.also}
                for e in self.entries.values()
            ],
        }
        tmp = self.path.with_name(f".{RECORD_FILE}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        tmp.replace(self.path)

    # -- cleanup ---------------------------------------------------------------------

    def restore(self) -> list[str]:
        """Put back what the record says this instance changed, unless a running
        instance still needs it; remove the record. Returns the changes made."""
        loaded = self._load(self.path)
        if loaded is None:
            self.path.unlink(missing_ok=True)
            return []
        needed: set[str] = set()
        for other in self._others():
            needed |= set(other)
        done: list[str] = []
        for entry in loaded[1].values():
            if entry.previous is None:
                continue
            if entry.key in needed:
                log.info("[#] %s stays on: another masqued instance needs it", entry.key)
                continue
            # IPv6 "all" first: writing it resets every interface, then theirs go back.
            for key, value in [(entry.key, entry.previous), *sorted(entry.also.items())]:
                path = key_path(key, self.root)
                current = _read(path)
                if current is None or current == value:
                    continue  # the interface is gone (our TUN), or nothing to do
                cmd = f"sysctl -q {key}={value}"
                try:
                    path.write_text(value + "\n")
                except OSError as exc:
                    log.warning("%s: %s", cmd, exc)
                    continue
                log.info("[#] %s", cmd)
                done.append(cmd)
        self.path.unlink(missing_ok=True)
        if os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] != str(self.path.parent):
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()  # made by set() outside systemd; kept if not empty
        return done
