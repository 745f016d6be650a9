"""Relay workers (``workers = N``): N processes serve one relay instance.

The main process does everything a one-process relay does (host set-up, NAT, the
control socket, systemd), runs worker 0 itself, and starts workers 1..N-1 as
``masqued worker`` processes. Before that it creates every worker's TUN device
(``mq-NAME+k``, with worker k's share of the pool: ``pool_slice``) and every UDP
socket of the SO_REUSEPORT group (``masqued.transport.steering``), with one listening
TCP socket each for HTTP/2, and keeps them open: a worker that dies is started again
on the same TUN and sockets, and its clients reconnect to it. No packet crosses
processes: the kernel steers each client's datagrams to its worker by connection ID
(and spreads TCP connections over the listening sockets), and routes the replies to
the TUN of the worker whose share holds the destination.

Between the main process and a worker runs a socket pair carrying JSON lines. The
worker sends ``{"ready": ...}`` once it serves and then its status snapshot whenever
it changed (at most every SNAPSHOT_INTERVAL); the main process merges them into the
instance's status and metrics. Signals do the rest: SIGHUP makes a worker re-read
the config (after the main process accepted it), SIGTERM stops it; a worker whose
socket pair closes (the main process is gone) stops too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger("masqued.runtime.workers")

SNAPSHOT_INTERVAL = 0.5  # seconds between a worker's status pushes, at most
# A worker says something at least every HEARTBEAT seconds (a snapshot or "alive"),
# from its event loop; one silent for WATCHDOG is stuck and is killed (and started
# again), as systemd's watchdog does with the main process.
HEARTBEAT = 2.0
WATCHDOG = 10.0
READY_TIMEOUT = 30.0  # a worker starts a Python interpreter: ~0.3 s of CPU
STOP_TIMEOUT = 5.0
RESTART_INITIAL = 1.0
RESTART_MAX = 30.0
MAX_LINE = 16 * 1024 * 1024  # a snapshot with many sessions


# -- status -----------------------------------------------------------------------------


def merge_snapshots(snapshots: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """One relay status snapshot (docs/status.schema.json, relay part) out of the
    workers' own: sessions side by side (each marked with its ``worker``), pool,
    results, handshake histogram and totals added up."""
    snaps = list(snapshots)
    if not snaps:
        raise ValueError("no snapshot to merge")
    first = snaps[0]
    merged: dict[str, Any] = {
        "role": "relay",
        "time": max(s["time"] for s in snaps),
        "started": first["started"],
        "uptime": first["uptime"],
        "sessions": sorted(
            (sess for s in snaps for sess in s["sessions"]),
            key=lambda sess: sess.get("connected_since") or 0.0,
        ),
        "pool": {
            "used": sum(s["pool"]["used"] for s in snaps),
            "capacity": sum(s["pool"]["capacity"] for s in snaps),
        },
        "results": _add_counts(s["results"] for s in snaps),
        "handshake": _add_histograms([s["handshake"] for s in snaps]),
        "totals": _add_totals([s["totals"] for s in snaps]),
    }
    return merged


def _add_counts(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counts:
        for key, n in c.items():
            out[key] = out.get(key, 0) + n
    return out


def _add_histograms(hists: list[dict[str, Any]]) -> dict[str, Any]:
    buckets = [dict(b) for b in hists[0]["buckets"]]
    for h in hists[1:]:
        if [b["le"] for b in h["buckets"]] != [b["le"] for b in buckets]:
            raise ValueError("handshake histograms with different buckets")
        for mine, theirs in zip(buckets, h["buckets"], strict=True):
            mine["count"] += theirs["count"]
    return {
        "count": sum(h["count"] for h in hists),
        "sum": round(sum(h["sum"] for h in hists), 6),
        "buckets": buckets,
    }


def _add_totals(totals: list[dict[str, Any]]) -> dict[str, Any]:
    def latest(key: str) -> float | None:
        values = [t[key] for t in totals if t.get(key)]
        return max(values) if values else None

    return {
        **{
            key: sum(t[key] for t in totals)
            for key in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes")
        },
        "drops": _add_counts(t["drops"] for t in totals),
        "last_rx": latest("last_rx"),
        "last_tx": latest("last_tx"),
    }


def mark_worker(snapshot: dict[str, Any], index: int) -> dict[str, Any]:
    """``snapshot`` with every session saying which worker serves it."""
    for sess in snapshot["sessions"]:
        sess["worker"] = index
    return snapshot


# -- main process side --------------------------------------------------------------------


class WorkerProcess:
    """One ``masqued worker`` child: started, watched, restarted when it dies."""

    def __init__(
        self,
        *,
        index: int,
        count: int,
        config_path: str,
        name: str,
        tun_fd: int,
        udp_fd: int,
        vnet: bool,
        log_level: str,
        tcp_fd: int = -1,
        pool: Iterable[object] = (),
        mtu: int = 0,
        on_change: Callable[[], None] | None = None,
        shutting_down: Callable[[], bool] = lambda: False,
        retry_key: bytes = b"",
    ) -> None:
        self.index = index
        self.count = count
        self.config_path = config_path
        self.name = name
        self.tun_fd = tun_fd
        self.udp_fd = udp_fd
        self.tcp_fd = tcp_fd  # its listening TCP socket (HTTP/2), -1: none
        self.vnet = vnet
        self.log_level = log_level
        # What the instance runs with, whatever the config file says by now (a worker
        # started again later must match its TUN and its share of the pool).
        self.pool = ",".join(map(str, pool))
        self.mtu = mtu
        self.on_change = on_change
        # True once the whole instance stops: a worker that exits then (systemd may
        # signal every process of the unit) is not started again.
        self.shutting_down = shutting_down
        self.retry_key = retry_key
        self.proc: asyncio.subprocess.Process | None = None
        self.snapshot: dict[str, Any] | None = None
        self.state = "starting"
        self.restarts = 0
        self.started_at: float | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._stopping = False
        self._ready: asyncio.Future[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None

    def argv(self, ipc_fd: int) -> list[str]:
        return [
            sys.executable,
            *("-m", "masqued", "worker", "--config", self.config_path, "--name", self.name),
            *("--index", str(self.index), "--workers", str(self.count)),
            *("--tun-fd", str(self.tun_fd), "--udp-fd", str(self.udp_fd)),
            *(("--tcp-fd", str(self.tcp_fd)) if self.tcp_fd >= 0 else ()),
            *("--ipc-fd", str(ipc_fd), "--vnet", "1" if self.vnet else "0"),
            *("--log-level", self.log_level),
            *(("--pool", self.pool) if self.pool else ()),
            *(("--mtu", str(self.mtu)) if self.mtu else ()),
        ]

    async def start(self) -> None:
        """Start the process and wait until it serves (raises RuntimeError if not)."""
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._supervisor = loop.create_task(self._supervise())
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), READY_TIMEOUT)
        except TimeoutError:
            raise RuntimeError(
                f"worker {self.index} not ready within {READY_TIMEOUT:.0f}s"
            ) from None

    async def _supervise(self) -> None:
        delay = RESTART_INITIAL
        while not self._stopping:
            began = time.monotonic()
            code = await self._run_once()
            if self._stopping or self.shutting_down():
                self.state = "stopped"
                return
            self.state = "restarting"
            self.snapshot = None
            if self.on_change is not None:
                self.on_change()
            if time.monotonic() - began > 2 * RESTART_MAX:
                delay = RESTART_INITIAL  # it ran for a good while: restart soon
            log.error(
                "relay worker %d (pid %s) exited with %s; its clients reconnect; "
                "starting it again in %.0fs",
                self.index,
                self.proc.pid if self.proc else "?",
                code,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX)
            self.restarts += 1

    async def _run_once(self) -> int | None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv(child.fileno()),
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(
                    self.tun_fd,
                    self.udp_fd,
                    child.fileno(),
                    *((self.tcp_fd,) if self.tcp_fd >= 0 else ()),
                ),
            )
        except OSError as exc:
            parent.close()
            log.error("cannot start relay worker %d: %s", self.index, exc)
            return None
        finally:
            child.close()
        self.started_at = time.time()
        reader, self._writer = await asyncio.open_unix_connection(sock=parent, limit=MAX_LINE)
        self.send({"retry_key": self.retry_key.hex()})
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), WATCHDOG)
                except TimeoutError:
                    log.error(
                        "relay worker %d (pid %d) silent for %.0fs: stuck, killing it",
                        self.index,
                        self.proc.pid,
                        WATCHDOG,
                    )
                    break
                except (ValueError, asyncio.LimitOverrunError):
                    log.error("relay worker %d sent an oversized message", self.index)
                    break
                except OSError:
                    break  # ECONNRESET: it died with our messages unread
                if not line:
                    break
                self._message(line)
        finally:
            self._writer.close()
            self._writer = None
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()  # a worker that closed its end is done, whatever it thinks
        return await self.proc.wait()

    def _message(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except ValueError:
            log.error("relay worker %d sent a malformed message", self.index)
            return
        if not isinstance(msg, dict):
            return
        if isinstance(msg.get("snapshot"), dict):
            self.snapshot = mark_worker(msg["snapshot"], self.index)
            if self.on_change is not None:
                self.on_change()
        if msg.get("ready"):
            self.state = "running"
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
            pid = self.proc.pid if self.proc else 0
            log.info("relay worker %d serving (pid %d)", self.index, pid)

    def send(self, msg: dict[str, Any]) -> None:
        """A message to the worker (if it is running); never blocks."""
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n")

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT."""
        self._stopping = True
        self.signal(signal.SIGTERM)
        if self.proc is not None:
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                log.warning("relay worker %d did not stop in time: killing it", self.index)
                self.signal(signal.SIGKILL)
                await self.proc.wait()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor

    def describe(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "pid": self.proc.pid if self.proc is not None else None,
            "state": self.state,
            "restarts": self.restarts,
            "started": self.started_at,
        }


