"""TCP segment coalescing for TUN writes (masqued.host.coalesce).

The model: what the kernel does with a super-packet (GSO segmentation, written out
here from the virtio_net_hdr rules) must give back exactly the packets that were
coalesced, for any mix of flows, sizes, flags, gaps and options.
"""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from masqued.host.coalesce import (
    MAX_IP_LEN,
    MAX_SEGMENTS,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VNET_HDR,
    VNET_HDR_LEN,
    coalesce,
)
from masqued.proto.packet import (
    PROTO_TCP,
    build_ipv4,
    build_ipv6,
    build_udp,
    internet_checksum,
    pseudo_header_sum,
)

ACK, PSH, FIN, SYN = 0x10, 0x08, 0x01, 0x02
C4, T4 = "198.18.200.2", "198.19.0.2"
C6, T6 = "2001:db8:200::2", "2001:db8:1::2"


def tcp(
    src: str,
    dst: str,
    payload: bytes,
    *,
    seq: int,
    sport: int = 40000,
    dport: int = 5201,
    flags: int = ACK,
    ack: int = 1000,
    window: int = 502,
    options: bytes = b"",
    ident: int = 0,
    df: bool = True,
    tos: int = 0,
    ttl: int = 64,
) -> bytes:
    """An IPv4/IPv6 TCP segment with valid checksums."""
    assert len(options) % 4 == 0
    doff = 5 + len(options) // 4
    seg = bytearray(
        sport.to_bytes(2, "big")
        + dport.to_bytes(2, "big")
        + (seq & 0xFFFFFFFF).to_bytes(4, "big")
        + ack.to_bytes(4, "big")
        + bytes((doff << 4, flags))
        + window.to_bytes(2, "big")
        + b"\0\0\0\0"
        + options
        + payload
    )
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    seg[16:18] = internet_checksum(
        seg, pseudo_header_sum(s.packed, d.packed, PROTO_TCP, len(seg))
    ).to_bytes(2, "big")
    if s.version == 4:
        return build_ipv4(s, d, PROTO_TCP, bytes(seg), ttl, ident=ident, dont_fragment=df, tos=tos)
    return build_ipv6(s, d, PROTO_TCP, bytes(seg), ttl)


def segment(iov: list[bytes | memoryview]) -> list[bytes]:
    """What the kernel makes of one write: the packet, or the GSO segments."""
    raw = b"".join(bytes(part) for part in iov)
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack(
        raw[:VNET_HDR_LEN]
    )
    pkt = raw[VNET_HDR_LEN:]
    if gso_type == VIRTIO_NET_HDR_GSO_NONE:
        assert flags == 0
        return [pkt]
    assert flags == VIRTIO_NET_HDR_F_NEEDS_CSUM
    v4 = gso_type == VIRTIO_NET_HDR_GSO_TCPV4
    assert gso_type in (VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6)
    hl = 20 if v4 else 40
    assert csum_start == hl and csum_offset == 16
    # The super-packet's own headers are consistent.
    if v4:
        assert int.from_bytes(pkt[2:4], "big") == len(pkt)
        assert internet_checksum(pkt[:20]) == 0
        src, dst = pkt[12:16], pkt[16:20]
    else:
        assert int.from_bytes(pkt[4:6], "big") == len(pkt) - 40
        src, dst = pkt[8:24], pkt[24:40]
    partial = int.from_bytes(pkt[hl + 16 : hl + 18], "big")
    assert partial == pseudo_header_sum(src, dst, PROTO_TCP, len(pkt) - hl)
    headers, payload = bytearray(pkt[:hdr_len]), pkt[hdr_len:]
    seq0 = int.from_bytes(headers[hl + 4 : hl + 8], "big")
    ident0 = int.from_bytes(headers[4:6], "big")
    out = []
    chunks = [payload[i : i + gso_size] for i in range(0, len(payload), gso_size)]
    assert len(chunks) >= 2
    for i, chunk in enumerate(chunks):
        h = bytearray(headers)
        h[hl + 4 : hl + 8] = ((seq0 + i * gso_size) & 0xFFFFFFFF).to_bytes(4, "big")
        if i < len(chunks) - 1:
            h[hl + 13] &= ~(PSH | FIN)
        total = hdr_len + len(chunk)
        if v4:
            h[2:4] = total.to_bytes(2, "big")
            h[4:6] = ((ident0 + i) & 0xFFFF).to_bytes(2, "big")
            h[10:12] = b"\0\0"
            h[10:12] = internet_checksum(h[:20]).to_bytes(2, "big")
        else:
            h[4:6] = (total - 40).to_bytes(2, "big")
        t = bytearray(h[hl:]) + chunk
        t[16:18] = b"\0\0"
        t[16:18] = internet_checksum(t, pseudo_header_sum(src, dst, PROTO_TCP, len(t))).to_bytes(
            2, "big"
        )
        out.append(bytes(h[:hl]) + bytes(t))
    return out


