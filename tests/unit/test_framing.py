"""Stream-mode framing: round trips under every chunking, errors, bounds."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from masqued.proto.errors import FramingError
from masqued.proto.framing import FrameDecoder, encode_frame, encode_frames

packets = st.lists(st.binary(min_size=1, max_size=300), max_size=20)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in [*points, len(data)]:
        out.append(data[last:p])
        last = p
    return out


def test_encode_frame_vector() -> None:
    assert encode_frame(b"\x45abc") == b"\x00\x04\x45abc"
    assert encode_frame(b"x" * 0x1234)[:2] == b"\x12\x34"
    assert encode_frames([b"a", b"bc"]) == b"\x00\x01a\x00\x02bc"
    assert encode_frames([]) == b""


@pytest.mark.parametrize("bad", [b"", b"x" * 65536])
def test_encode_rejects_unframeable(bad: bytes) -> None:
    with pytest.raises(ValueError):
        encode_frame(bad)
    with pytest.raises(ValueError):
        encode_frames([b"ok", bad])


def test_decoder_rejects_bad_limit() -> None:
    for bad in (0, -1, 65536):
        with pytest.raises(ValueError):
            FrameDecoder(bad)


@settings(deadline=None)
@given(packets)
def test_encode_frames_is_concatenation(pkts: list[bytes]) -> None:
    assert encode_frames(pkts) == b"".join(encode_frame(p) for p in pkts)


@settings(deadline=None)
@given(packets, st.lists(st.integers(min_value=0), max_size=30))
def test_round_trip_any_chunking(pkts: list[bytes], cuts: list[int]) -> None:
    data = encode_frames(pkts)
    decoder = FrameDecoder(300)
    got: list[bytes] = []
    for chunk in chunked(data, cuts):
        got += decoder.feed(chunk)
        assert decoder.buffered <= 302
    assert got == pkts
    assert decoder.buffered == 0


@settings(deadline=None)
@given(packets)
def test_round_trip_byte_by_byte(pkts: list[bytes]) -> None:
    data = encode_frames(pkts)
    decoder = FrameDecoder(300)
    got: list[bytes] = []
    for i in range(len(data)):
        got += decoder.feed(data[i : i + 1])
    assert got == pkts
    assert decoder.buffered == 0


@settings(deadline=None)
@given(packets, st.binary(max_size=301))
def test_partial_tail_is_buffered(pkts: list[bytes], tail_packet: bytes) -> None:
    """A trailing incomplete record yields nothing and is held, within the bound."""
    data = encode_frames(pkts)
    # A header announcing one byte more than follows (or half a header).
    tail = (len(tail_packet) + 1).to_bytes(2, "big") + tail_packet if tail_packet else b"\x00"
    decoder = FrameDecoder(302)
    assert decoder.feed(data + tail) == pkts
    assert decoder.buffered == len(tail)


def test_accepts_bytearray_and_memoryview() -> None:
    data = encode_frames([b"abc", b"de"])
    assert FrameDecoder(10).feed(bytearray(data)) == [b"abc", b"de"]
    assert FrameDecoder(10).feed(memoryview(data)) == [b"abc", b"de"]
    out = FrameDecoder(10).feed(memoryview(data))
    assert all(type(p) is bytes for p in out)


def test_empty_feed() -> None:
    decoder = FrameDecoder(10)
    assert decoder.feed(b"") == []
    decoder.feed(b"\x00")
    assert decoder.feed(b"") == []
    assert decoder.buffered == 1
    assert decoder.feed(b"\x02ab") == [b"ab"]


@pytest.mark.parametrize(
    "stream",
    [
        b"\x00\x00",
        b"\x00\x00rest",
        b"\x00\x0b" + b"x" * 11,  # one over the limit of 10
        b"\xff\xff",
        b"\x00\x01a\x00\x00",  # good record, then a zero length
    ],
)
def test_bad_length_fails_whole_and_split(stream: bytes) -> None:
    decoder = FrameDecoder(10)
    with pytest.raises(FramingError):
        decoder.feed(stream)
    assert decoder.failed
    with pytest.raises(FramingError):
        decoder.feed(b"\x00\x01a")
    # Byte by byte: the error appears as soon as the bad length is known.
    decoder = FrameDecoder(10)
    with pytest.raises(FramingError):
        for i in range(len(stream)):
            decoder.feed(stream[i : i + 1])
    with pytest.raises(FramingError):
        decoder.feed(b"")


def test_oversize_length_detected_before_payload() -> None:
    decoder = FrameDecoder(1500)
    with pytest.raises(FramingError):
        decoder.feed(b"\x05\xdd")  # 1501, no payload yet: fail, do not wait and buffer


def test_max_packet_exactly_is_ok() -> None:
    decoder = FrameDecoder(10)
    assert decoder.feed(encode_frame(b"y" * 10)) == [b"y" * 10]


@settings(deadline=None)
@given(
    st.one_of(
        st.binary(max_size=400),
        st.builds(
            lambda good, junk: encode_frames(good) + junk,
            st.lists(st.binary(min_size=1, max_size=70), max_size=6),
            st.binary(max_size=8),
        ),
    ),
    st.lists(st.integers(min_value=0), max_size=10),
)
def test_garbage_parses_or_raises_framing_error(data: bytes, cuts: list[int]) -> None:
    """h11 contract: any bytes, any split -> packets or FramingError, nothing else,
    and whole vs. split feeding agree."""

    def run(chunks: list[bytes]) -> tuple[list[bytes], bool]:
        decoder = FrameDecoder(64)
        got: list[bytes] = []
        try:
            for chunk in chunks:
                got += decoder.feed(chunk)
                assert decoder.buffered <= 66
        except FramingError:
            return got, True
        return got, False

    ref_pkts, ref_err = reference_decode(data, 64)
    whole_pkts, whole_err = run([data])
    split_pkts, split_err = run(chunked(data, cuts))
    assert whole_err == split_err == ref_err
    if ref_err:
        # Packets before the bad record may come out of earlier chunks.
        assert split_pkts == ref_pkts[: len(split_pkts)]
    else:
        assert whole_pkts == split_pkts == ref_pkts


def reference_decode(data: bytes, limit: int) -> tuple[list[bytes], bool]:
    """Obviously correct: walk the records of a complete stream."""
    out: list[bytes] = []
    pos = 0
    while len(data) - pos >= 2:
        length = int.from_bytes(data[pos : pos + 2], "big")
        if not 1 <= length <= limit:
            return out, True
        if pos + 2 + length > len(data):
            break
        out.append(data[pos + 2 : pos + 2 + length])
        pos += 2 + length
    return out, False


def test_a_chunk_of_many_records_decodes_without_buffering() -> None:
    """The hot path: whole records in one chunk are sliced out, nothing is kept."""
    pkts = [bytes([i]) * 1300 for i in range(50)]
    data = encode_frames(pkts)
    assert len(data) < 65536
    decoder = FrameDecoder(1500)
    for _ in range(2000):
        assert decoder.feed(data) == pkts
        assert decoder.buffered == 0


def test_split_records_hold_at_most_one_record() -> None:
    """A large record fed in small chunks is kept once, never more (no re-copying of
    what came before: the buffer only ever holds the record being completed)."""
    decoder = FrameDecoder(65535)
    record = encode_frame(b"z" * 65535)
    out: list[bytes] = []
    for _ in range(20):
        for i in range(0, len(record), 7):
            out += decoder.feed(record[i : i + 7])
            assert decoder.buffered <= len(record)
    assert out == [b"z" * 65535] * 20
    assert decoder.buffered == 0
