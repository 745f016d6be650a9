"""The current wireguard-go's build cache (bench/wgbuild.py), with a stand-in build.sh."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bench import wgbuild

VERSION = "0.0.20250522"


def _peers(tmp_path: Path, body: str) -> Path:
    """A bench-peers directory whose build.sh runs ``body`` (OUT is its output dir)."""
    src = tmp_path / "peers" / wgbuild.SOURCE_DIR
    src.mkdir(parents=True)
    (src / f"wireguard-go-{VERSION}.tar.gz").write_bytes(b"source v1")
    (src / "build.sh").write_text(
        f'set -eu\nout=$1; mkdir -p "$out"\necho run >> {tmp_path}/runs\n{body}\n'
    )
    return tmp_path / "peers"


def _binary(version: str) -> str:
    return (
        f"printf '#!/bin/sh\\necho wireguard-go v{version}\\n' > \"$out/wireguard-go\"\n"
        'chmod +x "$out/wireguard-go"'
    )


@pytest.fixture(autouse=True)
def _go_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Go "installed": the build never touches the host's apt sources in a unit test.
    go = tmp_path / "go"
    go.write_text("")
    monkeypatch.setattr(wgbuild, "GO", go)


def _runs(tmp_path: Path) -> int:
    f = tmp_path / "runs"
    return len(f.read_text().splitlines()) if f.exists() else 0


def test_built_once_then_reused_and_rebuilt_for_a_new_archive(tmp_path: Path) -> None:
    peers = _peers(tmp_path, _binary(VERSION))
    cache = tmp_path / "cache"
    first = wgbuild.ensure_built(peers, print, root=cache)
    assert first.status == "built" and first.ok
    assert first.version == f"wireguard-go v{VERSION}"
    archive = peers / wgbuild.SOURCE_DIR / f"wireguard-go-{VERSION}.tar.gz"
    sha = wgbuild.file_sha256(archive)
    assert first.archive_sha256 == sha
    assert first.binary == str(cache / f"wireguard-go-{sha[:16]}" / "wireguard-go")
    again = wgbuild.ensure_built(peers, print, root=cache)
    assert again.status == "cached" and again.binary == first.binary
    assert _runs(tmp_path) == 1
    # Another archive is another cache entry; the first stays.
    archive.write_bytes(b"source v2")
    third = wgbuild.ensure_built(peers, print, root=cache)
    assert third.status == "built" and third.binary != first.binary
    assert _runs(tmp_path) == 2
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == sorted(
        [Path(first.binary).parent.name, Path(str(third.binary)).parent.name]
    )


def test_a_failed_build_leaves_no_entry_and_says_why(tmp_path: Path) -> None:
    peers = _peers(tmp_path, "echo 'go: module lookup disabled' >&2; exit 3")
    cache = tmp_path / "cache"
    b = wgbuild.ensure_built(peers, print, root=cache)
    assert b.status == "failed" and not b.ok and b.binary is None
    assert b.note is not None and "exit 3" in b.note and "module lookup disabled" in b.note
    assert [p.name for p in cache.iterdir() if p.is_dir()] == []  # no entry, no scratch dir
    assert b.log is not None and "module lookup disabled" in Path(b.log).read_text()
    assert wgbuild.ensure_built(peers, print, root=cache).status == "failed"
    assert _runs(tmp_path) == 2  # a failure is not cached: the next run tries again


def test_a_binary_of_another_version_is_not_cached(tmp_path: Path) -> None:
    peers = _peers(tmp_path, _binary("0.0.20220316"))
    b = wgbuild.ensure_built(peers, print, root=tmp_path / "cache")
    assert b.status == "failed" and b.version == "wireguard-go v0.0.20220316"
    assert not list((tmp_path / "cache").glob("wireguard-go-*/wireguard-go"))


def test_a_hung_build_is_stopped(tmp_path: Path) -> None:
    peers = _peers(tmp_path, f"sleep 30 & echo $! > {tmp_path}/child; wait")
    b = wgbuild.ensure_built(peers, print, root=tmp_path / "cache", timeout=1)
    assert b.status == "failed" and b.note == "build.sh timed out after 1s"
    child = int((tmp_path / "child").read_text())
    # The whole process group got SIGKILL; the kernel may take a moment to end it.
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_missing_sources_are_a_failure_not_an_exception(tmp_path: Path) -> None:
    b = wgbuild.ensure_built(tmp_path, print, root=tmp_path / "cache")
    assert b.status == "failed" and "not found" in str(b.note)


def test_debian_mirror_is_the_active_source_for_the_suite() -> None:
    targets = (
        "http://deb.debian.org/debian-security/ bookworm-security\n"
        "http://deb.debian.org/debian/ bookworm\n"
        "http://deb.debian.org/debian/ bookworm\n"
        "http://deb.debian.org/debian/ bookworm-updates\n"
    )
    assert wgbuild.debian_mirror(targets) == "http://deb.debian.org/debian/"
    assert wgbuild.debian_mirror(targets, "bookworm-backports") is None
    assert wgbuild.debian_mirror("") is None
