"""The segment format: round trips, ranged block reads, the footer from the tail, determinism,
caller mistakes, lying lengths, and a fuzzed decoder (random bytes, truncations, bit flips,
and bit flips with the checksums recomputed, so the structural checks are fuzzed too)."""

from __future__ import annotations

import functools
import hashlib
import os
import struct
import zlib
from collections.abc import Callable

import hypothesis
import pytest
import zstandard
from hypothesis import strategies as st

from appliance.segments.format import (
    BLOCK_HEAD,
    BLOCK_MAGIC,
    CRC,
    HEADER,
    MAX_BLOCK_RAW_BYTES,
    RECORD_HEAD,
    TRAILER,
    Block,
    BlockEntry,
    Record,
    SegmentCorrupt,
    SegmentWriter,
    decode_block,
    decode_directory,
    decode_segment,
    decode_trailer,
    encode_segment,
)

NAME = "segments/s3/2026-12-02/abc.seg"
FUZZ = hypothesis.settings(
    max_examples=200,
    deadline=None,
    derandomize=True,  # the same cases on every run: a failure is reproducible
    database=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)

Blocks = list[tuple[str, list[Record]]]


def records(conversation_seed: int, count: int, start: int = 1) -> list[Record]:
    base = 1_764_000_000_000 + conversation_seed
    return [
        Record(seq, base + seq * 7, b'{"body":"m%d","c":%d}' % (seq, conversation_seed))
        for seq in range(start, start + count)
    ]


def contents(blocks: list[Block]) -> Blocks:
    return [(b.entry.conversation, b.records) for b in blocks]


SAMPLE: Blocks = [
    ("c-alpha", records(1, 3)),
    ("c-beta", records(2, 1, start=41)),
    ("c-beta", records(2, 5, start=50)),  # a conversation may have several blocks, not overlapping
    ("c-gamma", [Record(7, 5, b""), Record(8, 4, b""), Record(9, 6, b"x")]),  # ts not monotonic
]
SAMPLE_DATA, SAMPLE_DIGEST = encode_segment(SAMPLE)
SAMPLE_ENTRIES = decode_directory(SAMPLE_DATA, len(SAMPLE_DATA), NAME)


def assert_corrupt(call: Callable[[], object], lo: int, hi: int) -> SegmentCorrupt:
    with pytest.raises(SegmentCorrupt) as info:
        call()
    assert info.value.name == NAME
    assert NAME in str(info.value)
    assert lo <= info.value.offset <= hi, (info.value.offset, lo, hi)
    assert f"byte {info.value.offset}" in str(info.value)
    return info.value


def test_round_trip_one_conversation() -> None:
    data, _ = encode_segment([("only", records(0, 10))])
    blocks = decode_segment(data, NAME)
    assert contents(blocks) == [("only", records(0, 10))]
    entry = blocks[0].entry
    assert (entry.offset, entry.count, entry.first_seq, entry.last_seq) == (HEADER.size, 10, 1, 10)
    assert (entry.min_ts, entry.max_ts) == (records(0, 10)[0].ts, records(0, 10)[-1].ts)


def test_round_trip_many_conversations() -> None:
    assert contents(decode_segment(SAMPLE_DATA, NAME)) == SAMPLE
    assert [e.conversation for e in SAMPLE_ENTRIES] == ["c-alpha", "c-beta", "c-beta", "c-gamma"]
    assert [(e.first_seq, e.last_seq) for e in SAMPLE_ENTRIES][1:3] == [(41, 41), (50, 54)]
    assert (SAMPLE_ENTRIES[3].min_ts, SAMPLE_ENTRIES[3].max_ts) == (4, 6)


def test_round_trip_empty_segment_and_unicode_conversation() -> None:
    data, _ = encode_segment([])
    assert decode_segment(data, NAME) == []
    data, _ = encode_segment([("é-ü:1", [Record(0, 0, b"\x00\xff")])])
    assert contents(decode_segment(data, NAME)) == [("é-ü:1", [Record(0, 0, b"\x00\xff")])]


