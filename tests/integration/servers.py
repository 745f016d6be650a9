"""Servers run in the target namespace of the lab.

TCP 5201: reads an 8-byte big-endian length N, then N bytes; answers
"<sha256 hex> <peer address>\\n". TCP 8080 and 8081: the same (for ACL tests).
UDP 5202: answers each datagram with "<peer address> " + the datagram.
All sockets are dual-stack ([::] with IPV6_V6ONLY off).
"""

from __future__ import annotations

import hashlib
import socket
import struct
import threading


def peer_ip(addr: tuple[str, ...]) -> str:
    host = addr[0]
    return host[7:] if host.startswith("::ffff:") else host


def serve_tcp_conn(conn: socket.socket, addr: tuple[str, ...]) -> None:
    with conn:
        conn.settimeout(60)
        header = b""
        while len(header) < 8:
            chunk = conn.recv(8 - len(header))
            if not chunk:
                return
            header += chunk
        (n,) = struct.unpack("!Q", header)
        h = hashlib.sha256()
        got = 0
        while got < n:
            chunk = conn.recv(min(65536, n - got))
            if not chunk:
                return
            h.update(chunk)
            got += len(chunk)
        conn.sendall(f"{h.hexdigest()} {peer_ip(addr)}\n".encode())


def tcp_server(port: int) -> None:
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port))
    s.listen(64)
    while True:
        conn, addr = s.accept()
        threading.Thread(target=serve_tcp_conn, args=(conn, addr), daemon=True).start()


def udp_server(port: int) -> None:
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    while True:
        data, addr = s.recvfrom(65535)
        print("udp", peer_ip(addr), data[:64].decode(errors="replace"), flush=True)
        s.sendto(peer_ip(addr).encode() + b" " + data, addr)


def main() -> None:
    threads = [threading.Thread(target=udp_server, args=(5202,), daemon=True)]
    for port in (8080, 8081):
        threads.append(threading.Thread(target=tcp_server, args=(port,), daemon=True))
    for t in threads:
        t.start()
    tcp_server(5201)


if __name__ == "__main__":
    main()
