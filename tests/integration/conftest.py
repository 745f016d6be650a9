"""Fixtures for tests that need root: namespaces, TUN, netfilter."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from masqued import pki
from tests.integration.lab import NamespaceLab, lab


def _root_ready() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    for tool in ("ip", "nft", "ping"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _root_ready()
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.root)
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("lab")
    d = base / "pki"
    pki.init_ca(d)
    pki.issue(d, "relay.example", "relay", sans=["198.18.1.1", "2001:db8:1::1"])
    pki.issue(d, "alice", "client")
    return d


@pytest.fixture
def lab1(pki_dir: Path, tmp_path: Path) -> Iterator[NamespaceLab]:
    with _lab(pki_dir, tmp_path, 1) as the_lab:
        yield the_lab


@pytest.fixture
def lab3(pki_dir: Path, tmp_path: Path) -> Iterator[NamespaceLab]:
    with _lab(pki_dir, tmp_path, 3) as the_lab:
        yield the_lab


def _lab(pki_dir: Path, tmp_path: Path, clients: int):  # type: ignore[no-untyped-def]
    return lab(tmp_path, pki_dir, clients)
