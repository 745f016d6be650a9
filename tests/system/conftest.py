"""System tests: the .deb in booted Debian bookworm containers (docs/architecture.md §5).

They need root, systemd-nspawn, mmdebstrap and the packaging tools (``make deps``
installs them) and skip with the reason otherwise.
"""

from __future__ import annotations

import os
import shutil

import pytest

TOOLS = ("systemd-nspawn", "mmdebstrap", "nsenter", "dpkg-buildpackage", "dh_virtualenv", "ip")


def _ready() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"needs {tool} (make deps)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _ready()
    for item in items:
        if "tests/system" in str(item.fspath):
            item.add_marker(pytest.mark.root)
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=reason))
