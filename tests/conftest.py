"""Fixtures shared by the unit and conformance tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import settings

from masqued.gate import pki

# No per-example deadline: a timed assertion does not belong in a unit test, and a
# busy machine made Hypothesis report slow examples as failures.
settings.register_profile("masqued", deadline=None)
settings.load_profile("masqued")


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and a relay certificate for relay.example (ca.pem, relay.example.pem/key)."""
    d = tmp_path_factory.mktemp("pki")
    pki.init_ca(d)
    pki.issue(d, "relay.example", "relay")
    return d