def replay(packets: list[bytes]) -> list[bytes]:
    plan = coalesce(packets)
    assert sum(count for _, count in plan) == len(packets)
    out = []
    for iov, count in plan:
        segs = segment(iov)
        assert len(segs) == count
        out += segs
    return out


# Packets that may belong to any TCP flow: an IPv4 fragment, IPv6 with a hop-by-hop
# header. Nothing may be moved across them.
OPAQUE = [
    build_ipv4(C4, T4, PROTO_TCP, b"f" * 64, more_fragments=True),
    build_ipv6(C6, T6, 0, b"h" * 16),
]


def flow_of(pkt: bytes) -> bytes:
    return pkt[12:24] if pkt[0] >> 4 == 4 else pkt[8:44]


def df_id_free(pkt: bytes) -> bytes:
    """With DF set the IPv4 ID means nothing (RFC 6864) and segmenting renumbers it:
    compare such packets without ID and header checksum."""
    if pkt[0] >> 4 == 4 and pkt[6] & 0x40:
        return pkt[:4] + b"\0\0" + pkt[6:10] + b"\0\0" + pkt[12:]
    return pkt


OPAQUE_FREE = [df_id_free(p) for p in OPAQUE]


def assert_same_per_flow(got: list[bytes], sent: list[bytes]) -> None:
    """Everything came back; each flow in its order, and nothing crossed a packet
    whose flow cannot be told (OPAQUE)."""
    got, sent = [df_id_free(p) for p in got], [df_id_free(p) for p in sent]
    assert sorted(got) == sorted(sent)
    for key in {flow_of(p) for p in sent}:
        assert [p for p in got if flow_of(p) == key] == [p for p in sent if flow_of(p) == key]

    def barriers(pkts: list[bytes]) -> list[int]:
        return [i for i, p in enumerate(pkts) if p in OPAQUE_FREE]

    for i, j in zip(barriers(sent), barriers(got), strict=True):
        assert sorted(got[:j]) == sorted(sent[:i])


def stream(src: str, dst: str, sizes: list[int], seq: int = 1, **kw: object) -> list[bytes]:
    """Consecutive segments of one flow, IPv4 IDs counting up as a sender does."""
    out = []
    for i, n in enumerate(sizes):
        out.append(tcp(src, dst, bytes([seq & 0xFF]) * n, seq=seq, ident=i, **kw))  # type: ignore[arg-type]
        seq += n
    return out


def test_a_run_of_full_segments_becomes_one_write() -> None:
    pkts = stream(C4, T4, [1248] * 10 + [300], options=b"\x01\x01\x08\x0a" + bytes(8))
    plan = coalesce(pkts)
    assert [count for _, count in plan] == [11]
    flags, gso_type, hdr_len, gso_size, _, _ = VNET_HDR.unpack(bytes(plan[0][0][0]))
    assert (flags, gso_type, hdr_len, gso_size) == (
        VIRTIO_NET_HDR_F_NEEDS_CSUM,
        VIRTIO_NET_HDR_GSO_TCPV4,
        20 + 32,
        1248,
    )
    assert replay(pkts) == pkts


