"""``masqued run``: one instance's life, relay or client, until SIGTERM/SIGINT.

The relay (runtime/relay.py) and the client (runtime/client.py) are instances made of
wg-quick-style actions; this module picks one for the config and turns a StartupError
into the exit code and systemd's STATUS=.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from masqued.config import ClientConfig, RelayConfig
from masqued.runtime.client import run_client
from masqued.runtime.instance import StartupError
from masqued.runtime.relay import run_relay, run_worker
from masqued.runtime.service import Notifier

__all__ = ["StartupError", "run", "run_loop", "run_worker"]

log = logging.getLogger("masqued")

T = TypeVar("T")


def loop_factory(event_loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory of config key ``event_loop``'s loop (None: asyncio's own). The QUIC
    engines are given time.monotonic() whatever the loop (masqued.transport.h3link):
    uvloop's loop.time() is cached per loop iteration, which collapsed aioquic's
    sender when it was the engine's clock."""
    if event_loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def run_loop(main: Coroutine[Any, Any, T], event_loop: str = "asyncio") -> T:
    """Run ``main`` to completion on a new loop of kind ``event_loop``."""
    with asyncio.Runner(loop_factory=loop_factory(event_loop)) as runner:
        return runner.run(main)


def run(config: RelayConfig | ClientConfig, notifier: Notifier | None = None) -> int:
    """Run one instance until SIGTERM/SIGINT; returns the exit code."""
    notifier = notifier or Notifier()
    try:
        if isinstance(config, RelayConfig):
            return run_loop(run_relay(config, notifier), config.event_loop)
        return run_loop(run_client(config, notifier), config.event_loop)
    except StartupError as exc:
        log.error("%s", exc)
        notifier.status(f"failed: {exc}")
        return 1
    finally:
        notifier.close()
