"""RFC 9484 §4.7 capsule values: byte vectors, every MUST, round trips, garbage."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import time
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from masqued.proto.capsule import (
    ADDRESS_ASSIGN,
    ADDRESS_REQUEST,
    ROUTE_ADVERTISEMENT,
    CapsuleDecoder,
)
from masqued.proto.connect_ip import (
    AddressAssign,
    AddressRequest,
    AssignedAddress,
    IPRange,
    RequestedAddress,
    RouteAdvertisement,
    decode_address_assign,
    decode_address_request,
    decode_datagram_payload,
    decode_route_advertisement,
    encode_address_assign,
    encode_address_request,
    encode_ip_datagram,
    encode_route_advertisement,
    ranges_for,
    rejection,
)
from masqued.proto.errors import CapsuleError


def value_of(capsule: bytes) -> tuple[int, bytes]:
    (cap,) = CapsuleDecoder().feed(capsule)
    return cap.type, cap.value


# --- RFC 9484 §8 examples ----------------------------------------------------------------


def test_rfc_figure15_full_tunnel_vectors() -> None:
    req = encode_address_request([RequestedAddress(1, IPv4Network("0.0.0.0/32"))])
    assert req == bytes.fromhex("02 07 01 04 00000000 20")
    assert decode_address_request(value_of(req)[1]) == AddressRequest(
        (RequestedAddress(1, IPv4Network("0.0.0.0/32")),)
    )
    assign = encode_address_assign([AssignedAddress(1, IPv4Network("192.0.2.11/32"))])
    assert assign == bytes.fromhex("01 07 01 04 c000020b 20")
    routes = encode_route_advertisement(
        [IPRange(IPv4Address("0.0.0.0"), IPv4Address("255.255.255.255"), 0)]
    )
    assert routes == bytes.fromhex("03 0a 04 00000000 ffffffff 00")
    decoded = decode_route_advertisement(value_of(routes)[1])
    assert decoded.networks() == (IPv4Network("0.0.0.0/0"),)


def test_rfc_figure16_split_tunnel_vectors() -> None:
    ranges = [
        IPRange(IPv4Address("192.0.2.0"), IPv4Address("192.0.2.41")),
        IPRange(IPv4Address("192.0.2.43"), IPv4Address("192.0.2.255")),
    ]
    wire = encode_route_advertisement(ranges)
    assert wire == bytes.fromhex("03 14 04 c0000200 c0000229 00 04 c000022b c00002ff 00")
    assert decode_route_advertisement(value_of(wire)[1]).ranges == tuple(ranges)
    assign = encode_address_assign([AssignedAddress(0, IPv4Network("192.0.2.42/32"))])
    assert assign == bytes.fromhex("01 07 00 04 c000022a 20")


def test_ipv6_prefix_and_rejection_vectors() -> None:
    wire = encode_address_assign(
        [AssignedAddress(7, IPv6Network("2001:db8::/64")), rejection(9, 4), rejection(10, 6)]
    )
    expected = (
        "07 06 20010db8000000000000000000000000 40"
        "09 04 00000000 20"
        "0a 06 00000000000000000000000000000000 80"
    )
    assert value_of(wire) == (ADDRESS_ASSIGN, bytes.fromhex(expected))
    got = decode_address_assign(bytes.fromhex(expected))
    assert [a.is_rejection for a in got.addresses] == [False, True, True]
    assert got.usable() == (IPv6Network("2001:db8::/64"),)


def test_empty_address_assign_withdraws_everything() -> None:
    assert encode_address_assign([]) == b"\x01\x00"
    assert decode_address_assign(b"") == AddressAssign(())


# --- every MUST -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("decoder", "value", "reason"),
    [
        (decode_address_assign, "00 05 c0000201 20", "IP version 5"),
        (decode_address_assign, "00 04 c0000201 21", "prefix length 33"),
        (decode_address_assign, "00 06" + "00" * 16 + "81", "prefix length 129"),
        (decode_address_assign, "00 04 c0000201 18", "host bits"),
        (decode_address_assign, "00 04 c00002", "truncated"),
        (decode_address_assign, "00 04 c0000201 20 ff", "truncated"),  # trailing byte
        (decode_address_assign, "40", "truncated"),
        (decode_address_request, "", "empty ADDRESS_REQUEST"),
        (decode_address_request, "00 04 00000000 20", "request ID 0"),
        (decode_address_request, "01 04 00000000 20 01 06" + "00" * 16 + "80", "reuses"),
        (decode_address_request, "01 04 0a000001 10", "host bits"),
        (decode_address_request, "01 07 00000000 20", "IP version 7"),
        (decode_route_advertisement, "04 c0000209 c0000201 00", "start > end"),
        (decode_route_advertisement, "06" + "00" * 32, "truncated"),
        (decode_route_advertisement, "05 00000000 ffffffff 00", "IP version 5"),
        (
            decode_route_advertisement,
            "06" + "00" * 32 + "00" + "04 00000000 ffffffff 00",
            "ordered by IP version",
        ),
        (
            decode_route_advertisement,
            "04 00000001 00000002 11 04 00000005 00000006 06",
            "ordered by IP protocol",
        ),
        (
            decode_route_advertisement,
            "04 00000001 00000005 00 04 00000005 00000009 00",
            "overlap or are not in ascending order",
        ),
        (
            decode_route_advertisement,
            "04 00000006 00000009 00 04 00000001 00000005 00",
            "overlap or are not in ascending order",
        ),
        (
            decode_route_advertisement,
            "04 00000001 00000009 00 04 00000005 00000006 11",
            "overlaps an all-protocol range",
        ),
    ],
)
def test_every_must_is_checked(decoder: object, value: str, reason: str) -> None:
    with pytest.raises(CapsuleError) as err:
        decoder(bytes.fromhex(value))  # type: ignore[operator]
    assert reason in err.value.reason


def test_adjacent_ranges_and_mixed_protocols_are_fine() -> None:
    value = bytes.fromhex(
        "04 00000001 00000004 00 04 00000005 00000009 00 04 0000000a 0000000b 11"
        "06" + "00" * 15 + "01" + "ff" * 16 + "00"
    )
    got = decode_route_advertisement(value)
    assert [r.ipproto for r in got.ranges] == [0, 0, 17, 0]


def test_encoders_refuse_what_decoders_reject() -> None:
    with pytest.raises(ValueError):
        encode_address_request([])
    with pytest.raises(ValueError):
        encode_address_request([RequestedAddress(0, IPv4Network("0.0.0.0/32"))])
    with pytest.raises(ValueError):
        encode_route_advertisement(
            [
                IPRange(IPv4Address("10.0.0.0"), IPv4Address("10.0.0.9")),
                IPRange(IPv4Address("10.0.0.5"), IPv4Address("10.0.0.20")),
            ]
        )
    with pytest.raises(ValueError):
        encode_route_advertisement([IPRange(IPv4Address("10.0.0.9"), IPv4Address("10.0.0.1"))])


def test_datagram_payload() -> None:
    assert encode_ip_datagram(b"\x45pkt") == b"\x00\x45pkt"
    assert decode_datagram_payload(b"\x00\x45pkt") == (0, b"\x45pkt")
    assert decode_datagram_payload(b"\x40\x05rest") == (5, b"rest")
    assert decode_datagram_payload(b"\x00") == (0, b"")
    with pytest.raises(CapsuleError):
        decode_datagram_payload(b"")
    with pytest.raises(CapsuleError):
        decode_datagram_payload(b"\x80\x00")


def test_ranges_for_merges_sorts_and_round_trips() -> None:
    nets = [
        IPv4Network("198.19.1.0/24"),
        IPv6Network("2001:db8:19::/64"),
        IPv4Network("198.19.0.0/24"),
        IPv4Network("198.19.0.128/25"),
        IPv4Network("10.0.0.0/8"),
    ]
    ranges = ranges_for(nets)
    assert [(str(r.start), str(r.end)) for r in ranges] == [
        ("10.0.0.0", "10.255.255.255"),
        ("198.19.0.0", "198.19.1.255"),
        ("2001:db8:19::", "2001:db8:19:0:ffff:ffff:ffff:ffff"),
    ]
    wire = encode_route_advertisement(ranges)
    back = decode_route_advertisement(value_of(wire)[1])
    assert back.networks() == (
        IPv4Network("10.0.0.0/8"),
        IPv4Network("198.19.0.0/23"),
        IPv6Network("2001:db8:19::/64"),
    )


# --- properties ---------------------------------------------------------------------------

v4_prefixes = st.builds(
    lambda a, n: IPv4Network((a, n), strict=False), st.integers(0, 2**32 - 1), st.integers(0, 32)
)
v6_prefixes = st.builds(
    lambda a, n: IPv6Network((a, n), strict=False), st.integers(0, 2**128 - 1), st.integers(0, 128)
)
prefixes = st.one_of(v4_prefixes, v6_prefixes)


@given(st.lists(st.tuples(st.integers(0, 2**62 - 1), prefixes), max_size=20))
def test_address_assign_round_trip(entries: list[tuple[int, IPv4Network | IPv6Network]]) -> None:
    assigned = [AssignedAddress(i, p) for i, p in entries]
    t, value = value_of(encode_address_assign(assigned))
    assert t == ADDRESS_ASSIGN
    assert decode_address_assign(value).addresses == tuple(assigned)


@given(st.lists(prefixes, min_size=1, max_size=20), st.integers(1, 2**40))
def test_address_request_round_trip(nets: list[IPv4Network | IPv6Network], first: int) -> None:
    reqs = [RequestedAddress(first + i, p) for i, p in enumerate(nets)]
    t, value = value_of(encode_address_request(reqs))
    assert t == ADDRESS_REQUEST
    assert decode_address_request(value).requests == tuple(reqs)


@given(st.lists(prefixes, max_size=30), st.integers(0, 255))
def test_route_advertisement_round_trip(nets: list[IPv4Network | IPv6Network], proto: int) -> None:
    ranges = ranges_for(nets, proto)
    t, value = value_of(encode_route_advertisement(ranges))
    assert t == ROUTE_ADVERTISEMENT
    got = decode_route_advertisement(value)
    assert got == RouteAdvertisement(ranges)
    covered = set()
    for net in got.networks():
        covered.add(net)
    for net in nets:
        assert any(net.version == c.version and net.subnet_of(c) for c in covered)  # type: ignore[arg-type]


DECODERS = (decode_address_assign, decode_address_request, decode_route_advertisement)


@given(st.binary(max_size=400))
def test_any_bytes_decode_or_raise_capsule_error(blob: bytes) -> None:
    for decode in DECODERS:
        with contextlib.suppress(CapsuleError):
            decode(blob)
    with contextlib.suppress(CapsuleError):
        decode_datagram_payload(blob)


def fuzz_budget() -> float:
    """Seconds of random fuzzing: MASQUED_FUZZ_SECONDS, else 20 s in CI, 2 s locally."""
    default = "20" if os.environ.get("CI") == "true" else "2"
    return float(os.environ.get("MASQUED_FUZZ_SECONDS", default))


def test_time_bounded_random_fuzz_of_capsule_values() -> None:
    """Mutations of valid values for MASQUED_FUZZ_SECONDS (default 2 s)."""
    budget = fuzz_budget()
    seed = int(os.environ.get("MASQUED_FUZZ_SEED", "0")) or random.randrange(1 << 30)
    rng = random.Random(seed)
    seeds = [
        value_of(encode_address_assign([AssignedAddress(3, IPv6Network("2001:db8::/48"))]))[1],
        value_of(encode_address_request([RequestedAddress(1, IPv4Network("0.0.0.0/32"))]))[1],
        value_of(
            encode_route_advertisement(
                ranges_for([ipaddress.ip_network("198.19.0.0/24"), IPv6Network("::/0")])
            )
        )[1],
    ]
    deadline = time.monotonic() + budget
    runs = 0
    while time.monotonic() < deadline or runs < 500:
        blob = bytearray(rng.choice(seeds) * rng.randrange(1, 4))
        for _ in range(rng.randrange(1, 5)):
            op = rng.randrange(3)
            if op == 0 and blob:
                blob[rng.randrange(len(blob))] = rng.randrange(256)
            elif op == 1 and blob:
                del blob[rng.randrange(len(blob))]
            else:
                blob.insert(rng.randrange(len(blob) + 1), rng.randrange(256))
        for decode in DECODERS:
            with contextlib.suppress(CapsuleError):
                decode(bytes(blob))
        runs += 1
    assert runs >= 500, seed


def test_ranges_contain() -> None:
    r = IPRange(IPv4Address("10.0.0.0"), IPv4Address("10.0.0.255"), 17)
    assert IPv4Address("10.0.0.7") in r
    assert IPv4Address("10.0.1.0") not in r
    assert IPv6Address("::1") not in r