def test_ipv6_runs_coalesce_too() -> None:
    pkts = stream(C6, T6, [1228] * 5)
    plan = coalesce(pkts)
    assert [count for _, count in plan] == [5]
    assert VNET_HDR.unpack(bytes(plan[0][0][0]))[1] == VIRTIO_NET_HDR_GSO_TCPV6
    assert replay(pkts) == pkts


def test_what_must_not_merge_is_written_alone() -> None:
    base = stream(C4, T4, [1000, 1000])

    def second(**kw: object) -> bytes:
        args: dict[str, object] = {"seq": 1001, "ident": 1, **kw}
        return tcp(C4, T4, b"x" * int(args.pop("size", 1000)), **args)  # type: ignore[arg-type]

    ts = b"\x01\x01\x08\x0a"
    cases = {
        "gap in sequence": [base[0], second(seq=5000)],
        "other ack": [base[0], second(ack=2000)],
        "other window": [base[0], second(window=9)],
        "other options": [
            tcp(C4, T4, b"x" * 1000, seq=1, options=ts + bytes(8)),
            second(options=ts + b"\1" * 8),
        ],
        "FIN": [base[0], second(flags=ACK | FIN)],
        "SYN": [tcp(C4, T4, b"x" * 1000, seq=1, flags=SYN), base[1]],
        "ECN mark": [base[0], second(tos=3)],
        "other TTL": [base[0], second(ttl=9)],
        "other DF": [base[0], second(df=False)],
        "bigger than the first": [base[0], second(size=1001)],
        "after a short one": [
            tcp(C4, T4, b"x" * 1000, seq=1),
            second(size=500),
            tcp(C4, T4, b"x" * 1000, seq=1501, ident=2),
        ],
        "after PSH": [tcp(C4, T4, b"x" * 1000, seq=1, flags=ACK | PSH), base[1]],
        "no DF, IDs not consecutive": [
            tcp(C4, T4, b"x" * 1000, seq=1, df=False),
            second(ident=3, df=False),
        ],
        "pure ACKs": [tcp(C4, T4, b"", seq=1), tcp(C4, T4, b"", seq=1, ident=1)],
    }
    for why, pkts in cases.items():
        expected = [2, 1] if why == "after a short one" else [1, 1]
        assert [count for _, count in coalesce(pkts)] == expected, why
        assert replay(pkts) == pkts, why


def test_psh_and_a_short_tail_end_the_super_packet() -> None:
    pkts = [
        *stream(C4, T4, [1000, 1000]),
        tcp(C4, T4, b"p" * 1000, seq=2001, flags=ACK | PSH, ident=2),
        tcp(C4, T4, b"q" * 1000, seq=3001, ident=3),
        tcp(C4, T4, b"q" * 1000, seq=4001, ident=4),
    ]
    assert [count for _, count in coalesce(pkts)] == [3, 2]
    assert replay(pkts) == pkts


def test_non_df_with_consecutive_ids_merges() -> None:
    pkts = [
        tcp(C4, T4, b"x" * 1000, seq=1 + i * 1000, df=False, ident=(65534 + i) & 0xFFFF)
        for i in range(4)
    ]
    assert [count for _, count in coalesce(pkts)] == [4]
    assert replay(pkts) == pkts


def test_df_segments_merge_whatever_their_ids() -> None:
    pkts = [tcp(C4, T4, b"x" * 1000, seq=1 + i * 1000, ident=0) for i in range(4)]
    assert [count for _, count in coalesce(pkts)] == [4]
    assert_same_per_flow(replay(pkts), pkts)


