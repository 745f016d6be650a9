"""sd_notify, watchdog, STATUS and journald field mapping, without systemd.

The notify socket is a real AF_UNIX datagram socket in tmp_path (as systemd's);
timers run on a fake scheduler that keeps its pending callbacks.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from masqued.runtime import service
from masqued.runtime.service import (
    Notifier,
    StatusReporter,
    Watchdog,
    client_fields,
    format_uptime,
    read_reload_result,
    watchdog_interval,
    write_reload_result,
)


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)

    def messages(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(65536).decode())
            except BlockingIOError:
                return out


@pytest.fixture
def notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    ns = NotifySocket(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(ns.path))
    yield ns
    ns.sock.close()


class FakeHandle:
    def __init__(self, sched: FakeScheduler, when: float, cb: Callable[[], None]) -> None:
        self.sched, self.when, self.cb = sched, when, cb

    def cancel(self) -> None:
        if self in self.sched.pending:
            self.sched.pending.remove(self)


class FakeScheduler:
    """Keeps pending callbacks; ``advance`` moves its clock and runs what is due."""

    def __init__(self) -> None:
        self.now = 0.0
        self.pending: list[FakeHandle] = []

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeHandle:
        handle = FakeHandle(self, self.now + delay, callback)
        self.pending.append(handle)
        return handle

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while True:
            due = sorted((h for h in self.pending if h.when <= end), key=lambda h: h.when)
            if not due:
                break
            h = due[0]
            self.pending.remove(h)
            self.now = h.when
            h.cb()
        self.now = end


# -- sd_notify ---------------------------------------------------------------------------


def test_lifecycle_messages_in_order(notify: NotifySocket) -> None:
    n = Notifier()
    assert n.enabled
    n.status("starting")
    n.ready("relay: 0 clients, pool 0/254 used")
    n.reloading()
    n.ready("relay: 1 clients, pool 1/254 used")
    n.stopping()
    n.close()
    got = notify.messages()
    assert got[:3] == [
        "STATUS=starting",
        "READY=1\nSTATUS=relay: 0 clients, pool 0/254 used",
        got[2],
    ]
    lines = got[2].split("\n")
    assert lines[0] == "RELOADING=1"
    assert lines[1].startswith("MONOTONIC_USEC=") and int(lines[1].split("=")[1]) > 0
    assert got[3:] == ["READY=1\nSTATUS=relay: 1 clients, pool 1/254 used", "STOPPING=1"]


def test_abstract_socket_name(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"masqued-test-{id(monkeypatch)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        n = Notifier("@" + name)
        n.stopping()
        assert sock.recv(100) == b"STOPPING=1"
    finally:
        sock.close()


def test_without_notify_socket_nothing_happens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    n.ready("x")
    n.watchdog()  # no error, nothing to send to


def test_vanished_socket_is_not_fatal(notify: NotifySocket) -> None:
    n = Notifier()
    notify.path.unlink()
    n.status("still fine")  # logged at debug, not raised


# -- watchdog --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "junk"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "x"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env, pid=4242) == expected


def test_watchdog_pings_from_the_loop_at_half_the_interval(notify: NotifySocket) -> None:
    sched = FakeScheduler()
    wd = Watchdog(Notifier(), watchdog_interval({"WATCHDOG_USEC": "4000000"}, pid=1))
    wd.start(sched)
    assert notify.messages() == ["WATCHDOG=1"]  # at once, then every 2 s
    sched.advance(1.9)
    assert notify.messages() == []
    sched.advance(0.1)
    assert notify.messages() == ["WATCHDOG=1"]
    sched.advance(6.0)
    assert notify.messages() == ["WATCHDOG=1"] * 3
    assert wd.sent == 5
    wd.stop()
    sched.advance(100)
    assert notify.messages() == []
    assert sched.pending == []


def test_watchdog_off_without_usec_or_socket(
    notify: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    sched = FakeScheduler()
    Watchdog(Notifier(), None).start(sched)
    monkeypatch.delenv("NOTIFY_SOCKET")
    Watchdog(Notifier(), 1.0).start(sched)
    assert sched.pending == []
    assert notify.messages() == []


async def test_watchdog_on_a_real_event_loop(notify: NotifySocket) -> None:
    wd = Watchdog(Notifier(), 0.01)
    wd.start(asyncio.get_running_loop())
    for _ in range(500):  # bounded: the loop runs the pings while we yield to it
        if wd.sent >= 3:
            break
        await asyncio.sleep(0.01)
    wd.stop()
    assert wd.sent >= 3
    msgs = notify.messages()
    assert len(msgs) == wd.sent and set(msgs) == {"WATCHDOG=1"}


# -- STATUS ------------------------------------------------------------------------------


def test_status_sent_on_change_and_refreshed(notify: NotifySocket) -> None:
    sched = FakeScheduler()
    state = {"clients": 0}
    rep = StatusReporter(Notifier(), lambda: f"relay: {state['clients']} clients", period=60)
    rep.start(sched)
    rep.ready()
    rep.update()  # unchanged: nothing sent
    state["clients"] = 3
    rep.update()
    sched.advance(59)
    assert notify.messages() == ["READY=1\nSTATUS=relay: 0 clients", "STATUS=relay: 3 clients"]
    state["clients"] = 2
    sched.advance(1)  # the periodic refresh notices
    assert notify.messages() == ["STATUS=relay: 2 clients"]
    rep.stop()
    assert sched.pending == []


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (42.9, "42s"), (60, "1m"), (3599, "59m"), (7200, "2h"), (7500, "2h 5m"),
     (86400, "1d"), (3 * 86400 + 4 * 3600 + 59, "3d 4h"), (-5, "0s")],
)  # fmt: skip
def test_format_uptime(seconds: float, text: str) -> None:
    assert format_uptime(seconds) == text


# -- reload results ----------------------------------------------------------------------


def test_reload_result_roundtrip(tmp_path: Path) -> None:
    assert read_reload_result(tmp_path) is None
    write_reload_result(tmp_path, 1, False, "x.conf: invalid key 'routes_typo'")
    got = read_reload_result(tmp_path)
    assert got is not None
    assert (got["seq"], got["ok"], got["message"]) == (
        1,
        False,
        "x.conf: invalid key 'routes_typo'",
    )
    write_reload_result(tmp_path, 2, True, "reloaded")
    got = read_reload_result(tmp_path)
    assert got is not None and (got["seq"], got["ok"]) == (2, True)
    write_reload_result(None, 3, True, "no runtime directory: nothing written")
    (tmp_path / service.RELOAD_RESULT_FILE).write_text("{not json")
    assert read_reload_result(tmp_path) is None


# -- journald fields -----------------------------------------------------------------------


class KeptJournal:
    """Stands in for systemd.journal.send: keeps every entry as a dict of fields."""

    def __init__(self) -> None:
        self.entries: list[dict[str, str]] = []

    def __call__(self, text: str, /, **fields: Any) -> None:
        entry = {"MESSAGE": text}
        # journald keeps only valid field names (upper case, digits, '_')
        entry.update(
            {k: str(v) for k, v in fields.items() if k.isupper() and not k.startswith("_")}
        )
        self.entries.append(entry)


@pytest.fixture
def journal() -> Iterator[tuple[KeptJournal, logging.Logger]]:
    pytest.importorskip("systemd.journal")
    kept = KeptJournal()
    handler = service.journal_handler("relay", "relay", sender=kept)
    assert handler is not None
    logger = logging.getLogger("masqued.test-journal")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield kept, logger
    logger.removeHandler(handler)


def test_journal_fields_of_every_record(journal: tuple[KeptJournal, logging.Logger]) -> None:
    kept, logger = journal
    logger.warning("relay %s listening", "relay")
    (e,) = kept.entries
    assert e["MESSAGE"] == "relay relay listening"
    assert e["MASQUED_INSTANCE"] == "relay"
    assert e["MASQUED_ROLE"] == "relay"
    assert e["SYSLOG_IDENTIFIER"] == "masqued"
    assert e["PRIORITY"] == "4"
    assert "MASQUED_CLIENT" not in e


def test_journal_client_fields_from_extra(journal: tuple[KeptJournal, logging.Logger]) -> None:
    kept, logger = journal
    logger.info("session opened", extra=client_fields("198.18.1.11:53211", "198.18.200.2"))
    logger.info(
        "closed", extra=client_fields("[2001:db8:1::b]:443", "198.18.200.3,2001:db8:200::3")
    )
    a, b = kept.entries
    assert (a["MASQUED_CLIENT"], a["MASQUED_ADDRESS"]) == ("198.18.1.11", "198.18.200.2")
    assert (b["MASQUED_CLIENT"], b["MASQUED_ADDRESS"]) == (
        "2001:db8:1::b",
        "198.18.200.3,2001:db8:200::3",
    )
    assert a["PRIORITY"] == "6"


def test_journal_fields_of_an_authenticated_session(
    journal: tuple[KeptJournal, logging.Logger],
) -> None:
    kept, logger = journal
    fields = client_fields("198.18.1.11:53211", "198.18.200.2", "alice", "198.18.1.11:53211#0")
    logger.info("session opened", extra=fields)
    (e,) = kept.entries
    assert e["MASQUED_CLIENT"] == "alice"  # the identity, not the address
    assert e["MASQUED_PEER"] == "198.18.1.11"
    assert e["MASQUED_SESSION"] == "198.18.1.11:53211#0"
    assert e["MASQUED_ADDRESS"] == "198.18.200.2"


def test_setup_logging_falls_back_to_stderr(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        monkeypatch.delenv("INVOCATION_ID", raising=False)
        handler = service.setup_logging("info", "relay", "relay")
        assert isinstance(handler, logging.StreamHandler)
        logging.getLogger("masqued").info("hello", extra=client_fields("198.18.1.2:1", "x"))
        assert "INFO masqued[relay] masqued: hello" in capsys.readouterr().err
        # Asked for the journal but without systemd-python: still stderr.
        monkeypatch.setattr(service, "journal_handler", lambda *a, **k: None)
        handler = service.setup_logging("debug", "c", "client", journal=True)
        assert isinstance(handler, logging.StreamHandler)
        assert handler.formatter is not None
        assert handler.formatter._fmt == "%(levelname)s %(name)s: %(message)s"
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_stderr_is_journal_matches_device_and_inode(tmp_path: Path) -> None:
    import os
    import sys

    st = os.fstat(sys.stderr.fileno())
    assert service.stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert not service.stderr_is_journal({"JOURNAL_STREAM": "1:2"})
    assert not service.stderr_is_journal({})


def test_notify_never_blocks_when_nobody_reads(tmp_path: Path) -> None:
    """A full notify socket (nobody reading) drops messages instead of stalling the
    daemon: the kernel queues only net.unix.max_dgram_qlen (10) datagrams."""
    import threading

    path = tmp_path / "full.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    notifier = Notifier(str(path))
    done = threading.Event()

    def flood() -> None:
        for i in range(200):
            notifier.status(f"update {i}")
        done.set()

    worker = threading.Thread(target=flood, daemon=True)
    worker.start()
    worker.join(10)
    assert done.is_set(), "sd_notify blocked on a full socket"
    first = receiver.recv(4096).decode()
    assert first == "STATUS=update 0"
    receiver.close()
    notifier.close()


def test_freeze_startup_objects_takes_them_out_of_later_collections() -> None:
    import gc

    from masqued.runtime.service import freeze_startup_objects

    made_at_startup = [[i] for i in range(1000)]
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() >= len(made_at_startup)
        # What a full collection walks afterwards no longer holds them.
        tracked = {id(o) for o in gc.get_objects()}
        assert not any(id(o) in tracked for o in made_at_startup)
    finally:
        gc.unfreeze()
