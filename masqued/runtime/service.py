"""Living under systemd: sd_notify, the watchdog, journald logging, reload results.

Outside systemd every call here degrades to nothing (no ``NOTIFY_SOCKET``, no
``WATCHDOG_USEC``) or to readable stderr logging.

Journal fields: every record carries ``MASQUED_INSTANCE`` and ``MASQUED_ROLE`` (and
``MASQUED_WORKER`` from a relay worker); records about one client session carry
``MASQUED_CLIENT`` (its identity, or its IP address on an open relay), ``MASQUED_PEER``
(its IP address), ``MASQUED_SESSION`` (the session id ``masqued status`` shows) and
``MASQUED_ADDRESS`` (its tunnel addresses), passed with ``extra=`` (see
``client_fields``), so ``journalctl -u masqued MASQUED_CLIENT=alice`` shows one
client's sessions.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("masqued")

# Journal fields (journald accepts upper-case ASCII, digits and '_').
FIELD_INSTANCE = "MASQUED_INSTANCE"
FIELD_ROLE = "MASQUED_ROLE"
FIELD_CLIENT = "MASQUED_CLIENT"
FIELD_PEER = "MASQUED_PEER"
FIELD_ADDRESS = "MASQUED_ADDRESS"
FIELD_SESSION = "MASQUED_SESSION"
SYSLOG_IDENTIFIER = "masqued"

# How often STATUS= is refreshed when nothing else changes it (uptimes move on).
STATUS_REFRESH = 60.0
RELOAD_RESULT_FILE = "reload-result"


class Notifier:
    """sd_notify(3) over the AF_UNIX datagram socket named by $NOTIFY_SOCKET."""

    def __init__(self, path: str | None = None) -> None:
        if path is None:
            path = os.environ.get("NOTIFY_SOCKET")
        self.path = path
        self._sock: socket.socket | None = None
        if path:
            if path.startswith("@"):  # abstract namespace
                path = "\0" + path[1:]
            self._address = path
            # Non-blocking: a notify socket nobody reads (its queue holds only
            # net.unix.max_dgram_qlen = 10 datagrams) must never stall the event loop.
            self._sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:
            log.debug("sd_notify failed: %s", exc)

    def ready(self, status: str | None = None) -> None:
        lines = ["READY=1"]
        if status:
            lines.append(f"STATUS={status}")
        self.send(*lines)

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# -- watchdog ----------------------------------------------------------------------


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``$WATCHDOG_USEC``, or None.

    As sd_watchdog_enabled(3): ignored when ``$WATCHDOG_PID`` names another process
    (the variables were inherited, not meant for us), or when the value is not a
    positive integer.
    """
    env = os.environ if env is None else env
    usec_text = env.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    pid_text = env.get("WATCHDOG_PID")
    own = os.getpid() if pid is None else pid
    if pid_text and (not pid_text.isdigit() or int(pid_text) != own):
        return None
    if not usec_text.isdigit() or int(usec_text) == 0:
        return None
    return int(usec_text) / 2e6


