"""Issue 14, the client's side: it requires the serverAuth usage on the relay's
certificate, and bounds the work one capsule from the relay can make it do."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from masqued.gate import pki
from tests.inproc import Client, Relay, until


@pytest.fixture(scope="module")
def client_auth_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA whose "relay.example" certificate is for client authentication only."""
    d = tmp_path_factory.mktemp("clientauth")
    pki.init_ca(d)
    pki.issue(d, "relay.example", "client")
    return d


async def test_a_relay_certificate_without_server_auth_is_refused(client_auth_only: Path) -> None:
    relay = Relay(client_auth_only, ("198.18.200.0/24",))
    try:
        client = Client(client_auth_only, relay.port)
        status = client.tunnel.status
        await until(lambda: "serverAuth" in (status.last_error or ""), timeout=10)
        assert not client.up.done()
        # It never asked for a tunnel (a token would have gone to this relay with it).
        assert relay.server.results.get("accepted", 0) == 0
        assert not relay.server.results
        await client.close()
    finally:
        relay.close()


async def test_a_relay_certificate_with_server_auth_still_works(certs: Path) -> None:
    relay = Relay(certs, ("198.18.200.0/24",))
    try:
        client = Client(certs, relay.port)
        await asyncio.wait_for(client.up, 5)
        await client.close()
    finally:
        relay.close()
