#!/usr/bin/python3
"""Remove the build directory from a dh-virtualenv venv, so the build path changes nothing.

    normalize-venv.py BUILT_VENV INSTALLED_PATH

pip writes into the venv it installs into at its build location
(debian/masqued/opt/venvs/masqued under wherever the source tree is):

- console scripts start with ``#!BUILD/bin/python``, or, when that path is longer
  than the kernel's 127-byte shebang limit, with a ``/bin/sh`` trampoline
  (``'''exec' "BUILD/bin/python" "$0" "$@"``) that dh_virtualenv's rewrite breaks;
  both become ``#!INSTALLED_PATH/bin/python``;
- ``pyvenv.cfg`` records the ``python -m venv BUILD`` command line;
- ``direct_url.json`` of a package installed from a directory names that directory.

Each dist-info ``RECORD`` is brought up to date for the scripts (dh_virtualenv
rewrote them after pip recorded their build-path hashes) and the files removed.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import re
import sys
from pathlib import Path

TRAMPOLINE = re.compile(rb"\A#!/bin/sh\n'''exec' .*\n' '''\n")
SHEBANG = re.compile(rb"\A#![^\n]*/bin/python[0-9.]*\"?\n")


def fix_script(path: Path, python: bytes) -> bool:
    """Give a Python script the installed interpreter; True if it is one."""
    data = path.read_bytes()
    for pattern in (TRAMPOLINE, SHEBANG):
        m = pattern.match(data)
        if m:
            new = b"#!" + python + b"\n" + data[m.end() :]
            if new != data:
                path.write_bytes(new)
            return True
    return False


def record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return f"sha256={digest.decode()}"


def update_records(site: Path, changed: set[Path], removed: set[Path]) -> None:
    for record in site.glob("*.dist-info/RECORD"):
        rows = list(csv.reader(io.StringIO(record.read_text())))
        out = []
        touched = False
        for row in rows:
            if not row:
                continue
            target = (site / row[0]).resolve()
            if target in removed:
                touched = True
                continue
            if target in changed and len(row) >= 3:
                data = target.read_bytes()
                row = [row[0], record_hash(data), str(len(data))]
                touched = True
            out.append(row)
        if touched:
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows(out)
            record.write_text(buf.getvalue())


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    venv, installed = Path(argv[1]).resolve(), argv[2].rstrip("/")
    python = f"{installed}/bin/python".encode()
    scripts: set[Path] = set()
    removed: set[Path] = set()
    for script in sorted((venv / "bin").iterdir()):
        if script.is_file() and not script.is_symlink() and fix_script(script, python):
            scripts.add(script.resolve())
    cfg = venv / "pyvenv.cfg"
    text = cfg.read_text()
    cfg.write_text(re.sub(r"(?m)^(command = .* -m venv) .*$", rf"\1 {installed}", text))
    sites = sorted(p for p in (venv / "lib").glob("python3*/site-packages") if p.is_dir())
    for site in sites:
        for direct in site.glob("*.dist-info/direct_url.json"):
            if '"dir_info"' in direct.read_text():  # installed from a local directory
                removed.add(direct.resolve())
                direct.unlink()
        update_records(site, scripts, removed)
    leftover = [
        str(p)
        for p in venv.rglob("*")
        if p.is_file() and not p.is_symlink() and str(venv).encode() in p.read_bytes()
    ]
    if leftover:
        print("normalize-venv: the build path is still in:", *leftover, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
