"""The .deb does not depend on where it is built, and lintian passes on it.

Two builds of this tree run at once: one from a short directory, one from a deep one
whose build-tree Python (debian/masqued/opt/venvs/masqued/bin/python) has a path over
127 characters, the kernel's shebang limit, past which pip writes /bin/sh trampolines
into the console scripts. Both must give the same files (contents, modes, links) and
pass ``lintian --fail-on error,warning``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VERSION = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M).group(1)  # type: ignore[union-attr]
# The part of the build-tree interpreter's path below the source copy.
VENV_PYTHON = f"build/deb.XXXXXX/masqued-{VERSION}/debian/masqued/opt/venvs/masqued/bin/python"
SKIP = {".git", ".venv", "build", "dist", ".pytest_cache", ".mypy_cache", ".ruff_cache"}


def _copy_tree(dest: Path) -> None:
    """The working tree as build-deb.sh packs it (no .git: the date comes from
    SOURCE_DATE_EPOCH, the same for both builds)."""
    shutil.copytree(
        REPO,
        dest,
        ignore=lambda d, names: [
            n for n in names if (n in SKIP and Path(d) == REPO) or n == "__pycache__"
        ],
        symlinks=True,
    )


def _build(tree: Path, epoch: str) -> tuple[Path, str]:
    env = dict(os.environ, SOURCE_DATE_EPOCH=epoch)
    res = subprocess.run(
        ["bash", str(tree / "packaging/build-deb.sh")],
        capture_output=True,
        text=True,
        timeout=1500,
        env=env,
    )
    assert res.returncode == 0, f"build in {tree} failed:\n{res.stderr[-4000:]}"
    return Path(res.stdout.strip().splitlines()[-1]), res.stderr


def _manifest(deb: Path, work: Path) -> dict[str, tuple[str, ...]]:
    """path -> (type, mode, sha256 or link target) of every file in the package."""
    data = work / "data.tar"
    with open(data, "wb") as f:
        subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=f, check=True)
    out: dict[str, tuple[str, ...]] = {}
    with tarfile.open(data) as tar:
        for m in tar.getmembers():
            mode = oct(stat.S_IMODE(m.mode))
            if m.issym():
                out[m.name] = ("link", m.linkname)
            elif m.isdir():
                out[m.name] = ("dir", mode)
            else:
                fobj = tar.extractfile(m)
                assert fobj is not None
                out[m.name] = ("file", mode, hashlib.sha256(fobj.read()).hexdigest())
    data.unlink()
    return out


def _lintian(deb: Path) -> str:
    res = subprocess.run(
        ["lintian", "--fail-on", "error,warning", str(deb)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = "\n".join(
        line for line in (res.stdout + res.stderr).splitlines() if not line.startswith("running")
    )
    assert res.returncode == 0, f"lintian on {deb}:\n{report}"
    return report


def test_build_path_does_not_change_the_package(tmp_path: Path) -> None:
    if shutil.which("lintian") is None:
        pytest.skip("needs lintian (make deps)")
    short = tmp_path / "s" / "masqued"
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "masqued"
    assert len(f"{deep}/{VENV_PYTHON}") > 127
    for tree in (short, deep):
        _copy_tree(tree)
    epoch = subprocess.run(
        ["git", "-C", str(REPO), "log", "-1", "--format=%ct"], capture_output=True, text=True
    ).stdout.strip() or "1700000000"
    with ThreadPoolExecutor(2) as pool:
        (short_deb, _), (deep_deb, deep_log) = pool.map(lambda t: _build(t, epoch), (short, deep))
    # The deep build really had the long interpreter path (so pip wrote trampolines).
    assert re.search(rf"{re.escape(str(deep))}/build/deb\.\w+/masqued-", deep_log)

    for deb in (short_deb, deep_deb):
        assert (deb.parent / "masqued.deb").read_bytes() == deb.read_bytes()
        _lintian(deb)
    a, b = _manifest(short_deb, tmp_path), _manifest(deep_deb, tmp_path)
    differ = sorted(p for p in set(a) | set(b) if a.get(p) != b.get(p))
    assert differ == [], f"the builds differ in {differ[:20]}"

    extracted = tmp_path / "x"
    subprocess.run(["dpkg-deb", "-x", str(deep_deb), str(extracted)], check=True)
    script = (extracted / "opt/venvs/masqued/bin/masqued").read_text()
    assert script.startswith("#!/opt/venvs/masqued/bin/python\n"), script[:200]
    assert str(tmp_path) not in (extracted / "opt/venvs/masqued/pyvenv.cfg").read_text()
    control = subprocess.run(
        ["dpkg-deb", "-f", str(deep_deb), "Depends"], capture_output=True, text=True, check=True
    ).stdout
    assert re.match(r"python3\.11 \(>= 3\.11\.\d+\), libxtables12, libip4tc2, libip6tc2", control)
    changelog = subprocess.run(
        ["zcat", str(extracted / "usr/share/doc/masqued/changelog.gz")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert changelog.startswith(f"masqued ({VERSION}) bookworm; urgency=medium")
