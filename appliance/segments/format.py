"""The segment object format (docs/segment-format.md has the byte layout).

An object is: a header, blocks, a footer directory, a fixed trailer. A block holds one
conversation's records (seq, ts, opaque payload) in ascending seq, zstd-compressed, and carries
its own header and CRC-32, so a reader decodes one block fetched by a ranged GET with no other
part of the object. The trailer, at a fixed size from the end, locates and checks the footer.

Rules the decoder keeps: every byte of an object is covered by an exact check or a checksum; a
length is checked against the bytes present and a format bound before anything is allocated;
any inconsistency raises `SegmentCorrupt` naming the object and an absolute byte offset, never
another exception and never records different from those written. The writer streams
(`SegmentWriter`: bytes out block by block) and is deterministic: the same blocks give the same
bytes, and `digest` (SHA-256 of those bytes) names the object, so a replayed PUT overwrites.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Iterable, Sequence

import msgspec
import zstandard

from appliance.errors import ApplianceError

VERSION = 1
HEADER = struct.Struct("<6sH")  # magic, version
MAGIC = b"APPSEG"
BLOCK_HEAD = struct.Struct("<4sHHIIIQQQQ")  # magic, conv len, 0, count, raw, zlen, seqs, tss
BLOCK_MAGIC = b"ABLK"
RECORD_HEAD = struct.Struct("<QQI")  # seq, ts, payload length
ENTRY = struct.Struct("<QIIQQQQH")  # offset, length, count, seqs, tss, conv len
TRAILER = struct.Struct("<QIII4s")  # footer offset, footer length, footer crc, own crc, magic
TRAILER_MAGIC = b"AEND"
CRC = struct.Struct("<I")
MAX_CONVERSATION_BYTES = 1024
MAX_RECORD_BYTES = 64 * 1024 * 1024
MAX_BLOCK_RAW_BYTES = 256 * 1024 * 1024
_U64 = 1 << 64
_LEVEL = 3


class SegmentCorrupt(ApplianceError):
    """An object or block is not what the writer wrote: truncated, altered or not a segment.
    A reader meets it as a 500 `internal` (a server fault, logged), never as wrong records."""

    def __init__(self, name: str, offset: int, reason: str) -> None:
        super().__init__(f"segment {name} is corrupt at byte {offset}: {reason}")
        self.name, self.offset, self.reason = name, offset, reason


class Record(msgspec.Struct, frozen=True):
    seq: int
    ts: int  # epoch milliseconds
    payload: bytes


class BlockEntry(msgspec.Struct, frozen=True):
    """A footer directory row, and what the index stores to find a block."""

    conversation: str
    offset: int
    length: int
    count: int
    first_seq: int
    last_seq: int
    min_ts: int
    max_ts: int


class Block(msgspec.Struct, frozen=True):
    entry: BlockEntry
    records: list[Record]


class Trailer(msgspec.Struct, frozen=True):
    footer_offset: int
    footer_length: int
    footer_crc: int
    object_size: int

    @property
    def tail_size(self) -> int:
        """Bytes from the end of the object that `decode_directory` needs."""
        return self.object_size - self.footer_offset


class SegmentWriter:
    """Emits an object piece by piece: `add_block` returns the bytes to append (the header
    first), `finish` the footer and trailer. Blocks must come in ascending (conversation,
    seq), a conversation's blocks not overlapping; a caller mistake raises ValueError."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._entries: list[BlockEntry] = []
        self._size = 0  # bytes emitted so far, returned or pending
        self._pending = self._emit(HEADER.pack(MAGIC, VERSION))
        self.digest: str | None = None  # hex SHA-256 of the object, once finished

    def _emit(self, data: bytes) -> bytes:
        self._hash.update(data)
        self._size += len(data)
        return data

    def _take(self, data: bytes) -> bytes:
        out, self._pending = self._pending + self._emit(data), b""
        return out

    def add_block(self, conversation: str, records: Sequence[Record]) -> bytes:
        if self.digest is not None:
            raise ValueError("segment already finished")
        conv = conversation.encode()
        if not 0 < len(conv) <= MAX_CONVERSATION_BYTES or not records:
            raise ValueError("a block needs a conversation of 1-1024 bytes and a record")
        last = self._entries[-1] if self._entries else None
        if last and (last.conversation, last.last_seq) >= (conversation, records[0].seq):
            raise ValueError("blocks must ascend by (conversation, seq) without overlap")
        raw = bytearray()
        prev = -1
        for r in records:
            if not (prev < r.seq < _U64 and 0 <= r.ts < _U64):
                raise ValueError(f"record {r.seq}: seqs must ascend, seq and ts fit in u64")
            if len(r.payload) > MAX_RECORD_BYTES:
                raise ValueError(f"record {r.seq}: payload exceeds {MAX_RECORD_BYTES} bytes")
            raw += RECORD_HEAD.pack(r.seq, r.ts, len(r.payload))
            raw += r.payload
            prev = r.seq
        if len(raw) > MAX_BLOCK_RAW_BYTES:
            raise ValueError(f"block of {len(raw)} bytes exceeds {MAX_BLOCK_RAW_BYTES}")
        packed = zstandard.ZstdCompressor(level=_LEVEL, write_checksum=True).compress(raw)
        tss = [r.ts for r in records]
        length = BLOCK_HEAD.size + len(conv) + len(packed) + CRC.size
        first, count = records[0].seq, len(records)
        entry = BlockEntry(conversation, self._size, length, count, first, prev, min(tss), max(tss))
        sizes = (len(conv), 0, count, len(raw), len(packed))
        body = BLOCK_HEAD.pack(BLOCK_MAGIC, *sizes, first, prev, entry.min_ts, entry.max_ts)
        body += conv + packed
        self._entries.append(entry)
        return self._take(body + CRC.pack(zlib.crc32(body)))

    def finish(self) -> bytes:
        """The rest of the object (footer, trailer); afterwards `digest` and `entries` hold."""
        if self.digest is not None:
            raise ValueError("segment already finished")
        footer = bytearray(CRC.pack(len(self._entries)))
        for e in self._entries:
            conv = e.conversation.encode()
            fields = (e.offset, e.length, e.count, e.first_seq, e.last_seq, e.min_ts, e.max_ts)
            footer += ENTRY.pack(*fields, len(conv)) + conv
        head = struct.pack("<QII", self._size, len(footer), zlib.crc32(footer))
        out = self._take(bytes(footer) + head + CRC.pack(zlib.crc32(head)) + TRAILER_MAGIC)
        self.digest = self._hash.hexdigest()
        return out

    @property
    def entries(self) -> list[BlockEntry]:
        return list(self._entries)

    @property
    def size(self) -> int:
        """Bytes of the object so far (what the next block's offset will be)."""
        return self._size


