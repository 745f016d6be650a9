"""What every instance has: signals, the status line, reload's verdict, cleanup.

The relay and the client (runtime/relay.py, runtime/client.py) build on ``Instance``:
signal handlers only wake the loop, SIGHUP sends RELOADING=1 first and READY=1 with
the verdict after, STATUS= stays current, and cleanup is the name-derived one that
``masqued cleanup NAME`` runs.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

from masqued.config import ClientConfig, ConfigError, RelayConfig, load_config
from masqued.host.cleanup import cleanup_instance
from masqued.host.naming import InstanceIds
from masqued.observe.control import ControlSocketBusy, live_instances
from masqued.observe.metrics import TrafficCounters
from masqued.observe.status import StatusService
from masqued.runtime.service import (
    Notifier,
    StatusReporter,
    Watchdog,
    runtime_dir,
    watchdog_interval,
    write_reload_result,
)

log = logging.getLogger("masqued")


class StartupError(Exception):
    """The instance cannot start; the message says why and what to do."""


class Instance:
    """Shared plumbing: signals, reload, status, shutdown."""

    def __init__(self, config: RelayConfig | ClientConfig, notifier: Notifier) -> None:
        self.config = config
        self.ids = InstanceIds(config.name)
        self.notifier = notifier
        self.loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        self.started = time.time()
        # WATCHDOG=1 from the loop itself: a stuck loop stops the pings.
        self.watchdog = Watchdog(notifier, watchdog_interval())
        self.watchdog.start(self.loop)
        self.status: StatusReporter | None = None
        self.reloads = 0
        self._reloading = False  # RELOADING=1 sent, READY=1 not yet

    def install_signals(self, reload: Callable[[], None]) -> None:
        # Handlers only wake the loop; the work happens in the loop.
        self.loop.add_signal_handler(signal.SIGTERM, self.stop_event.set)
        self.loop.add_signal_handler(signal.SIGINT, self.stop_event.set)
        self.loop.add_signal_handler(signal.SIGHUP, self.guarded_reload(reload))

    def guarded_reload(self, reload: Callable[[], None]) -> Callable[[], None]:
        """``reload`` such that whatever it raises, systemd gets its answer: the error
        is logged and READY=1 follows RELOADING=1 (else the unit would stay
        "reloading" and ``systemctl reload`` would hang until its timeout)."""

        def run() -> None:
            try:
                reload()
            except Exception as exc:
                log.exception("reload failed: %s", exc)
                if not self._reloading:
                    self.notifier.reloading()
                self.reload_done(
                    False,
                    f"{self.config.path}: reload failed: {exc or type(exc).__name__} "
                    "(see the log; the running configuration may be partly applied)",
                )

        return run

    def remove_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self.loop.remove_signal_handler(sig)
        self.watchdog.stop()
        if self.status is not None:
            self.status.stop()

    def report_status(self, line: Callable[[], str]) -> StatusReporter:
        """Keep STATUS= current from ``line()`` (sent on change and refreshed)."""
        self.status = StatusReporter(self.notifier, line)
        self.status.start(self.loop)
        return self.status

    def reload_done(self, ok: bool, message: str) -> None:
        """READY=1 again after RELOADING=1, and the verdict for ``masqued reload``."""
        self._reloading = False
        self.reloads += 1
        write_reload_result(runtime_dir(), self.reloads, ok, message)
        if self.status is not None:
            self.status.ready()
        else:
            self.notifier.send("READY=1")

    def reread(self) -> RelayConfig | ClientConfig | None:
        """Load the config again; on error log it and keep the running one."""
        self.notifier.reloading()
        self._reloading = True
        try:
            new = load_config(self.config.path, self.config.name)
        except ConfigError as exc:
            log.error("reload rejected, keeping the running configuration: %s", exc)
            self.reload_done(False, f"{exc} (running configuration kept)")
            return None
        if type(new) is not type(self.config):
            log.error("reload rejected: mode changed (restart the instance to change it)")
            self.reload_done(False, f"{new.path}: mode changed; restart the instance to change it")
            return None
        return new

    def cleanup(self) -> None:
        cleanup_instance(self.ids)  # logs each removal itself


def refuse_collisions(ids: InstanceIds) -> None:
    """A running instance whose host objects this one would take (the same routing
    table and fwmark, TUN, NAT table or chain): refuse to start, before the cleanup
    that would tear down that instance's routes and rules."""
    for name in live_instances():
        shared = ids.shared_with(InstanceIds(name))
        if shared:
            raise StartupError(
                f"instance {ids.name} would share its {', '.join(shared)} with the running "
                f"instance {name}: names that close cannot run together; rename one of them "
                "(its config file /etc/masque/NAME.conf)"
            )


async def start_status(service: StatusService) -> StatusService:
    """Open the control socket (and metrics); a live one means a second copy: refuse,
    and so does a running instance this one's host objects would collide with."""
    refuse_collisions(service.ids)
    try:
        await service.start()
    except ControlSocketBusy as exc:
        raise StartupError(
            f"instance {service.ids.name} is already running (its control socket {exc} "
            "answers); stop it first"
        ) from None
    except OSError as exc:
        # Serving packets matters more than being observable: carry on without it.
        log.error(
            "cannot open the control socket %s: %s (masqued status will not see this instance)",
            service.control.path,
            exc.strerror or exc,
        )
    return service


def changed_keys(old: Any, new: Any, keys: tuple[str, ...]) -> list[str]:
    return [k for k in keys if getattr(old, k) != getattr(new, k)]


def not_yet(inst: Instance, part: Any) -> dict[str, Any]:
    """The running part's snapshot, or a minimal one while the instance still starts."""
    if part is not None:
        snapshot: dict[str, Any] = part.snapshot()
        return snapshot
    now = time.time()
    return {
        "role": inst.config.mode,
        "time": now,
        "started": inst.started,
        "uptime": now - inst.started,
        "state": "starting",
        "sessions": [],
        "totals": TrafficCounters().snapshot(),
    }
