"""Fixtures for the end-to-end tests: the lab they run in (namespaces or Vagrant VMs).

The lab is the namespace lab (needs root) unless ``MASQUED_LAB=vagrant``, or
``MASQUED_LAB`` is unset and this Vagrantfile's VMs exist and answer ``vagrant
ssh-config`` (README "Testing in VMs"). ``MASQUED_LAB=namespace`` forces namespaces.
On the Vagrant lab only tests marked ``any_lab`` run, minus those marked
``namespace_only(reason=...)``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from masqued.gate import pki
from tests.integration import vagrant_lab
from tests.integration.lab import Lab, lab


def _root_ready() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    for tool in ("ip", "nft", "ping"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


@functools.cache
def _selected() -> tuple[str, vagrant_lab.VagrantHosts | None, str]:
    """(lab kind, the VMs' hosts if Vagrant, a note for the summary)."""
    wanted = os.environ.get(vagrant_lab.LAB_ENV, "").strip()
    if wanted not in ("", "namespace", "vagrant"):
        raise pytest.UsageError(f"{vagrant_lab.LAB_ENV}={wanted}: use namespace or vagrant")
    if wanted == "namespace":
        return "namespace", None, ""
    if wanted == "" and not vagrant_lab.machines_created():
        return "namespace", None, ""  # the common case: a stat() and nothing else
    if wanted == "" and shutil.which("vagrant") is None:
        return "namespace", None, "Vagrant VMs exist but no vagrant command: namespace lab"
    try:
        hosts = vagrant_lab.VagrantHosts.discover()
    except (vagrant_lab.VagrantError, OSError, subprocess.SubprocessError) as e:
        if wanted == "vagrant":
            raise pytest.UsageError(f"{vagrant_lab.LAB_ENV}=vagrant: {e}") from e
        return "namespace", None, f"Vagrant VMs not usable ({e}); used the namespace lab"
    return "vagrant", hosts, f"Vagrant lab: VMs {', '.join(hosts.names)}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    integration = [i for i in items if "integration" in str(i.fspath)]
    if not integration:
        return
    kind = _selected()[0]
    reason = _root_ready()
    for item in integration:
        if kind == "namespace":
            item.add_marker(pytest.mark.root)
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=reason))
            continue
        only = item.get_closest_marker("namespace_only")
        if only is not None:
            why = only.kwargs.get("reason") or (only.args[0] if only.args else "")
            item.add_marker(pytest.mark.skip(reason=f"namespace lab only: {why}"))
        elif item.get_closest_marker("any_lab") is None:
            item.add_marker(pytest.mark.skip(reason="namespace lab only (not marked any_lab)"))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _selected.cache_info().currsize and _selected()[2]:
        terminalreporter.write_line(f"integration lab: {_selected()[2]}")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _selected.cache_info().currsize:
        hosts = _selected()[1]
        if hosts is not None:
            hosts.close()


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("lab")
    d = base / "pki"
    pki.init_ca(d)
    pki.issue(d, "relay.example", "relay", sans=["198.18.1.1", "2001:db8:1::1"])
    pki.issue(d, "alice", "client")
    return d


@pytest.fixture
def lab1(pki_dir: Path, tmp_path: Path) -> Iterator[Lab]:
    with _lab(pki_dir, tmp_path, 1) as the_lab:
        yield the_lab


@pytest.fixture
def lab3(pki_dir: Path, tmp_path: Path) -> Iterator[Lab]:
    with _lab(pki_dir, tmp_path, 3) as the_lab:
        yield the_lab


@contextlib.contextmanager
def _lab(pki_dir: Path, tmp_path: Path, clients: int) -> Iterator[Lab]:
    kind, hosts, _ = _selected()
    if kind == "namespace" or hosts is None:
        with lab(tmp_path, pki_dir, clients) as ns_lab:
            yield ns_lab
        return
    if clients > hosts.client_count:
        pytest.skip(
            f"needs {clients} client VMs; the Vagrant lab has {hosts.client_count} "
            f"(MASQUED_VAGRANT_CLIENTS={clients} vagrant up)"
        )
    vm_lab = vagrant_lab.VagrantLab(hosts, tmp_path, clients)
    try:
        vm_lab.up()
        yield vm_lab
    finally:
        vm_lab.down()
