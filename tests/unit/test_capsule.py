"""RFC 9297 capsule framing: varints, the incremental decoder, its bounds and errors."""

from __future__ import annotations

import os
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from masqued.proto.capsule import (
    ADDRESS_ASSIGN,
    DATAGRAM,
    ROUTE_ADVERTISEMENT,
    VARINT_MAX,
    Capsule,
    CapsuleDecoder,
    decode_varint,
    encode_capsule,
    encode_datagram_capsule,
    encode_varint,
    varint_size,
)
from masqued.proto.errors import H3_MESSAGE_ERROR, CapsuleError

# RFC 9000 §A.1 sample varints, including a non-minimal encoding of 37.
RFC9000_VARINTS = [
    (bytes.fromhex("c2197c5eff14e88c"), 151288809941952652),
    (bytes.fromhex("9d7f3e7d"), 494878333),
    (bytes.fromhex("7bbd"), 15293),
    (bytes.fromhex("25"), 37),
    (bytes.fromhex("4025"), 37),
]


@pytest.mark.parametrize(("raw", "value"), RFC9000_VARINTS)
def test_rfc9000_varint_samples(raw: bytes, value: int) -> None:
    assert decode_varint(raw) == (value, len(raw))
    assert decode_varint(raw[:-1]) is None


def test_varint_encoding_is_minimal_and_bounded() -> None:
    assert encode_varint(0) == b"\x00"
    assert encode_varint(63) == b"\x3f"
    assert encode_varint(64) == b"\x40\x40"
    assert encode_varint(16383) == b"\x7f\xff"
    assert encode_varint(16384) == b"\x80\x00\x40\x00"
    assert encode_varint(VARINT_MAX) == b"\xff" * 8
    with pytest.raises(ValueError):
        encode_varint(VARINT_MAX + 1)
    with pytest.raises(ValueError):
        encode_varint(-1)


@given(st.integers(0, VARINT_MAX))
def test_varint_round_trip(value: int) -> None:
    raw = encode_varint(value)
    assert len(raw) == varint_size(value)
    assert decode_varint(raw + b"junk") == (value, len(raw))


def test_capsule_byte_vectors() -> None:
    # DATAGRAM capsule with Context ID 0 and a 3-byte payload.
    assert encode_datagram_capsule(b"\x00abc") == b"\x00\x04\x00abc"
    # RFC 9484 Figure 15 ADDRESS_ASSIGN: Request ID 1, IPv4 192.0.2.11/32.
    value = bytes.fromhex("0104c000020b20")
    assert encode_capsule(ADDRESS_ASSIGN, value) == b"\x01\x07" + value
    dec = CapsuleDecoder()
    assert dec.feed(b"\x01\x07" + value) == [Capsule(ADDRESS_ASSIGN, value)]
    # Empty capsule value is legal framing.
    assert CapsuleDecoder().feed(b"\x03\x00") == [Capsule(ROUTE_ADVERTISEMENT, b"")]
    # Non-minimal type and length encodings are accepted.
    assert CapsuleDecoder().feed(b"\x40\x01\x40\x02hi") == [Capsule(ADDRESS_ASSIGN, b"hi")]


def test_unknown_capsules_are_skipped_without_buffering() -> None:
    dec = CapsuleDecoder(max_value=16)
    huge = encode_varint(0x2ABC) + encode_varint(10_000_000)
    assert dec.feed(huge + b"x" * 1000) == []
    assert dec.buffered == 0 and dec.skipped == 1
    rest = 10_000_000 - 1000
    while rest:
        chunk = min(rest, 1 << 20)
        assert dec.feed(b"y" * chunk) == []
        assert dec.buffered == 0
        rest -= chunk
    assert dec.feed(encode_capsule(ADDRESS_ASSIGN, b"ok")) == [Capsule(ADDRESS_ASSIGN, b"ok")]
    dec.end()


def test_oversized_datagram_capsule_is_dropped_but_control_capsule_aborts() -> None:
    dec = CapsuleDecoder(max_value=100, max_datagram=10)
    out = dec.feed(encode_datagram_capsule(b"z" * 11) + encode_datagram_capsule(b"ok"))
    assert out == [Capsule(DATAGRAM, b"ok")]
    assert dec.oversized == 1
    with pytest.raises(CapsuleError) as err:
        dec.feed(encode_capsule(ADDRESS_ASSIGN, b"a" * 101))
    assert err.value.wire_code == H3_MESSAGE_ERROR
    assert dec.failed
    with pytest.raises(CapsuleError):
        dec.feed(b"")