def test_round_trip_large_and_empty_records() -> None:
    noise = os.urandom(3 * 1024 * 1024)  # incompressible
    big = [
        Record(1, 1, b""),
        Record(2, 2, noise),
        Record(3, 3, b"a" * (4 * 1024 * 1024)),
        Record(4, 4, b""),
    ]
    many = [Record(seq, seq, b"") for seq in range(1, 20_001)]
    data, _ = encode_segment([("big", big), ("many", many)])
    blocks = decode_segment(data, NAME)
    assert contents(blocks) == [("big", big), ("many", many)]
    assert len(data) < len(noise) + 1024 * 1024  # the compressible record did compress


def test_streaming_writer_equals_whole_object_and_digest() -> None:
    writer = SegmentWriter()
    parts = [writer.add_block(conversation, recs) for conversation, recs in SAMPLE]
    assert all(parts)  # each call emits its block at once (the first also the header)
    assert parts[0][: HEADER.size] == b"APPSEG\x01\x00"
    assert writer.size == len(b"".join(parts))
    tail = writer.finish()
    assert b"".join([*parts, tail]) == SAMPLE_DATA
    assert writer.digest == SAMPLE_DIGEST == hashlib.sha256(SAMPLE_DATA).hexdigest()
    assert writer.entries == SAMPLE_ENTRIES
    with pytest.raises(ValueError, match="finished"):
        writer.add_block("zzz", records(0, 1))


def test_deterministic_and_content_addressed() -> None:
    again, digest = encode_segment([(c, list(r)) for c, r in SAMPLE])
    assert (again, digest) == (SAMPLE_DATA, SAMPLE_DIGEST)
    changed = [*SAMPLE[:3], ("c-gamma", [Record(7, 5, b""), Record(8, 4, b""), Record(9, 6, b"y")])]
    assert encode_segment(changed)[1] != SAMPLE_DIGEST


def test_ranged_decode_of_each_block_alone() -> None:
    for entry, (conversation, recs) in zip(SAMPLE_ENTRIES, SAMPLE, strict=True):
        chunk = SAMPLE_DATA[entry.offset : entry.offset + entry.length]
        block = decode_block(chunk, NAME, entry.offset, expect=entry)
        assert block.entry == entry
        assert (block.entry.conversation, block.records) == (conversation, recs)
    first, second = SAMPLE_ENTRIES[1], SAMPLE_ENTRIES[2]
    chunk = SAMPLE_DATA[second.offset : second.offset + second.length]
    error = assert_corrupt(lambda: decode_block(chunk, NAME, second.offset, expect=first), 0, 10**9)
    assert "not the one indexed" in error.reason
    assert_corrupt(lambda: decode_block(chunk[:-1], NAME, 100), 100, 100 + len(chunk))


def test_directory_from_the_tail() -> None:
    size = len(SAMPLE_DATA)
    trailer = decode_trailer(SAMPLE_DATA[-TRAILER.size :], size, NAME)
    assert trailer.footer_offset == SAMPLE_ENTRIES[-1].offset + SAMPLE_ENTRIES[-1].length
    assert trailer.footer_offset + trailer.footer_length + TRAILER.size == size
    assert decode_directory(SAMPLE_DATA[-trailer.tail_size :], size, NAME) == SAMPLE_ENTRIES
    assert decode_directory(SAMPLE_DATA[-trailer.tail_size - 9 :], size, NAME) == SAMPLE_ENTRIES
    with pytest.raises(ValueError, match=f"need the last {trailer.tail_size} bytes"):
        decode_directory(SAMPLE_DATA[-trailer.tail_size + 1 :], size, NAME)
    # The same tail presented as the tail of a larger object points elsewhere: refused.
    assert_corrupt(lambda: decode_trailer(SAMPLE_DATA[-64:], size + 1, NAME), 0, size + 1)