def test_limits_segments_and_size() -> None:
    many = stream(C4, T4, [100] * (MAX_SEGMENTS + 5))
    assert [count for _, count in coalesce(many)] == [MAX_SEGMENTS, 5]
    big = stream(C4, T4, [1400] * 60)
    plan = coalesce(big)
    assert all(sum(len(bytes(p)) for p in iov) - VNET_HDR_LEN <= MAX_IP_LEN for iov, _ in plan)
    assert replay(big) == big


def test_interleaved_flows_each_coalesce_and_keep_their_order() -> None:
    a = stream(C4, T4, [1000] * 6, sport=1)
    b = stream(C4, T4, [1000] * 6, sport=2, seq=777)
    udp = build_udp(C4, T4, 53, 53, b"q" * 50)
    pkts = [p for pair in zip(a, b, strict=True) for p in pair] + [udp]
    assert sorted(count for _, count in coalesce(pkts)) == [1, 6, 6]
    assert_same_per_flow(replay(pkts), pkts)


def test_sequence_numbers_wrap() -> None:
    pkts = stream(C4, T4, [1000] * 4, seq=0xFFFFFFFF - 1500)
    assert [count for _, count in coalesce(pkts)] == [4]
    assert replay(pkts) == pkts


def test_garbage_and_odd_packets_pass_through_untouched() -> None:
    odd = [
        b"",
        b"\x45",
        b"\x60" + bytes(10),
        bytes(40),
        b"\x46" + bytes(59),  # IPv4 with options
        tcp(C4, T4, b"x" * 100, seq=1)[:-1],  # total length lies
    ]
    plan = coalesce(odd)
    assert [count for _, count in plan] == [1] * len(odd)
    assert [b"".join(bytes(p) for p in iov)[VNET_HDR_LEN:] for iov, _ in plan] == odd


@st.composite
def batches(draw: st.DrawFn) -> list[bytes]:
    flows = []
    for i in range(draw(st.integers(1, 3))):
        v6 = draw(st.booleans())
        src, dst = (C6, T6) if v6 else (C4, T4)
        mss = draw(st.sampled_from([1, 7, 536, 1000, 1448]))
        seq = draw(st.integers(0, 0xFFFFFFFF))
        ident = draw(st.integers(0, 0xFFFF))
        df = draw(st.booleans())
        opts = draw(st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(8)]))
        pkts = []
        for _ in range(draw(st.integers(1, 20))):
            kind = draw(
                st.sampled_from(
                    ["full", "full", "full", "short", "psh", "gap", "ack", "opt", "ttl", "fin"]
                )
            )
            size = draw(st.integers(0, mss)) if kind in ("short", "ack") else mss
            if kind == "gap":
                seq += draw(st.integers(1, 5000))
            flags = ACK | {"psh": PSH, "fin": FIN}.get(kind, 0)
            options = opts if kind != "opt" else b"\x01\x01\x01\x01" + opts
            pkts.append(
                tcp(
                    src,
                    dst,
                    bytes([len(pkts) & 0xFF]) * size,
                    seq=seq,
                    sport=1000 + i,
                    flags=flags,
                    options=options,
                    ident=ident,
                    df=df,
                    ttl=63 if kind == "ttl" else 64,
                )
            )
            seq = (seq + size) & 0xFFFFFFFF
            ident = (ident + draw(st.sampled_from([1, 1, 1, 2]))) & 0xFFFF
        flows.append(pkts)
    # Interleave the flows in a random order, each keeping its own order, with now
    # and then a UDP packet or an OPAQUE one.
    others = [build_udp(C4, T4, 53, 53, b"q" * 20), *OPAQUE]
    out: list[bytes] = []
    while any(flows):
        if draw(st.integers(0, 9)) == 0:
            out.append(draw(st.sampled_from(others)))
        f = draw(st.sampled_from([f for f in flows if f]))
        out.append(f.pop(0))
    return out


@settings(max_examples=300, deadline=None)
@given(batches())
def test_segmenting_the_plan_gives_back_every_packet(pkts: list[bytes]) -> None:
    assert_same_per_flow(replay(pkts), pkts)