# -- worker process side ------------------------------------------------------------------


class Uplink:
    """The worker's end of the socket pair: ready, then its snapshot at once when its
    sessions change, and every SNAPSHOT_INTERVAL when anything else did."""

    def __init__(self, writer: asyncio.StreamWriter, snapshot: Callable[[], dict[str, Any]]):
        self._writer = writer
        self._snapshot = snapshot
        self._last: str | None = None
        self._sent_at = 0.0

    def send(self, msg: dict[str, Any]) -> None:
        # default=str as the control socket has it (identities are objects there).
        text = json.dumps(msg, separators=(",", ":"), default=str)
        self._writer.write(text.encode() + b"\n")
        self._sent_at = time.monotonic()

    def changed(self) -> None:
        """Sessions opened or closed: push now (``masqued status`` shows them)."""
        snap = self._snapshot()
        # Unchanged but for the clock: nothing to send.
        key = json.dumps(
            {k: v for k, v in snap.items() if k not in ("time", "uptime")}, default=str
        )
        if key != self._last:
            self._last = key
            self.send({"snapshot": snap})

    async def tick(self) -> None:
        """Counters change with every packet: look every SNAPSHOT_INTERVAL; and say
        "alive" when nothing else went out for HEARTBEAT (the main process's watchdog)."""
        while True:
            await asyncio.sleep(SNAPSHOT_INTERVAL)
            self.changed()
            if time.monotonic() - self._sent_at >= HEARTBEAT:
                self.send({"alive": True})

    def close(self) -> None:
        self._writer.close()


def worker_env_fds(args: Any) -> tuple[int, int, int]:
    """(tun, udp, ipc) fds from ``masqued worker``'s arguments, checked to be open
    (and the TCP one, when given)."""
    fds = (args.tun_fd, args.udp_fd, args.ipc_fd)
    for fd in (*fds, *((args.tcp_fd,) if getattr(args, "tcp_fd", -1) >= 0 else ())):
        os.fstat(fd)  # raises OSError(EBADF) when the parent did not pass it
    return fds
