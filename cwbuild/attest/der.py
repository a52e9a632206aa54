"""A minimal, bounded DER reader for the vendor extensions `cryptography` leaves opaque.

AMD's VCEK/VLEK extensions (spec/attestation.md §1.7) and Intel's SGX PCK extension (§3.5) come back from
`cryptography` as raw bytes. This walks them: definite lengths only (X.690 §8.1.3), no length beyond the
buffer, no recursion deeper than the caller asks for. Every problem raises FormatError.
"""

from __future__ import annotations

from cwbuild.errors import FormatError

TAG_INTEGER = 0x02
TAG_OCTET_STRING = 0x04
TAG_OID = 0x06
TAG_ENUMERATED = 0x0A
TAG_IA5STRING = 0x16
TAG_SEQUENCE = 0x30

_MAX_LEN_OCTETS = 4  # no DER object here comes near 4 GiB; longer length fields are refused


def read_tlv(data: bytes, pos: int = 0) -> tuple[int, int, int]:
    """The (tag, value start, value end) of the DER object at `pos`; single-byte tags only."""
    if pos + 2 > len(data):
        raise FormatError("DER: truncated header")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise FormatError("DER: multi-byte tags are not used here")
    first = data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > _MAX_LEN_OCTETS or pos + count > len(data):
            raise FormatError("DER: bad length field")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    if pos + length > len(data):
        raise FormatError("DER: length beyond the buffer")
    return tag, pos, pos + length


def expect(data: bytes, tag: int) -> bytes:
    """The value of the single DER object `data`, which must have `tag` and fill the buffer."""
    got, start, end = read_tlv(data)
    if got != tag or end != len(data):
        raise FormatError(f"DER: expected one object with tag {tag:#x}")
    return data[start:end]


def children(value: bytes, limit: int = 256) -> list[tuple[int, bytes]]:
    """The (tag, full TLV bytes) of each object inside a constructed value, at most `limit` of them."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(value):
        if len(out) >= limit:
            raise FormatError("DER: too many elements")
        tag, _start, end = read_tlv(value, pos)
        out.append((tag, value[pos:end]))
        pos = end
    return out


def integer(data: bytes, *, tag: int = TAG_INTEGER) -> int:
    """A non-negative DER INTEGER (or ENUMERATED) of at most 8 bytes of magnitude."""
    value = expect(data, tag)
    if not value or len(value) > 9:
        raise FormatError("DER: integer of unsupported size")
    if value[0] & 0x80:
        raise FormatError("DER: negative integer")
    return int.from_bytes(value, "big")


def oid(data: bytes) -> str:
    """A DER OBJECT IDENTIFIER as dotted text (X.690 §8.19)."""
    value = expect(data, TAG_OID)
    if not value or value[-1] & 0x80:
        raise FormatError("DER: bad OID")
    arcs: list[int] = []
    acc = 0
    for byte in value:
        acc = (acc << 7) | (byte & 0x7F)
        if acc.bit_length() > 64:
            raise FormatError("DER: OID arc too large")
        if not byte & 0x80:
            arcs.append(acc)
            acc = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in (first, arcs[0] - 40 * first, *arcs[1:]))
