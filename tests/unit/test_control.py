"""masqued.observe.control: the control socket's protocol, permissions and robustness."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from masqued.observe import control
from masqued.observe.control import (
    MAX_REQUEST,
    ControlClient,
    ControlError,
    ControlServer,
    ControlSocketBusy,
    parse_request,
)


class Counter:
    """A handler with state, standing in for the daemon's status."""

    def __init__(self) -> None:
        self.calls = 0

    async def status(self, args: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        return {"calls": self.calls, "echo": args}

    async def broken(self, args: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("handler bug")


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ControlServer]:
    counter = Counter()
    srv = ControlServer(
        tmp_path / "run" / "inst.sock", {"status": counter.status, "broken": counter.broken}
    )
    await srv.start()
    yield srv
    await srv.close()


async def ask(path: Path, command: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    def go() -> dict[str, Any]:
        with ControlClient(path, timeout=5) as client:
            return client.request(command, args)

    return await asyncio.to_thread(go)


async def raw(path: Path, data: bytes, half_close: bool = True) -> bytes:
    """Send raw bytes, return everything the server answers until it closes or goes quiet."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(data)
    await writer.drain()
    if half_close:
        writer.write_eof()
    out = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 2):
            out += chunk
    except TimeoutError:
        pass
    writer.close()
    return out


def answers(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.splitlines() if line.strip()]


async def test_socket_is_0600_and_answers_hello_and_status(server: ControlServer) -> None:
    assert server.path.stat().st_mode & 0o777 == 0o600
    hello = await ask(server.path, "hello")
    assert hello["protocol"] == 1 and hello["pid"] == os.getpid()
    assert hello["commands"] == ["broken", "hello", "status"]
    assert await ask(server.path, "status", {"nat": False}) == {
        "calls": 1,
        "echo": {"nat": False},
    }


async def test_several_requests_on_one_connection(server: ControlServer) -> None:
    def go() -> list[int]:
        with ControlClient(server.path) as client:
            return [client.request("status")["calls"] for _ in range(5)]

    assert await asyncio.to_thread(go) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"not json", "bad_request"),
        (b"\xff\xfe\x00", "bad_request"),
        (b"[1, 2]", "bad_request"),
        (b'{"command": "status"}', "bad_request"),
        (b'{"version": true, "command": "status"}', "bad_request"),
        (b'{"version": 2, "command": "status"}', "unsupported_version"),
        (b'{"version": 1}', "bad_request"),
        (b'{"version": 1, "command": "status", "args": []}', "bad_request"),
        (b'{"version": 1, "command": "reboot"}', "unknown_command"),
        (b"[" * 2000 + b"]" * 2000, "bad_request"),  # deeper than json recurses
    ],
)
async def test_bad_requests_get_error_answers(
    server: ControlServer, line: bytes, code: str
) -> None:
    if len(line) > MAX_REQUEST:
        code = "too_large"
    got = answers(await raw(server.path, line + b"\n"))
    assert got[0]["ok"] is False and got[0]["version"] == 1
    assert got[0]["error"]["code"] == code
    # ... and the server still works.
    assert (await ask(server.path, "hello"))["protocol"] == 1


async def test_a_handler_bug_is_an_internal_error(server: ControlServer) -> None:
    with pytest.raises(ControlError) as info:
        await ask(server.path, "broken")
    assert info.value.code == "internal" and "handler bug" in info.value.message
    assert (await ask(server.path, "status"))["calls"] == 1


async def test_overlong_request_is_refused_and_the_connection_closed(
    server: ControlServer,
) -> None:
    data = await raw(server.path, b"x" * (MAX_REQUEST * 4) + b"\n", half_close=False)
    got = answers(data)
    assert [a["error"]["code"] for a in got] == ["too_large"]


async def test_random_garbage_never_breaks_the_server(server: ControlServer) -> None:
    rng = random.Random(7)
    pieces = [b"\n", b"{", b"}", b'"version"', b":", b"1", b"\x00", b"\xff", b"status", b" "]
    for _ in range(60):
        if rng.random() < 0.5:
            blob = rng.randbytes(rng.randrange(1, 3000))
        else:
            blob = b"".join(rng.choice(pieces) for _ in range(rng.randrange(1, 200)))
        data = await raw(server.path, blob)
        for line in data.splitlines():
            msg = json.loads(line)
            assert msg["version"] == 1 and isinstance(msg["ok"], bool)
    assert server.bad_requests > 0
    assert (await ask(server.path, "status"))["calls"] >= 1


async def test_peers_with_other_uids_are_refused(tmp_path: Path) -> None:
    """SO_PEERCRED is checked on top of the file mode (here: our uid is not allowed)."""
    srv = ControlServer(tmp_path / "x.sock", {}, allowed_uids=frozenset({os.geteuid() + 4242}))
    await srv.start()
    try:
        got = answers(await raw(srv.path, b'{"version": 1, "command": "hello"}\n'))
        assert got == [
            {
                "version": 1,
                "ok": False,
                "error": {"code": "forbidden", "message": "the control socket is for root only"},
            }
        ]
        assert srv.refused == 1
    finally:
        await srv.close()


def test_peer_credentials_of_a_socketpair() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        pid, uid, gid = control.peer_credentials(a)
    assert (pid, uid, gid) == (os.getpid(), os.geteuid(), os.getegid())


async def test_a_live_socket_is_not_taken_over_but_a_stale_one_is(tmp_path: Path) -> None:
    path = tmp_path / "inst.sock"
    first = ControlServer(path, {})
    await first.start()
    second = ControlServer(path, {})
    with pytest.raises(ControlSocketBusy):
        await second.start()
    assert (await ask(path, "hello"))["pid"] == os.getpid()
    await first.close()
    assert not path.exists()
    # A socket file nobody listens on (a crashed daemon's) is replaced.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    third = ControlServer(path, {})
    await third.start()
    assert (await ask(path, "hello"))["protocol"] == 1
    await third.close()


def test_run_dir_and_running_instances(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MASQUED_RUN_DIR", raising=False)
    assert control.socket_path("relay") == Path("/run/masqued/relay.sock")
    monkeypatch.setenv("MASQUED_RUN_DIR", str(tmp_path))
    assert control.socket_path("relay") == tmp_path / "relay.sock"
    for name in ("b", "a"):
        (tmp_path / f"{name}.sock").touch()
    (tmp_path / "other.txt").touch()
    assert control.running_instances() == ["a", "b"]
    monkeypatch.setenv("MASQUED_RUN_DIR", str(tmp_path / "missing"))
    assert control.running_instances() == []


def test_parse_request() -> None:
    assert parse_request(b'{"version": 1, "command": "status"}') == ("status", {})
    assert parse_request(b'{"version":1,"command":"x","args":{"a":1}}') == ("x", {"a": 1})


def test_client_rejects_bad_answers(tmp_path: Path) -> None:
    path = tmp_path / "fake.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    replies = [b"garbage\n", b"[1]\n", b'{"ok": true}\n', b""]
    with listener:
        for reply in replies:
            client = ControlClient(path, timeout=5)
            conn, _ = listener.accept()
            with conn, client:
                conn.sendall(reply)
                if not reply:
                    conn.close()
                with pytest.raises((ControlError, ConnectionError)):
                    client.request("status")


def test_socket_paths_under_systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sandboxed unit can only write its RuntimeDirectory=masqued/NAME: bind there,
    and let clients find it when NAME.sock is absent."""
    monkeypatch.setenv("MASQUED_RUN_DIR", str(tmp_path))
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "relay"))
    assert control.server_socket_path("relay") == tmp_path / "relay.sock"  # explicit dir wins
    monkeypatch.delenv("MASQUED_RUN_DIR")
    assert control.server_socket_path("relay") == tmp_path / "relay" / "control.sock"
    monkeypatch.setenv("MASQUED_RUN_DIR", str(tmp_path))
    assert control.socket_path("relay") == tmp_path / "relay.sock"
    (tmp_path / "relay").mkdir()
    (tmp_path / "relay" / "control.sock").touch()
    (tmp_path / "other").mkdir()
    assert control.socket_path("relay") == tmp_path / "relay" / "control.sock"
    assert control.running_instances() == ["relay"]


async def test_close_of_a_server_that_never_bound_leaves_the_file(tmp_path: Path) -> None:
    path = tmp_path / "someone-elses.sock"
    path.touch()
    await ControlServer(path, {}).close()
    assert path.exists()