def test_layout_is_the_one_documented() -> None:
    """An independent reader written from the tables of docs/segment-format.md alone."""
    data = SAMPLE_DATA
    assert data[:8] == b"APPSEG" + (1).to_bytes(2, "little")
    footer_offset, footer_length, footer_crc, trailer_crc = struct.unpack("<QIII", data[-24:-4])
    assert data[-4:] == b"AEND"
    assert trailer_crc == zlib.crc32(data[-24:-8])
    assert footer_offset + footer_length + 24 == len(data)
    footer = data[footer_offset : footer_offset + footer_length]
    assert zlib.crc32(footer) == footer_crc
    (entry_count,) = struct.unpack_from("<I", footer)
    pos, expected_offset, decoded = 4, 8, []
    for _ in range(entry_count):
        offset, length, count, first, last, min_ts, max_ts, n = struct.unpack_from(
            "<QIIQQQQH", footer, pos
        )
        conversation = footer[pos + 50 : pos + 50 + n].decode()
        pos += 50 + n
        assert offset == expected_offset
        block = data[offset : offset + length]
        assert block[:4] == b"ABLK"
        n2, reserved, count2, raw_length, z = struct.unpack_from("<HHIII", block, 4)
        assert (n2, reserved, count2, length) == (n, 0, count, 56 + n + z)
        assert struct.unpack_from("<QQQQ", block, 20) == (first, last, min_ts, max_ts)
        assert block[52 : 52 + n].decode() == conversation
        assert struct.unpack_from("<I", block, 52 + n + z)[0] == zlib.crc32(block[: 52 + n + z])
        raw = zstandard.ZstdDecompressor().decompress(block[52 + n : 52 + n + z])
        assert len(raw) == raw_length
        recs, at = [], 0
        while at < len(raw):
            seq, ts, p = struct.unpack_from("<QQI", raw, at)
            recs.append(Record(seq, ts, raw[at + 20 : at + 20 + p]))
            at += 20 + p
        decoded.append((conversation, recs))
        expected_offset = offset + length
    assert (pos, expected_offset) == (footer_length, footer_offset)
    assert decoded == SAMPLE


def test_writer_refuses_caller_mistakes() -> None:
    mistakes: list[Blocks] = [
        [("b", records(0, 2)), ("a", records(0, 2))],  # conversations descending
        [("a", records(0, 5)), ("a", records(0, 2, start=5))],  # overlapping seqs
        [("a", [Record(2, 0, b""), Record(2, 0, b"")])],  # seq repeated
        [("a", [])],
        [("", records(0, 1))],
        [("x" * 1025, records(0, 1))],
        [("a", [Record(-1, 0, b"")])],
        [("a", [Record(1, 1 << 64, b"")])],
    ]
    for blocks in mistakes:
        with pytest.raises(ValueError):  # noqa: PT011 - the rule differs per case
            encode_segment(blocks)


def forge_block(raw: bytes, count: int, seqs: tuple[int, int], *, size: int | None = None) -> bytes:
    """A block whose checksums are right but whose content lies."""
    packed = zstandard.ZstdCompressor(write_checksum=True).compress(raw)
    raw_len = len(raw) if size is None else size
    body = BLOCK_HEAD.pack(BLOCK_MAGIC, 1, 0, count, raw_len, len(packed), *seqs, 0, 0) + b"c"
    body += packed
    return body + CRC.pack(zlib.crc32(body))


