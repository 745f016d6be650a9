"""The per-instance control socket: the only way in-process state leaves the daemon.

``/run/masqued/NAME.sock`` (directory ``$MASQUED_RUN_DIR`` when set, for tests) is an
AF_UNIX stream socket, mode 0600, served from the daemon's event loop. Besides the
file mode, every connection's peer credentials (SO_PEERCRED) are checked: only root
(and the daemon's own uid) may talk to it. Nothing listens on the network for it.

Protocol, version 1: newline-delimited JSON, one request and one response per line,
several requests per connection allowed.

    -> {"version": 1, "command": "status", "args": {}}
    <- {"version": 1, "ok": true, "result": {...}}
    <- {"version": 1, "ok": false, "error": {"code": "unknown_command", "message": "..."}}

Error codes: ``bad_request`` (not JSON / not an object / wrong field types),
``unsupported_version``, ``unknown_command``, ``too_large``, ``forbidden``,
``internal``. A request line is at most ``MAX_REQUEST`` bytes; a longer one gets
``too_large`` and the connection is closed. Garbage gets an error answer and is
logged once per interval; it never affects the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from masqued.logutil import RateLimitedLog

log = logging.getLogger("masqued.observe.control")

PROTOCOL_VERSION = 1
DEFAULT_RUN_DIR = Path("/run/masqued")
MAX_REQUEST = 4096
MAX_RESPONSE = 64 * 1024 * 1024  # client-side bound on one answer line
MAX_CONNECTIONS = 16
IDLE_TIMEOUT = 60.0
WRITE_TIMEOUT = 10.0
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def run_dir() -> Path:
    """Directory of control sockets: ``$MASQUED_RUN_DIR`` or ``/run/masqued``."""
    return Path(os.environ.get("MASQUED_RUN_DIR") or DEFAULT_RUN_DIR)


def socket_path(name: str) -> Path:
    """Where clients find instance ``name``'s socket.

    ``RUN_DIR/NAME.sock``; under the sandboxed unit (``ProtectSystem=strict`` leaves
    only its ``RuntimeDirectory=masqued/NAME`` writable) the daemon binds
    ``RUN_DIR/NAME/control.sock`` instead, and that is used when it is the one present.
    """
    primary = run_dir() / f"{name}.sock"
    in_runtime_dir = run_dir() / name / "control.sock"
    if not primary.exists() and in_runtime_dir.exists():
        return in_runtime_dir
    return primary


def server_socket_path(name: str) -> Path:
    """Where the daemon binds: ``$RUNTIME_DIRECTORY/control.sock`` under systemd."""
    if not os.environ.get("MASQUED_RUN_DIR"):
        runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
        if runtime:
            return Path(runtime) / "control.sock"
    return run_dir() / f"{name}.sock"


def running_instances() -> list[str]:
    """Names of instances with a control socket in ``run_dir()`` (sorted)."""
    try:
        entries = list(run_dir().iterdir())
    except OSError:
        return []
    names = {p.name.removesuffix(".sock") for p in entries if p.name.endswith(".sock")}
    names |= {p.name for p in entries if (p / "control.sock").exists()}
    return sorted(names)


def live_instances() -> list[str]:
    """``running_instances()`` whose control socket answers (not a crash's leftover)."""
    return [name for name in running_instances() if _answers(socket_path(name))]


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


class ControlError(Exception):
    """An error answer (server side: raise it from a handler; client side: raised)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message


class ControlSocketBusy(Exception):
    """Another live process already serves this control socket."""


def _error(code: str, message: str) -> dict[str, Any]:
    return {"version": PROTOCOL_VERSION, "ok": False, "error": {"code": code, "message": message}}


def parse_request(line: bytes) -> tuple[str, dict[str, Any]]:
    """Validate one request line; returns (command, args) or raises ControlError."""
    try:
        req = json.loads(line)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ControlError("bad_request", "request is not a JSON document") from None
    if not isinstance(req, dict):
        raise ControlError("bad_request", "request must be a JSON object")
    version = req.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ControlError("bad_request", "missing integer 'version'")
    if version != PROTOCOL_VERSION:
        raise ControlError("unsupported_version", f"protocol version {version} unsupported; use 1")
    command = req.get("command")
    if not isinstance(command, str) or not command:
        raise ControlError("bad_request", "missing string 'command'")
    args = req.get("args", {})
    if not isinstance(args, dict):
        raise ControlError("bad_request", "'args' must be a JSON object")
    return command, args


class ControlServer:
    """Serves the control protocol on ``path`` from the running event loop."""

    def __init__(
        self,
        path: Path,
        handlers: dict[str, Handler],
        *,
        allowed_uids: frozenset[int] | None = None,
    ) -> None:
        self.path = path
        self.handlers = dict(handlers)
        self.handlers.setdefault("hello", self._hello)
        self.allowed_uids = (
            allowed_uids if allowed_uids is not None else frozenset({0, os.geteuid()})
        )
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ratelog = RateLimitedLog(log)
        self.refused = 0
        self.bad_requests = 0

    async def _hello(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"protocol": PROTOCOL_VERSION, "pid": os.getpid(), "commands": sorted(self.handlers)}

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Bind the socket (0600). Raises ControlSocketBusy if a live server holds it."""
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        if _answers(self.path):
            raise ControlSocketBusy(str(self.path))
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # stale, from a crashed run
        old = os.umask(0o177)  # no window in which the socket is more open than 0600
        try:
            self._server = await asyncio.start_unix_server(
                self._accept, path=str(self.path), limit=MAX_REQUEST
            )
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        log.debug("control socket %s", self.path)

    async def close(self) -> None:
        if self._server is None:
            return  # never bound: the file (if any) is not ours
        self._server.close()
        self._server = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=1.0)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    # -- connections ----------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._session(reader, writer)
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._tasks) > MAX_CONNECTIONS:
            await self._send(writer, _error("busy", "too many control connections"))
            return
        sock = writer.get_extra_info("socket")
        pid, uid, _ = peer_credentials(sock)
        if uid not in self.allowed_uids:
            self.refused += 1
            self._ratelog.warning(
                f"uid:{uid}", "control: refused connection from uid %d (pid %d)", uid, pid
            )
            await self._send(writer, _error("forbidden", "the control socket is for root only"))
            return
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)
            except TimeoutError:
                return
            except ValueError:  # the line is longer than MAX_REQUEST: cannot resync
                self._bad(pid, "request too large")
                await self._send(
                    writer, _error("too_large", f"request longer than {MAX_REQUEST} bytes")
                )
                return
            if not line:
                return  # EOF
            if not line.strip():
                continue
            await self._send(writer, await self._dispatch(line, pid))

    async def _dispatch(self, line: bytes, pid: int) -> dict[str, Any]:
        try:
            command, args = parse_request(line)
            handler = self.handlers.get(command)
            if handler is None:
                raise ControlError(
                    "unknown_command",
                    f"unknown command {command[:40]!r}; known: {', '.join(sorted(self.handlers))}",
                )
            result = await handler(args)
        except ControlError as exc:
            self._bad(pid, exc.message)
            return _error(exc.code, exc.message)
        except Exception as exc:  # a handler bug must not take the daemon down
            log.exception("control: %s failed", line[:60])
            return _error("internal", f"{type(exc).__name__}: {exc}")
        return {"version": PROTOCOL_VERSION, "ok": True, "result": result}

    def _bad(self, pid: int, what: str) -> None:
        self.bad_requests += 1
        self._ratelog.warning(f"bad:{pid}", "control: bad request from pid %d: %s", pid, what)

    async def _send(self, writer: asyncio.StreamWriter, response: dict[str, Any]) -> None:
        # Large snapshots are encoded off the loop so packets keep flowing meanwhile.
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(None, _encode, response)
        writer.write(data)
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)


