"""Issue 14: a reload that fails for any reason still answers systemd (READY=1 after
RELOADING=1) and logs the error. A real Instance on a real event loop, a real
SIGHUP, and a notify socket in tmp_path."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from pathlib import Path

import pytest

from masqued.config import load_config
from masqued.runtime.instance import Instance
from masqued.runtime.service import Notifier


def relay_conf(certs: Path, extra: str = "") -> str:
    return (
        'mode = "relay"\n'
        f'certificate = "{certs / "relay.example.pem"}"\n'
        f'private_key = "{certs / "relay.example.key"}"\n'
        'pool = ["198.18.200.0/24"]\n' + extra
    )


class Notify:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.lines: list[str] = []

    def read(self) -> list[str]:
        while True:
            try:
                self.lines += self.sock.recv(65536).decode().split("\n")
            except BlockingIOError:
                return self.lines


async def _sighup(notify: Notify) -> list[str]:
    os.kill(os.getpid(), signal.SIGHUP)
    for _ in range(100):
        await asyncio.sleep(0.01)
        lines = notify.read()
        if "READY=1" in lines:
            break
    return notify.read()


def _answered(lines: list[str]) -> bool:
    """RELOADING=1, then READY=1 after it."""
    if "RELOADING=1" not in lines:
        return False
    return "READY=1" in lines[lines.index("RELOADING=1") :]


@pytest.mark.parametrize("where", ["after reread", "before reread"])
async def test_a_reload_that_raises_still_answers_systemd(
    certs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    path = tmp_path / "relay.conf"
    path.write_text(relay_conf(certs))
    notify = Notify(tmp_path / "notify")
    inst = Instance(load_config(path), Notifier(str(tmp_path / "notify")))

    def reload() -> None:
        if where == "after reread":
            inst.reread()
        raise RuntimeError("something unexpected")

    inst.install_signals(reload)
    try:
        with caplog.at_level(logging.ERROR):
            lines = await _sighup(notify)
        assert _answered(lines), lines
        assert "reload failed: something unexpected" in caplog.text
        assert lines.count("RELOADING=1") == 1
    finally:
        inst.remove_signals()
        notify.sock.close()


async def test_an_invalid_acl_protocol_on_reload_is_a_rejected_config(
    certs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "relay.conf"
    path.write_text(relay_conf(certs))
    notify = Notify(tmp_path / "notify")
    inst = Instance(load_config(path), Notifier(str(tmp_path / "notify")))
    path.write_text(
        relay_conf(certs, 'acl_default = "deny"\n[clients.a]\nacl = ["allow 198.19.0.0/24 ²"]\n')
    )
    def reload() -> None:
        inst.reread()  # as the daemon's reload starts; the rejection is its answer

    inst.install_signals(reload)
    try:
        with caplog.at_level(logging.ERROR):
            lines = await _sighup(notify)
        assert _answered(lines), lines
        assert f"{path}: clients.a: acl:" in caplog.text and "protocol" in caplog.text
    finally:
        inst.remove_signals()
        notify.sock.close()
