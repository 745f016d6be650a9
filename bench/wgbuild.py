"""The current wireguard-go, built once per source archive by bench-peers' ``build.sh`` into
a cache outside the repository (``/var/cache/masqued-bench/wireguard-go-<sha256[:16]>/``).

``build.sh`` (in ``../shared/bench-peers/wireguard-go-current/``, not part of this project)
compiles the archive offline with Go 1.23 from bookworm-backports. A cache hit costs one
``--version`` call; a miss builds into a scratch directory beside the cache entry and
renames it into place only when the binary runs and reports the archive's version, so an
interrupted build never leaves an entry that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CACHE_ENV = "MASQUED_BENCH_CACHE"
DEFAULT_CACHE = Path("/var/cache/masqued-bench")
SOURCE_DIR = "wireguard-go-current"
BINARY = "wireguard-go"
GO = Path("/usr/lib/go-1.23/bin/go")
BACKPORTS = "bookworm-backports"
BACKPORTS_FILE = Path("/etc/apt/sources.list.d/bookworm-backports.sources")
BUILD_TIMEOUT_S = 900.0  # apt-get install of Go plus build.sh's own 600 s cap on `go build`
_ARCHIVE = re.compile(r"^wireguard-go-(\d+\.\d+\.\d+)\.tar\.gz$")


@dataclass(frozen=True)
class Build:
    """What ``ensure_built`` found or made (``status``: cached, built or failed)."""

    status: str
    binary: str | None = None
    version: str | None = None
    archive: str | None = None
    archive_sha256: str | None = None
    seconds: float = 0.0
    go_installed: bool = False
    note: str | None = None
    log: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("cached", "built")

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def cache_root() -> Path:
    """``$MASQUED_BENCH_CACHE``, else /var/cache/masqued-bench."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else DEFAULT_CACHE


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            h.update(chunk)
    return h.hexdigest()


def find_archive(source: Path) -> tuple[Path, str] | None:
    """The one source archive beside build.sh and its version (0.0.20250522), or None."""
    found = sorted(p for p in source.glob("wireguard-go-*.tar.gz") if _ARCHIVE.match(p.name))
    if len(found) != 1:
        return None
    m = _ARCHIVE.match(found[0].name)
    assert m is not None
    return found[0], m.group(1)


def binary_version(binary: Path) -> str | None:
    """The first line of ``binary --version``, or None when it does not run."""
    try:
        res = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (res.stdout or res.stderr).strip().splitlines()
    return lines[0] if res.returncode == 0 and lines else None


def debian_mirror(indextargets: str, suite: str = "bookworm") -> str | None:
    """The archive URI that apt's active sources use for ``suite``.

    ``indextargets``: output of ``apt-get indextargets --format '$(REPO_URI) $(RELEASE)'``.
    """
    for line in indextargets.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1] == suite:
            return parts[0]
    return None


def _apt_targets() -> str:
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        return subprocess.run(
            ["apt-get", "indextargets", "--format", "$(REPO_URI) $(RELEASE)"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
    return ""


def ensure_backports_source(log: Callable[[str], None]) -> str | None:
    """Make bookworm-backports an apt source when Go 1.23 still has to be installed.

    build.sh adds one itself, but with the first URI that any file under
    /etc/apt/sources.list.d names, disabled files included: on this machine that is a
    disabled third-party repository, and the install fails. So the harness writes the
    same file first, with the mirror apt really uses for bookworm. Returns an error
    text, or None when the source is there (or not needed).
    """
    if GO.exists():
        return None
    targets = _apt_targets()
    if debian_mirror(targets, BACKPORTS) is not None:
        return None
    uri = debian_mirror(targets)
    if uri is None:
        return "no active apt source for bookworm to take bookworm-backports from"
    log(f"[#] write {BACKPORTS_FILE} ({BACKPORTS} from {uri}) for Go 1.23")
    BACKPORTS_FILE.write_text(
        f"Types: deb\nURIs: {uri}\nSuites: {BACKPORTS}\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )
    return None


def ensure_built(
    peers: Path,
    log: Callable[[str], None],
    root: Path | None = None,
    timeout: float = BUILD_TIMEOUT_S,
) -> Build:
    """The cached binary for the archive in ``peers/wireguard-go-current``, built if absent."""
    started = time.monotonic()
    source = peers / SOURCE_DIR
    script = source / "build.sh"
    found = find_archive(source)
    if not script.is_file() or found is None:
        return Build("failed", note=f"{script} or its one source archive not found")
    archive, want = found
    sha = file_sha256(archive)
    root = root or cache_root()
    entry = root / f"{BINARY}-{sha[:16]}"
    binary = entry / BINARY

    def done(status: str, **kw: Any) -> Build:
        return Build(
            status, archive=archive.name, archive_sha256=sha, seconds=_since(started), **kw
        )

    if (version := binary_version(binary)) is not None and want in version:
        return done("cached", binary=str(binary), version=version)
    why = ensure_backports_source(log)
    if why is not None:
        return done("failed", note=why)
    had_go = GO.exists()
    root.mkdir(parents=True, exist_ok=True)
    scratch = root / f".{entry.name}.{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    build_log = root / f"{entry.name}.log"
    log(f"   building {archive.name} with {script} (cache {entry}) ...")
    try:
        returncode = _run_script(script, scratch, build_log, timeout)
        version = binary_version(scratch / BINARY)
        if returncode != 0 or version is None or want not in version:
            tail = build_log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
            return done(
                "failed",
                version=version,
                go_installed=GO.exists() and not had_go,
                note=f"build.sh exit {returncode}"
                + (f", made {version!r}" if version else "")
                + f": {tail[0][:200]}",
                log=str(build_log),
            )
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(scratch, entry)
    except subprocess.TimeoutExpired:
        return done("failed", note=f"build.sh timed out after {timeout:.0f}s", log=str(build_log))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return done(
        "built", binary=str(binary), version=version, go_installed=not had_go, log=str(build_log)
    )


def _run_script(script: Path, out_dir: Path, log_path: Path, timeout: float) -> int:
    """``bash build.sh OUT_DIR`` in its own process group (killed whole on timeout)."""
    with open(log_path, "w") as out:
        proc = subprocess.Popen(
            ["bash", str(script), str(out_dir)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            return proc.wait(timeout=timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise


def _since(t0: float) -> float:
    return round(time.monotonic() - t0, 1)
