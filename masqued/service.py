"""Living under systemd: sd_notify, logging set-up, signal wiring.

Outside systemd every call here degrades to nothing (no NOTIFY_SOCKET) or to
readable stderr logging.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time


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
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:
            logging.getLogger("masqued").debug("sd_notify failed: %s", exc)

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

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class _InstanceFilter(logging.Filter):
    def __init__(self, instance: str, role: str) -> None:
        super().__init__()
        self.instance = instance
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.instance = self.instance
        record.role = self.role
        return True


def setup_logging(level: str, instance: str, role: str) -> None:
    """Readable stderr logging; under systemd the journal captures it with the unit."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        # The journal adds its own timestamp and unit name.
        fmt = "%(levelname)s %(name)s: %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)s masqued[%(instance)s] %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    handler.addFilter(_InstanceFilter(instance, role))
    root.addHandler(handler)
    set_level(level)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(getattr(logging, level.upper(), logging.INFO))
    # Libraries stay quiet even at debug level: their per-message chatter is noise.
    for noisy in ("pyroute2", "quic", "aioquic", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
