"""A one-name DNS server for the lab (dnspython messages), run in a lab namespace.

    dnsserver.py ADDR NAME IPV4   -> answers A NAME with IPV4 on ADDR:53 (udp), nothing
                                     else (NOERROR, empty); prints "query NAME TYPE from SRC"
"""

from __future__ import annotations

import socket
import sys

import dns.message
import dns.rdatatype
import dns.rrset


def main(addr: str, name: str, ipv4: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((addr, 53))
    print("listening", flush=True)
    while True:
        data, peer = sock.recvfrom(4096)
        try:
            query = dns.message.from_wire(data)
        except Exception as exc:  # a test helper: say what came, keep serving
            print(f"bad query from {peer[0]}: {exc}", flush=True)
            continue
        question = query.question[0]
        qname = question.name.to_text()
        print(f"query {qname} {dns.rdatatype.to_text(question.rdtype)} from {peer[0]}", flush=True)
        answer = dns.message.make_response(query)
        if qname.rstrip(".") == name and question.rdtype == dns.rdatatype.A:
            answer.answer.append(dns.rrset.from_text(qname, 5, "IN", "A", ipv4))
        sock.sendto(answer.to_wire(), peer)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