def encode_segment(blocks: Iterable[tuple[str, Sequence[Record]]]) -> tuple[bytes, str]:
    """The whole object in memory and its digest: for flush segments, which are small."""
    writer = SegmentWriter()
    parts = [writer.add_block(conversation, records) for conversation, records in blocks]
    parts.append(writer.finish())
    assert writer.digest is not None
    return b"".join(parts), writer.digest


def decode_block(
    data: bytes, name: str, offset: int = 0, expect: BlockEntry | None = None
) -> Block:
    """One block, exactly `data` (from `offset` in object `name`): checks its CRC, its zstd
    frame, every record, and, given `expect` (an index row), that it is the block expected."""
    if len(data) < BLOCK_HEAD.size + CRC.size:
        raise SegmentCorrupt(name, offset + len(data), "block truncated")
    magic, n, zero, count, raw_len, zlen, first, last, min_ts, max_ts = BLOCK_HEAD.unpack_from(data)
    if magic != BLOCK_MAGIC or zero or BLOCK_HEAD.size + n + zlen + CRC.size != len(data):
        raise SegmentCorrupt(name, offset, "bad block header or length")
    (crc,) = CRC.unpack_from(data, len(data) - CRC.size)
    if zlib.crc32(memoryview(data)[: -CRC.size]) != crc:
        raise SegmentCorrupt(name, offset, "block checksum mismatch")
    at = offset + BLOCK_HEAD.size + n
    if not 0 < n <= MAX_CONVERSATION_BYTES or not 0 < count <= raw_len // RECORD_HEAD.size:
        raise SegmentCorrupt(name, offset, "block counts out of bounds")
    packed = data[BLOCK_HEAD.size + n : -CRC.size]
    try:
        conversation = data[BLOCK_HEAD.size : BLOCK_HEAD.size + n].decode()
        if raw_len > MAX_BLOCK_RAW_BYTES or zstandard.frame_content_size(packed) != raw_len:
            raise SegmentCorrupt(name, at, "block size out of bounds")
        raw = zstandard.ZstdDecompressor().decompress(packed, max_output_size=raw_len)
    except (UnicodeDecodeError, zstandard.ZstdError) as exc:
        raise SegmentCorrupt(name, at, f"undecodable block: {exc}") from None
    if len(raw) != raw_len:
        raise SegmentCorrupt(name, at, "decompressed size mismatch")
    records, pos, prev = [], 0, -1
    for _ in range(count):
        if pos + RECORD_HEAD.size > raw_len:
            raise SegmentCorrupt(name, at, f"record header truncated at {pos} decompressed")
        seq, ts, size = RECORD_HEAD.unpack_from(raw, pos)
        pos += RECORD_HEAD.size
        if seq <= prev or size > min(MAX_RECORD_BYTES, raw_len - pos):
            raise SegmentCorrupt(name, at, f"bad record at {pos} decompressed")
        records.append(Record(seq, ts, raw[pos : pos + size]))
        pos, prev = pos + size, seq
    tss = [r.ts for r in records]
    if (pos, first, last, min_ts, max_ts) != (raw_len, records[0].seq, prev, min(tss), max(tss)):
        raise SegmentCorrupt(name, offset, "block header disagrees with its records")
    entry = BlockEntry(conversation, offset, len(data), count, first, last, min_ts, max_ts)
    if expect is not None and expect != entry:
        raise SegmentCorrupt(name, offset, f"block is not the one indexed: {entry} != {expect}")
    return Block(entry, records)


