"""Booted Debian containers for the system tests (docs/architecture.md §5).

A bookworm root filesystem is made once with mmdebstrap and cached outside the
repository (``$MASQUED_SYSTEST_CACHE``, default /var/cache/masqued-systest). Each
container boots it with ``systemd-nspawn --volatile=overlay`` (every boot starts
clean; writes go to a tmpfs) inside one of the lab's ``mq-*`` network namespaces,
and commands run inside it through ``nsenter -t <container init> -a``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SUITE = "bookworm"
MIRROR = os.environ.get("MASQUED_SYSTEST_MIRROR", "http://deb.debian.org/debian")
# Everything the .deb depends on is preinstalled: the containers have no route to
# a mirror, so `apt install ./masqued_*.deb` must resolve from what is there.
ROOTFS_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "iproute2",
    "nftables",
    "iptables",
    "python3.11",
    "libsystemd0",
    "iputils-ping",
    "procps",
    # The client's dns = [...] through resolved (issue 20); its postinst points
    # /etc/resolv.conf at the stub, as on a desktop or cloud image.
    "systemd-resolved",
)


def cache_dir() -> Path:
    return Path(os.environ.get("MASQUED_SYSTEST_CACHE") or "/var/cache/masqued-systest")


def rootfs_path() -> Path:
    key = hashlib.sha256(f"{SUITE} {MIRROR} {' '.join(ROOTFS_PACKAGES)}".encode()).hexdigest()
    return cache_dir() / f"rootfs-{SUITE}-{key[:12]}"


def ensure_rootfs() -> tuple[Path, float]:
    """The cached root filesystem, made now if missing; returns (path, seconds spent)."""
    target = rootfs_path()
    start = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel runs wait for one build
        if (target / "usr/lib/systemd/systemd").exists():
            return target, 0.0
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            subprocess.run(
                [
                    "mmdebstrap",
                    "--quiet",
                    "--variant=apt",
                    "--include=" + ",".join(ROOTFS_PACKAGES),
                    SUITE,
                    str(tmp),
                    MIRROR,
                ],
                check=True,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=1200,
            )
            # resolved (for the client's DNS test) asks no one but the links' servers:
            # no compiled-in fallback resolvers, no LLMNR or mDNS on the lab's links.
            dropin = tmp / "etc/systemd/resolved.conf.d"
            dropin.mkdir(parents=True, exist_ok=True)
            (dropin / "masqued-systest.conf").write_text(
                "[Resolve]\nFallbackDNS=\nLLMNR=no\nMulticastDNS=no\n"
            )
            # Quieter, faster boots: nothing of these is needed in a test container.
            for unit in ("apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer"):
                (tmp / "etc/systemd/system" / unit).unlink(missing_ok=True)
                os.symlink("/dev/null", tmp / "etc/systemd/system" / unit)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target, time.monotonic() - start


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(p) for p in f.read().split()]
    return out


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


@dataclass
class Container:
    """One booted container in network namespace ``netns``."""

    name: str
    netns: str
    rootfs: Path
    log: Path
    binds: dict[Path, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    leader: int = 0

    def boot(self, timeout: float = 90) -> float:
        """Start the container and wait until systemd reports the boot finished."""
        start = time.monotonic()
        cmd = [
            "systemd-nspawn",
            "--quiet",
            "--register=no",
            "--keep-unit",
            "--volatile=overlay",
            f"--network-namespace-path=/run/netns/{self.netns}",
            # The container is the host of its namespace: it may change its network.
            "--capability=CAP_NET_ADMIN",
            f"--machine={self.name}",
            f"--hostname={self.name}",
            "-D",
            str(self.rootfs),
        ]
        cmd += [f"--bind-ro={src}:{dst}" for src, dst in self.binds.items()]
        cmd.append("-b")
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=open(self.log, "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        deadline = start + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name}: nspawn exited:\n{self.log.read_text()}")
            kids = [k for k in _children(self.proc.pid) if _comm(k) == "systemd"]
            if kids:
                self.leader = kids[0]
                res = self.run("systemctl", "is-system-running", check=False, timeout=10)
                if res.stdout.strip() in ("running", "degraded"):
                    return time.monotonic() - start
            time.sleep(0.2)
        raise AssertionError(f"{self.name}: not booted within {timeout}s:\n{self.log.read_text()}")

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        assert self.leader, "container not booted"
        res = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
        )
        if check and res.returncode != 0:
            raise AssertionError(
                f"{self.name}: {' '.join(cmd)} -> exit {res.returncode}\n{res.stdout}{res.stderr}"
            )
        return res

    def sh(self, script: str, check: bool = True, timeout: float = 120) -> str:
        return self.run("/bin/sh", "-ec", script, check=check, timeout=timeout).stdout

    def write(self, path: str, text: str, mode: str = "0600") -> None:
        self.run("/bin/sh", "-ec", f"cat > {path}; chmod {mode} {path}", input=text)

    def read(self, path: str) -> str:
        return self.run("cat", path).stdout

    def prop(self, unit: str, name: str) -> str:
        return self.run("systemctl", "show", "-P", name, unit).stdout.strip()

    def wait_for(self, what: str, check: object, timeout: float = 30) -> None:
        """Poll ``check()`` until it is truthy; fail with ``what`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():  # type: ignore[operator]
                return
            time.sleep(0.25)
        raise AssertionError(f"{self.name}: timed out after {timeout}s waiting for {what}")

    def leftovers(self) -> list[str]:
        """Every TUN, route, rule, nft table or iptables chain of ours (empty when clean)."""
        found: list[str] = []
        for line in self.run("ip", "-o", "link", "show").stdout.splitlines():
            name = line.split(":")[1].strip().split("@")[0]
            lab_link = name in ("mq-br", "mq-r-t", "mq-t-r", "mq-c-r") or name.startswith("mq-r-c")
            if name.startswith("mq-") and not lab_link:
                found.append(f"link {name}")
        for fam in ("-4", "-6"):
            for line in self.run("ip", fam, "rule", "show").stdout.splitlines():
                if line.startswith(("5209:", "5210:")):
                    found.append(f"rule {line.strip()}")
            for line in self.run("ip", fam, "route", "show", "table", "all").stdout.splitlines():
                if "proto 109" in line:
                    found.append(f"route {line.strip()}")
        tables = self.run("nft", "list", "tables").stdout
        found += [f"nft {t}" for t in tables.splitlines() if "masqued" in t]
        for tool in ("iptables-legacy", "ip6tables-legacy", "iptables-nft", "ip6tables-nft"):
            out = self.run(tool, "-t", "nat", "-S", check=False).stdout
            found += [f"{tool} {line}" for line in out.splitlines() if "MASQUED" in line]
        return found

    def shutdown(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # nspawn: orderly container shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        self.leader = 0