ONE = RECORD_HEAD.pack(1, 0, 3) + b"abc"
LIES = {
    "raw size beyond the bound": forge_block(ONE, 1, (1, 1), size=MAX_BLOCK_RAW_BYTES + 23),
    "raw size disagrees with the frame": forge_block(ONE, 1, (1, 1), size=len(ONE) + 1),
    "record longer than the block": forge_block(RECORD_HEAD.pack(1, 0, 2**32 - 1), 1, (1, 1)),
    "seqs descending": forge_block(ONE + RECORD_HEAD.pack(0, 0, 0), 2, (1, 0)),
    "count beyond records": forge_block(ONE, 2, (1, 1)),
    "count short of records": forge_block(ONE + RECORD_HEAD.pack(2, 0, 0), 1, (1, 1)),
    "header seqs disagree": forge_block(ONE, 1, (1, 2)),
    "count of zero": forge_block(ONE, 0, (1, 1)),
}


def test_forged_block_with_true_contents_decodes() -> None:
    assert decode_block(forge_block(ONE, 1, (1, 1)), NAME).records == [Record(1, 0, b"abc")]


@pytest.mark.parametrize("lie", LIES)
def test_lying_lengths_and_contents_are_refused_before_allocation(lie: str) -> None:
    block = LIES[lie]
    assert_corrupt(lambda: decode_block(block, NAME, 1000), 1000, 1000 + len(block))


def test_frame_without_content_size_is_refused() -> None:
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(ONE)
    body = BLOCK_HEAD.pack(BLOCK_MAGIC, 1, 0, 1, len(ONE), len(no_size), 1, 1, 0, 0) + b"c"
    body += no_size
    assert_corrupt(lambda: decode_block(body + CRC.pack(zlib.crc32(body)), NAME), 0, len(body) + 4)


def test_header_and_version_are_checked() -> None:
    wrong_version = SAMPLE_DATA[:6] + struct.pack("<H", 2) + SAMPLE_DATA[8:]
    assert "version" in assert_corrupt(lambda: decode_segment(wrong_version, NAME), 0, 0).reason
    assert_corrupt(lambda: decode_segment(b"", NAME), 0, 0)


# Fuzzing: every case decodes to exactly the original or raises SegmentCorrupt naming the
# object and an offset inside it.
conversations = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=12)
record_lists = st.lists(
    st.tuples(st.integers(1, 1000), st.integers(0, 2**63), st.binary(max_size=40)),
    min_size=1,
    max_size=8,
)


@st.composite
def segment_contents(draw: st.DrawFn) -> Blocks:
    names = sorted(draw(st.sets(conversations, max_size=5)))
    blocks: Blocks = []
    for name in names:
        seq = draw(st.integers(0, 2**40))
        recs = []
        for gap, ts, payload in draw(record_lists):
            seq += gap
            recs.append(Record(seq, ts, payload))
        blocks.append((name, recs))
    return blocks


def decodes_to_original_or_corrupt(call: Callable[[], object], original: object, size: int) -> None:
    result, error = outcome(call)
    if error is None:
        assert result == original
    else:
        assert error.name == NAME
        assert NAME in str(error)
        assert 0 <= error.offset <= size


def outcome(call: Callable[[], object]) -> tuple[object, SegmentCorrupt | None]:
    try:
        return call(), None
    except SegmentCorrupt as exc:
        return None, exc


@FUZZ
@hypothesis.given(segment_contents())
def test_fuzz_round_trip(blocks: Blocks) -> None:
    data, digest = encode_segment(blocks)
    assert contents(decode_segment(data, NAME)) == blocks
    assert encode_segment(blocks) == (data, digest)


@FUZZ
@hypothesis.given(st.binary(max_size=400), st.integers(0, 500))
def test_fuzz_random_bytes(data: bytes, extra: int) -> None:
    for call in (
        lambda: decode_segment(data, NAME),
        lambda: decode_block(data, NAME),
        lambda: decode_directory(data, len(data) + extra, NAME),
        lambda: decode_segment(b"APPSEG\x01\x00" + data, NAME),
        lambda: decode_block(BLOCK_MAGIC + data, NAME),
    ):
        decodes_to_original_or_corrupt(call, None, len(data) + extra + 8)


