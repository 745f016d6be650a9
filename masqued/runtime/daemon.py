"""``masqued run``: one instance's life, relay or client, until SIGTERM/SIGINT.

The relay (runtime/relay.py) and the client (runtime/client.py) are instances made of
wg-quick-style actions; this module picks one for the config and turns a StartupError
into the exit code and systemd's STATUS=.
"""

from __future__ import annotations

import asyncio
import logging

from masqued.config import ClientConfig, RelayConfig
from masqued.runtime.client import run_client
from masqued.runtime.instance import StartupError
from masqued.runtime.relay import run_relay, run_worker
from masqued.runtime.service import Notifier

__all__ = ["StartupError", "run", "run_worker"]

log = logging.getLogger("masqued")


def run(config: RelayConfig | ClientConfig, notifier: Notifier | None = None) -> int:
    """Run one instance until SIGTERM/SIGINT; returns the exit code."""
    notifier = notifier or Notifier()
    try:
        if isinstance(config, RelayConfig):
            return asyncio.run(run_relay(config, notifier))
        return asyncio.run(run_client(config, notifier))
    except StartupError as exc:
        log.error("%s", exc)
        notifier.status(f"failed: {exc}")
        return 1
    finally:
        notifier.close()
