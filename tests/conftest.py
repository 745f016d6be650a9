"""Fixtures shared by the unit and conformance tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

from masqued.gate import pki
from masqued.transport import engines

# The QUIC engine of every relay and client these suites build without naming one
# (MASQUED_QUIC_ENGINE=qh3 runs them on qh3; the namespace lab's configs follow it
# too, tests/integration/lab.py). Tests that name an engine keep theirs.
QUIC_ENGINE = os.environ.get("MASQUED_QUIC_ENGINE") or engines.DEFAULT
if QUIC_ENGINE not in engines.NAMES:
    raise ValueError(f"MASQUED_QUIC_ENGINE={QUIC_ENGINE!r}: not one of {engines.NAMES}")
engines.DEFAULT = QUIC_ENGINE

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