@FUZZ
@hypothesis.given(segment_contents(), st.data())
def test_fuzz_truncations(blocks: Blocks, data: st.DataObject) -> None:
    whole, _ = encode_segment(blocks)
    entries = decode_directory(whole, len(whole), NAME)
    for cut in data.draw(st.lists(st.integers(0, len(whole) - 1), min_size=1, max_size=4)):
        assert_corrupt(functools.partial(decode_segment, whole[:cut], NAME), 0, len(whole))
    for e in entries:
        chunk = whole[e.offset : e.offset + e.length]
        cut = data.draw(st.integers(0, len(chunk) - 1))
        for part in (chunk[:cut], chunk[cut + 1 :]):  # a prefix, a suffix
            call = functools.partial(decode_block, part, NAME, e.offset)
            assert_corrupt(call, e.offset, e.offset + e.length)


def flip(data: bytes, bit: int) -> bytes:
    changed = bytearray(data)
    changed[bit // 8] ^= 1 << (bit % 8)
    return bytes(changed)


def reseal(data: bytes, entries: list[BlockEntry]) -> bytes:
    """Recompute every checksum at the places the original object had them."""
    out = bytearray(data)
    for e in entries:
        end = e.offset + e.length - CRC.size
        out[end : end + CRC.size] = CRC.pack(zlib.crc32(out[e.offset : end]))
    at = len(out) - TRAILER.size
    offset, length = struct.unpack_from("<QI", out, at)
    footer = out[offset : offset + length] if offset + length <= at else b""
    out[at + 12 : at + 16] = CRC.pack(zlib.crc32(footer))
    out[at + 16 : at + 20] = CRC.pack(zlib.crc32(out[at : at + 16]))
    return bytes(out)


@FUZZ
@hypothesis.given(segment_contents(), st.data())
def test_fuzz_bit_flips(blocks: Blocks, data: st.DataObject) -> None:
    whole, _ = encode_segment(blocks)
    original = decode_segment(whole, NAME)
    entries = [b.entry for b in original]
    footer = decode_trailer(whole, len(whole), NAME).footer_offset
    bits = data.draw(st.lists(st.integers(0, len(whole) * 8 - 1), min_size=1, max_size=2))
    bits.append(data.draw(st.integers(footer * 8, len(whole) * 8 - 1)))  # the directory
    if entries:  # a block's head
        e = data.draw(st.sampled_from(entries))
        bits.append(data.draw(st.integers(e.offset * 8, (e.offset + BLOCK_HEAD.size) * 8)))
    for bit in bits:
        for resealed in (False, True):
            changed = flip(whole, bit)
            if resealed:  # past the checksums: the structural checks alone must hold
                changed = reseal(changed, entries)
            else:
                assert_corrupt(functools.partial(decode_segment, changed, NAME), 0, len(whole))
            check_flipped(changed, original, resealed, data)


def check_flipped(
    changed: bytes, original: list[Block], resealed: bool, data: st.DataObject
) -> None:
    whole_size = len(changed)
    entries = [b.entry for b in original]
    decodes_to_original_or_corrupt(lambda: decode_segment(changed, NAME), original, whole_size)
    tail = changed[-data.draw(st.integers(TRAILER.size, whole_size - HEADER.size)) :]
    try:
        directory, error = outcome(lambda: decode_directory(tail, whole_size, NAME))
    except ValueError as exc:  # a tail shorter than the (possibly altered) trailer asks for
        directory, error = str(exc), None
    if error is not None:
        assert (error.name, 0 <= error.offset <= whole_size) == (NAME, True)
    elif isinstance(directory, str):
        assert "need the last" in directory
    else:  # resealed, an altered footer may parse alone: decode_segment then refuses the object
        assert directory == entries or resealed
    for block in original:
        e = block.entry
        chunk = changed[e.offset : e.offset + e.length]
        call = functools.partial(decode_block, chunk, NAME, e.offset, expect=e)
        decodes_to_original_or_corrupt(call, block, whole_size)