def test_truncated_stream_is_an_error_at_end() -> None:
    dec = CapsuleDecoder()
    dec.feed(encode_capsule(ADDRESS_ASSIGN, b"abcd")[:-1])
    with pytest.raises(CapsuleError):
        dec.end()
    dec = CapsuleDecoder()
    dec.feed(b"\x40")  # half a header
    with pytest.raises(CapsuleError):
        dec.end()
    dec = CapsuleDecoder()
    dec.feed(encode_capsule(0x77, b"abcd")[:-1])  # inside a skipped capsule
    with pytest.raises(CapsuleError):
        dec.end()
    CapsuleDecoder().end()


capsule_types = st.sampled_from([0, 1, 2, 3, 4, 0x29, 0x1234, 0x3FFF_FFFF])
capsule_lists = st.lists(st.tuples(capsule_types, st.binary(max_size=300)), max_size=12)


def _expected(capsules: list[tuple[int, bytes]]) -> list[Capsule]:
    return [Capsule(t, v) for t, v in capsules if t in (0, 1, 2, 3)]


@given(capsule_lists, st.data())
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_any_split_gives_the_same_capsules(
    capsules: list[tuple[int, bytes]], data: st.DataObject
) -> None:
    wire = b"".join(encode_capsule(t, v) for t, v in capsules)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    dec = CapsuleDecoder()
    got: list[Capsule] = []
    prev = 0
    for cut in [*cuts, len(wire)]:
        got += dec.feed(wire[prev:cut])
        prev = cut
    assert got == _expected(capsules)
    dec.end()
    assert dec.buffered == 0


@given(capsule_lists)
def test_byte_by_byte_feeding(capsules: list[tuple[int, bytes]]) -> None:
    wire = b"".join(encode_capsule(t, v) for t, v in capsules)
    dec = CapsuleDecoder()
    got: list[Capsule] = []
    for i in range(len(wire)):
        got += dec.feed(wire[i : i + 1])
        assert dec.buffered <= 300 + 16
    assert got == _expected(capsules)
    dec.end()


@given(st.binary(max_size=2000), st.integers(1, 64))
def test_any_bytes_decode_or_raise_capsule_error(blob: bytes, step: int) -> None:
    """The h11 contract: garbage either parses or raises our protocol error."""
    for chunked in (False, True):
        dec = CapsuleDecoder(max_value=512, max_datagram=256)
        try:
            if chunked:
                for i in range(0, len(blob), step):
                    dec.feed(blob[i : i + step])
            else:
                dec.feed(blob)
            dec.end()
        except CapsuleError:
            pass
        assert dec.buffered <= 512 + 16


def fuzz_budget() -> float:
    """Seconds of random fuzzing: MASQUED_FUZZ_SECONDS, else 20 s in CI, 2 s locally."""
    default = "20" if os.environ.get("CI") == "true" else "2"
    return float(os.environ.get("MASQUED_FUZZ_SECONDS", default))


def test_time_bounded_random_fuzz() -> None:
    """Random mutations of valid capsule streams for a bounded time (CI: see README).

    MASQUED_FUZZ_SECONDS sets the budget (default 2 s); the seed is printed on failure.
    """
    budget = fuzz_budget()
    seed = int(os.environ.get("MASQUED_FUZZ_SEED", "0")) or random.randrange(1 << 30)
    rng = random.Random(seed)
    deadline = time.monotonic() + budget
    runs = 0
    while time.monotonic() < deadline or runs < 200:
        wire = bytearray(
            b"".join(
                encode_capsule(rng.choice([0, 1, 2, 3, 9]), rng.randbytes(rng.randrange(40)))
                for _ in range(rng.randrange(6))
            )
        )
        for _ in range(rng.randrange(4)):
            if wire:
                wire[rng.randrange(len(wire))] = rng.randrange(256)
        dec = CapsuleDecoder(max_value=64, max_datagram=32)
        try:
            pos = 0
            while pos < len(wire):
                step = rng.randrange(1, 20)
                for cap in dec.feed(bytes(wire[pos : pos + step])):
                    assert cap.type in (0, 1, 2, 3), seed
                pos += step
            dec.end()
        except CapsuleError:
            pass
        runs += 1
