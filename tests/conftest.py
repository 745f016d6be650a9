"""Fixtures shared by the unit and conformance tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from masqued import pki


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and a relay certificate for relay.example (ca.pem, relay.example.pem/key)."""
    d = tmp_path_factory.mktemp("pki")
    pki.init_ca(d)
    pki.issue(d, "relay.example", "relay")
    return d