def _encode(response: dict[str, Any]) -> bytes:
    return json.dumps(response, separators=(",", ":"), default=str).encode() + b"\n"


def _answers(path: Path) -> bool:
    """True if something accepts connections on the unix socket ``path``."""
    if not path.is_socket():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError as exc:
            # ECONNREFUSED: stale file of a dead process. EAGAIN: live but busy.
            return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    return True


# -- client ---------------------------------------------------------------------------


class ControlClient:
    """A blocking client (for the CLI): one connection, any number of requests."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except OSError:
            self.sock.close()
            raise
        self._buf = b""

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def request(self, command: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one request; return its result or raise ControlError / OSError."""
        req = {"version": PROTOCOL_VERSION, "command": command, "args": args or {}}
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        reply = self._read_line()
        try:
            msg = json.loads(reply)
        except ValueError:
            raise ControlError("bad_response", "the daemon's answer is not JSON") from None
        if not isinstance(msg, dict):
            raise ControlError("bad_response", "the daemon's answer is not a JSON object")
        if not msg.get("ok"):
            err = msg.get("error") or {}
            raise ControlError(str(err.get("code", "error")), str(err.get("message", "failed")))
        result = msg.get("result")
        if not isinstance(result, dict):
            raise ControlError("bad_response", "the daemon's answer has no result object")
        return result

    def _read_line(self) -> bytes:
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_RESPONSE:
                raise ControlError("bad_response", "answer too large")
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("the daemon closed the control connection")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line


def request(
    name_or_path: str | Path,
    command: str,
    args: dict[str, Any] | None = None,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """One request to an instance (by name, or by socket path)."""
    path = Path(name_or_path) if "/" in str(name_or_path) else socket_path(str(name_or_path))
    with ControlClient(path, timeout) as client:
        return client.request(command, args)
