"""Logging helpers: rate-limited warnings for peer-driven events."""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """Log a given key at most once per ``interval`` seconds, counting what was held back.

    Peer-driven events (bad frames, spoofed sources, drops) must never flood the log:
    the first occurrence is logged, later ones within the interval are counted and
    reported with the next line for that key.
    """

    def __init__(
        self, logger: logging.Logger, interval: float = 10.0, max_keys: int = 1024
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._max_keys = max_keys
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, key: str, msg: str, *args: object, **kwargs: object) -> bool:
        """Log ``msg`` unless ``key`` was logged within the interval. Returns True if logged."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        if last is None and len(self._last) >= self._max_keys:
            # Bound memory: forget keys that are quiet.
            cutoff = now - self._interval
            for k in [k for k, t in self._last.items() if t < cutoff]:
                del self._last[k]
                self._suppressed.pop(k, None)
            if len(self._last) >= self._max_keys:
                return False
        self._last[key] = now
        held = self._suppressed.pop(key, 0)
        if held:
            msg = f"{msg} ({held} similar suppressed)"
        self._logger.log(level, msg, *args, **kwargs)  # type: ignore[arg-type]
        return True

    def warning(self, key: str, msg: str, *args: object, **kwargs: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args, **kwargs)

    def info(self, key: str, msg: str, *args: object, **kwargs: object) -> bool:
        return self.log(logging.INFO, key, msg, *args, **kwargs)
