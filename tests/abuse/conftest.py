"""The abuse suite runs real daemons in the namespace lab: root, TUN and nft needed."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.integration.conftest import pki_dir  # noqa: F401 - the lab's CA, shared


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = None
    if os.geteuid() != 0:
        reason = "needs root"
    elif not os.path.exists("/dev/net/tun") or shutil.which("nft") is None:
        reason = "needs /dev/net/tun and nft"
    for item in items:
        if "abuse" in str(item.fspath) and "test_abuse" in item.nodeid:
            item.add_marker(pytest.mark.root)
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=reason))
