"""pre_up / post_up / pre_down / post_down: the operator's commands, as wg-quick runs them.

Each command goes to ``/bin/sh -c`` with ``%i`` replaced by the TUN name (``%%`` is
a literal ``%``), is logged as ``[#] COMMAND`` before it runs, has its output logged
line by line, and is killed after the timeout. ``run`` returns False when one failed
(the caller decides: a failing pre_up aborts the start, the others are logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

log = logging.getLogger("masqued")

MAX_OUTPUT = 64 * 1024  # logged of one command's output; the rest is cut


def expand(command: str, tun: str) -> str:
    """``%i`` -> the TUN name, ``%%`` -> ``%``."""
    out = []
    i = 0
    while i < len(command):
        c = command[i]
        if c == "%" and i + 1 < len(command) and command[i + 1] in "i%":
            out.append(tun if command[i + 1] == "i" else "%")
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


# The daemon's own channels to systemd are not the hook's to use.
_PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


def _env(tun: str, hook: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _PRIVATE_ENV}
    return {**env, "MASQUED_TUN": tun, "MASQUED_HOOK": hook}


async def run_one(hook: str, command: str, tun: str, timeout: float) -> bool:
    """Run one hook command; True if it exited 0 within ``timeout``."""
    text = expand(command, tun)
    log.info("[#] %s", text)
    try:
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            text,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # its own process group: a timeout kills all of it
            env=_env(tun, hook),
        )
    except OSError as exc:
        log.error("%s: cannot run %r: %s", hook, text, exc.strerror or exc)
        return False
    stdout = proc.stdout
    assert stdout is not None

    async def collect() -> bytes:
        kept = bytearray()
        while chunk := await stdout.read(65536):
            kept += chunk[: MAX_OUTPUT - len(kept)]  # the rest is read and dropped
        await proc.wait()
        return bytes(kept)

    try:
        output = await asyncio.wait_for(collect(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        log.error("%s: %r did not finish within %g s: killed", hook, text, timeout)
        return False
    for line in output.decode(errors="replace").splitlines():
        log.info("%s: %s", hook, line)
    if proc.returncode != 0:
        log.error("%s: %r failed with exit status %s", hook, text, proc.returncode)
        return False
    return True


async def run(hook: str, commands: tuple[str, ...], tun: str, timeout: float) -> bool:
    """Run ``commands`` in order, stopping at the first that fails; True if all passed."""
    for command in commands:
        if not await run_one(hook, command, tun, timeout):
            return False
    return True