class Scheduler(Protocol):
    """The part of an event loop the timers below use (a fake in unit tests)."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> Any: ...


class Watchdog:
    """Sends ``WATCHDOG=1`` from the event loop itself every ``interval`` seconds.

    Because the ping is a loop callback, a loop that is stuck (blocked call, stopped
    process) stops pinging and systemd kills and restarts the unit (``WatchdogSec=``).
    """

    def __init__(self, notifier: Notifier, interval: float | None) -> None:
        self.notifier = notifier
        self.interval = interval
        self.sent = 0
        self._loop: Any = None
        self._handle: Any = None

    @property
    def enabled(self) -> bool:
        return self.interval is not None and self.notifier.enabled

    def start(self, loop: Scheduler) -> None:
        """Ping now and then every interval; no-op when the watchdog is off."""
        if not self.enabled or self._loop is not None:
            return
        self._loop = loop
        log.debug("watchdog: pinging every %.3gs", self.interval)
        self._tick()

    def _tick(self) -> None:
        assert self.interval is not None
        self.notifier.watchdog()
        self.sent += 1
        self._handle = self._loop.call_later(self.interval, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._loop = None


class StatusReporter:
    """Keeps ``STATUS=`` current: sends the line when it changed, and refreshes it
    every ``period`` seconds for parts that move by themselves (uptimes)."""

    def __init__(
        self, notifier: Notifier, line: Callable[[], str], period: float = STATUS_REFRESH
    ) -> None:
        self.notifier = notifier
        self.line = line
        self.period = period
        self.last: str | None = None
        self._loop: Any = None
        self._handle: Any = None

    def update(self) -> None:
        text = self.line()
        if text != self.last:
            self.notifier.status(text)
            self.last = text

    def ready(self) -> None:
        """``READY=1`` with the current status (after start-up and after a reload)."""
        text = self.line()
        self.notifier.ready(text)
        self.last = text

    def start(self, loop: Scheduler) -> None:
        if not self.notifier.enabled or self._loop is not None:
            return
        self._loop = loop
        self._handle = loop.call_later(self.period, self._tick)

    def _tick(self) -> None:
        self.update()
        self._handle = self._loop.call_later(self.period, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._loop = None


def format_uptime(seconds: float) -> str:
    """``42s``, ``5m``, ``2h``, ``2h 5m``, ``3d 4h``: short, for STATUS lines."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        h, m = divmod(s // 60, 60)
        return f"{h}h" if m == 0 else f"{h}h {m}m"
    d, h = divmod(s // 3600, 24)
    return f"{d}d" if h == 0 else f"{d}d {h}h"


# -- reload results ------------------------------------------------------------------


def runtime_dir() -> Path | None:
    """``$RUNTIME_DIRECTORY`` (systemd's ``RuntimeDirectory=``), if set."""
    value = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return Path(value) if value else None


def write_reload_result(directory: Path | None, seq: int, ok: bool, message: str) -> None:
    """Record the outcome of reload number ``seq`` for ``masqued reload`` to pick up."""
    if directory is None:
        return
    data = json.dumps({"pid": os.getpid(), "seq": seq, "ok": ok, "message": message})
    tmp = directory / f".{RELOAD_RESULT_FILE}.tmp"
    try:
        tmp.write_text(data + "\n")
        tmp.replace(directory / RELOAD_RESULT_FILE)
    except OSError as exc:
        log.warning("cannot write %s: %s", directory / RELOAD_RESULT_FILE, exc)


def read_reload_result(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / RELOAD_RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# -- logging ---------------------------------------------------------------------------


def client_fields(
    peer: str, addresses: str, identity: str | None = None, session: str | None = None
) -> dict[str, str]:
    """``extra=`` for a log call about one client: journal fields for journalctl.

    MASQUED_CLIENT is the client's identity when it authenticated (certificate CN or
    token name), else its IP address; MASQUED_PEER is always the IP address;
    MASQUED_SESSION (when given) the session's id in ``masqued status``.
    """
    host = peer.rsplit(":", 1)[0].strip("[]") if ":" in peer else peer
    fields = {FIELD_CLIENT: identity or host, FIELD_PEER: host, FIELD_ADDRESS: addresses}
    if session is not None:
        fields[FIELD_SESSION] = session
    return fields


class _InstanceFilter(logging.Filter):
    def __init__(self, instance: str, role: str) -> None:
        super().__init__()
        self.instance = instance
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.instance = self.instance
        record.role = self.role
        return True


FIELD_WORKER = "MASQUED_WORKER"


def journal_handler(
    instance: str,
    role: str,
    sender: Callable[..., Any] | None = None,
    worker: int | None = None,
) -> logging.Handler | None:
    """systemd-python's JournalHandler carrying our instance fields, or None if the
    module is not installed. ``sender`` replaces ``systemd.journal.send`` (tests)."""
    try:
        from systemd.journal import JournalHandler  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        return None
    fields = {
        "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
        FIELD_INSTANCE: instance,
        FIELD_ROLE: role,
    }
    if worker is not None:
        fields[FIELD_WORKER] = str(worker)
    if sender is not None:
        handler: logging.Handler = JournalHandler(sender_function=sender, **fields)
    else:
        handler = JournalHandler(**fields)
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


def stderr_is_journal(env: Mapping[str, str] | None = None) -> bool:
    """True when stderr is connected to journald (``$JOURNAL_STREAM`` matches it)."""
    env = os.environ if env is None else env
    value = env.get("JOURNAL_STREAM", "")
    if ":" not in value:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return value == f"{st.st_dev}:{st.st_ino}"


def setup_logging(
    level: str,
    instance: str,
    role: str,
    journal: bool | None = None,
    worker: int | None = None,
) -> logging.Handler:
    """Log to journald with our fields when stderr goes there, else readable stderr.

    ``journal=None`` decides by ``$JOURNAL_STREAM``; without systemd-python the
    journal still gets stderr lines (without the structured fields). A relay
    worker's lines carry MASQUED_WORKER (and "NAME/k" on stderr).
    Returns the handler installed on the root logger.
    """
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    use_journal = stderr_is_journal() if journal is None else journal
    handler = journal_handler(instance, role, worker=worker) if use_journal else None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        if use_journal or os.environ.get("INVOCATION_ID"):
            # The journal adds its own timestamp and unit name.
            fmt = "%(levelname)s %(name)s: %(message)s"
        else:
            fmt = "%(asctime)s %(levelname)s masqued[%(instance)s] %(name)s: %(message)s"
        handler.setFormatter(logging.Formatter(fmt))
    label = instance if worker is None else f"{instance}/{worker}"
    handler.addFilter(_InstanceFilter(label, role))
    handler.addFilter(_QuietLibraries())
    root.addHandler(handler)
    set_level(level)
    return handler


def set_level(level: str) -> None:
    logging.getLogger().setLevel(getattr(logging, level.upper(), logging.INFO))
    # Libraries stay quiet even at debug level: their per-message chatter is noise.
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # aioquic warns once per connection a peer breaks (qh3, on the same "quic" logger,
    # at every peer close): anyone could flood the journal
    # with those; the relay logs what matters itself, rate-limited.
    logging.getLogger("quic").setLevel(logging.ERROR)


NOISY_LOGGERS = ("quic", "aioquic", "qh3", "asyncio")


class _QuietLibraries(logging.Filter):
    """Drop libraries' debug chatter even where they set their own loggers' levels."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.name.startswith(NOISY_LOGGERS)


def freeze_startup_objects() -> None:
    """Keep what start-up made (modules, config, TLS context: ~35k objects) out of
    every later cyclic garbage collection.

    A full collection walks every tracked object; with these in it, it stalled the
    relay (README, Performance), a stall in which the client's data went unacknowledged and its
    queue bound dropped packets of a flow at half the tunnel's capacity. Frozen
    objects are still freed by reference counting; only cycles among them would
    stay, and start-up state lives as long as the process. Call once, after
    start-up and before the first peer connects.
    """
    gc.collect()
    gc.freeze()
