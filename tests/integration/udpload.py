"""UDP load for the datagram-loss benchmark, run inside lab namespaces.

    udpload.py sink PORT SECONDS            -> prints "received N" after SECONDS of quiet
                                               (or SECONDS in total, whichever first)
    udpload.py send HOST PORT COUNT PPS SIZE -> paced at PPS, prints "sent N"

Each datagram carries its sequence number; the sink counts distinct ones.
"""

from __future__ import annotations

import socket
import struct
import sys
import time


def sink(port: int, seconds: float) -> None:
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.bind(("::", port))
    s.settimeout(0.5)
    seen: set[int] = set()
    print("ready", flush=True)
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        try:
            data = s.recv(65535)
        except TimeoutError:
            if last is not None and time.monotonic() - last > 2.0:
                break
            continue
        last = time.monotonic()
        if len(data) >= 4:
            seen.add(struct.unpack("!I", data[:4])[0])
    print(f"received {len(seen)}", flush=True)


def send(host: str, port: int, count: int, pps: int, size: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    pad = b"x" * max(0, size - 4)
    start = time.monotonic()
    sent = 0
    for i in range(count):
        due = start + i / pps
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        try:
            s.sendto(struct.pack("!I", i) + pad, (host, port))
            sent += 1
        except OSError:
            pass
    print(f"sent {sent} in {time.monotonic() - start:.2f}s", flush=True)


def main() -> None:
    if sys.argv[1] == "sink":
        sink(int(sys.argv[2]), float(sys.argv[3]))
    else:
        send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))


if __name__ == "__main__":
    main()
