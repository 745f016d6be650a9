"""Traffic client for the lab, run inside a client namespace.

    traffic.py tcp HOST NBYTES [--port P] [--rate B/s]
                                            -> "ok <peer-as-seen-by-target> <Mbit/s>"
    traffic.py udp HOST COUNT [--port P]    -> "ok <peer-as-seen-by-target> <received>/<count>"

Exits non-zero with a message when the transfer fails or the checksum differs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import struct
import sys
import time


def tcp(host: str, port: int, nbytes: int, timeout: float, rate: float = 0.0) -> str:
    """Send NBYTES (at ``rate`` bytes per second if given: a long-lived flow) and
    compare the target's SHA-256 of them with ours."""
    payload = os.urandom(min(nbytes, 1 << 20 if not rate else 16 * 1024))
    h = hashlib.sha256()
    start = time.monotonic()
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(struct.pack("!Q", nbytes))
        sent = 0
        while sent < nbytes:
            chunk = payload[: min(len(payload), nbytes - sent)]
            s.sendall(chunk)
            h.update(chunk)
            sent += len(chunk)
            if rate:
                ahead = sent / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
        answer = b""
        while not answer.endswith(b"\n"):
            part = s.recv(256)
            if not part:
                break
            answer += part
    elapsed = time.monotonic() - start
    digest, _, peer = answer.decode().strip().partition(" ")
    if digest != h.hexdigest():
        raise SystemExit(f"checksum mismatch: sent {h.hexdigest()}, target saw {digest!r}")
    return f"ok {peer} {nbytes * 8 / elapsed / 1e6:.1f}"


def udp(host: str, port: int, count: int, timeout: float) -> str:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.settimeout(1.0)
    received = 0
    peer = "?"
    deadline = time.monotonic() + timeout
    for i in range(count):
        msg = f"req-{i}".encode()
        for _attempt in range(3):
            s.sendto(msg, (host, port))
            try:
                data, _ = s.recvfrom(2048)
            except TimeoutError:
                if time.monotonic() > deadline:
                    break
                continue
            who, _, echo = data.partition(b" ")
            if echo == msg:
                received += 1
                peer = who.decode()
                break
    if received < count:
        raise SystemExit(f"udp: only {received}/{count} answered")
    return f"ok {peer} {received}/{count}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["tcp", "udp"])
    p.add_argument("host")
    p.add_argument("amount", type=int)
    p.add_argument("--port", type=int)
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--rate", type=float, default=0.0, help="tcp: bytes per second")
    a = p.parse_args()
    try:
        if a.mode == "tcp":
            print(tcp(a.host, a.port or 5201, a.amount, a.timeout, a.rate))
        else:
            print(udp(a.host, a.port or 5202, a.amount, a.timeout))
    except OSError as exc:
        print(f"failed: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