def decode_trailer(tail: bytes, object_size: int, name: str) -> Trailer:
    """The trailer, from the last bytes of the object (at least TRAILER.size of them)."""
    at = object_size - TRAILER.size
    if at < HEADER.size or len(tail) < TRAILER.size or len(tail) > object_size:
        raise SegmentCorrupt(name, max(at, 0), "object too short for a trailer")
    offset, length, footer_crc, crc, magic = TRAILER.unpack_from(tail, len(tail) - TRAILER.size)
    if magic != TRAILER_MAGIC or zlib.crc32(tail[-TRAILER.size : -8]) != crc:
        raise SegmentCorrupt(name, at, "bad trailer")
    if offset < HEADER.size or offset + length != at or length < CRC.size:
        raise SegmentCorrupt(name, at, "trailer points outside the object")
    return Trailer(offset, length, footer_crc, object_size)


def decode_directory(tail: bytes, object_size: int, name: str) -> list[BlockEntry]:
    """The footer directory, from the last bytes of the object: at least the trailer's
    `tail_size` of them (decode the trailer first to learn it; a shorter tail is ValueError)."""
    trailer = decode_trailer(tail, object_size, name)
    if len(tail) < trailer.tail_size:
        raise ValueError(f"need the last {trailer.tail_size} bytes, got {len(tail)}")
    base = len(tail) - trailer.tail_size
    footer = tail[base : base + trailer.footer_length]
    if zlib.crc32(footer) != trailer.footer_crc:
        raise SegmentCorrupt(name, trailer.footer_offset, "footer checksum mismatch")
    (count,) = CRC.unpack_from(footer)
    entries: list[BlockEntry] = []
    pos, end = CRC.size, HEADER.size
    for _ in range(min(count, len(footer) // ENTRY.size)):
        at = trailer.footer_offset + pos
        if pos + ENTRY.size > len(footer):
            raise SegmentCorrupt(name, at, "footer entry truncated")
        offset, length, n_records, first, last, min_ts, max_ts, n = ENTRY.unpack_from(footer, pos)
        pos += ENTRY.size
        try:
            conversation = footer[pos : pos + n].decode()
        except UnicodeDecodeError:
            raise SegmentCorrupt(name, at, "footer conversation is not UTF-8") from None
        pos += n
        entry = BlockEntry(conversation, offset, length, n_records, first, last, min_ts, max_ts)
        previous = (entries[-1].conversation, entries[-1].last_seq) if entries else None
        if (
            offset != end
            or pos > len(footer)
            or not (n_records > 0 and first <= last and min_ts <= max_ts)
            or not (0 < n == len(conversation.encode()))
            or (previous is not None and previous >= (conversation, first))
        ):
            raise SegmentCorrupt(name, at, "footer entry out of place")
        entries.append(entry)
        end = offset + length
    if len(entries) != count or pos != len(footer) or end != trailer.footer_offset:
        raise SegmentCorrupt(name, trailer.footer_offset, "footer does not cover the blocks")
    return entries


def decode_segment(data: bytes, name: str) -> list[Block]:
    """A whole object: header, every block against its directory row, footer, trailer."""
    if len(data) < HEADER.size or HEADER.unpack_from(data) != (MAGIC, VERSION):
        raise SegmentCorrupt(name, 0, "not a segment of version 1 (bad header)")
    entries = decode_directory(data, len(data), name)
    return [
        decode_block(data[e.offset : e.offset + e.length], name, e.offset, expect=e)
        for e in entries
    ]
