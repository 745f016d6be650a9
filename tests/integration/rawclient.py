"""A hand-driven CONNECT-IP stream-mode client on plain aioquic, for misbehaviour tests.

It does not use masqued's transport code, so it can do what a broken or hostile
client would. Run inside a client namespace:

    rawclient.py HOST PORT CA malformed   -> sends a zero-length frame; prints "reset 0x.."
    rawclient.py HOST PORT CA spoof       -> sends a UDP packet with a spoofed source and
                                             one with its real source; prints what came back
    rawclient.py HOST PORT CA reach DST.. -> sends a UDP packet ("reach-DST") and an ICMP
                                             echo to each DST; prints what came back
                                             (unlike masqued's client it sends anywhere)
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
import sys

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent, StreamReset

from masqued.proto.packet import build_icmp_echo, build_udp, parse_packet


class Raw(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.headers: asyncio.Future[list[tuple[bytes, bytes]]] = (
            asyncio.get_event_loop().create_future()
        )
        self.reset: asyncio.Future[int] = asyncio.get_event_loop().create_future()
        self.data = bytearray()
        self.got_data = asyncio.Event()

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamReset) and not self.reset.done():
            self.reset.set_result(event.error_code)
        for ev in self.h3.handle_event(event):
            if isinstance(ev, HeadersReceived) and not self.headers.done():
                self.headers.set_result(ev.headers)
            elif isinstance(ev, DataReceived):
                self.data += ev.data
                self.got_data.set()


def frames(buf: bytearray) -> list[bytes]:
    out = []
    while len(buf) >= 2:
        (n,) = struct.unpack("!H", buf[:2])
        if len(buf) < 2 + n:
            break
        out.append(bytes(buf[2 : 2 + n]))
        del buf[: 2 + n]
    return out


async def main(host: str, port: int, ca: str, mode: str, dsts: list[str]) -> None:
    config = QuicConfiguration(alpn_protocols=H3_ALPN, is_client=True, server_name="relay.example")
    config.load_verify_locations(cafile=ca)
    async with connect(host, port, configuration=config, create_protocol=Raw) as client:
        assert isinstance(client, Raw)
        sid = client._quic.get_next_available_stream_id()
        client.h3.send_headers(
            sid,
            [
                (b":method", b"CONNECT"),
                (b":protocol", b"connect-ip"),
                (b":scheme", b"https"),
                (b":authority", b"relay.example:%d" % port),
                (b":path", b"/.well-known/masque/ip/*/*/"),
                (b"masqued-transport", b"stream"),
            ],
        )
        client.transmit()
        headers = dict(await asyncio.wait_for(client.headers, 5))
        status = headers[b":status"].decode()
        print("status", status, flush=True)
        if status != "200":
            return
        mine = [a.strip().split("/")[0] for a in headers[b"masqued-address"].decode().split(",")]
        addr = mine[0]
        if mode == "malformed":
            client.h3.send_data(sid, b"\x00\x00", end_stream=False)
            client.transmit()
            code = await asyncio.wait_for(client.reset, 5)
            print(f"reset {code:#x}", flush=True)
        elif mode == "spoof":
            spoofed = build_udp("198.18.200.99", "198.19.0.2", 40000, 5202, b"spoofed-payload")
            legit = build_udp(addr, "198.19.0.2", 40001, 5202, b"legit-payload")
            for pkt in (spoofed, legit):
                client.h3.send_data(sid, struct.pack("!H", len(pkt)) + pkt, end_stream=False)
            client.transmit()
            await asyncio.wait_for(client.got_data.wait(), 5)
            await asyncio.sleep(0.5)
            for pkt in frames(client.data):
                dst = ipaddress.ip_address(pkt[16:20])
                print("received", dst, pkt[28:].decode(errors="replace"), flush=True)
        elif mode == "reach":
            for dst in dsts:
                version = ipaddress.ip_address(dst).version
                src = next(a for a in mine if ipaddress.ip_address(a).version == version)
                for pkt in (
                    build_udp(src, dst, 40000, 5202, f"reach-{dst}".encode()),
                    build_icmp_echo(src, dst, 7, 1, b"reach"),
                ):
                    client.h3.send_data(sid, struct.pack("!H", len(pkt)) + pkt, end_stream=False)
            client.transmit()
            await asyncio.sleep(2)
            for pkt in frames(client.data):
                info = parse_packet(pkt)
                if info.proto in (1, 58):
                    quoted = pkt[info.header_len + 8 :]
                    about = ""
                    if info.icmp_type in (3, 1):  # destination unreachable: whose packet
                        about = str(parse_packet(quoted).dst)
                    print(f"icmp {info.src} {info.icmp_type}/{info.icmp_code} {about}", flush=True)
                else:
                    print(f"udp {info.src} {pkt[info.header_len + 8 :].decode(errors='replace')}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]))
