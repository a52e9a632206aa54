"""The LUKS anti-forensic splitter (LUKS1 on-disk format specification, §2.4 "AF-Splitter").

split: s_0..s_{n-2} random, d_0 = 0, d_k = H(d_{k-1} ^ s_{k-1}) for k < n, s_{n-1} = d_{n-1} ^ key.
merge inverts it. H is the "diffuse" function: the block is cut into digest-sized pieces and piece i is
replaced by hash(be32(i) || piece), truncated to the piece's length.
"""

from __future__ import annotations

import hashlib
import os

from cwbuild.disk.kdf import HASHES
from cwbuild.errors import FormatError

#: Stripes every LUKS implementation writes (LUKS1 spec §2.4: "LUKS_STRIPES = 4000").
STRIPES = 4000


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def _diffuse(block: bytes, hash_name: str) -> bytes:
    size = hashlib.new(hash_name).digest_size
    out = bytearray()
    for i in range(0, len(block), size):
        piece = block[i : i + size]
        digest = hashlib.new(hash_name, (i // size).to_bytes(4, "big") + piece).digest()
        out += digest[: len(piece)]
    return bytes(out)


def split(key: bytes, stripes: int, hash_name: str) -> bytes:
    """AF-split `key` into `stripes` blocks of len(key) bytes (the keyslot's material)."""
    h = HASHES[hash_name]
    d = bytes(len(key))
    parts = []
    for _ in range(stripes - 1):
        s = os.urandom(len(key))
        parts.append(s)
        d = _diffuse(_xor(d, s), h)
    parts.append(_xor(d, key))
    return b"".join(parts)


def merge(material: bytes, key_size: int, stripes: int, hash_name: str) -> bytes:
    """Recover the key from AF-split material (the first key_size * stripes bytes are used)."""
    if hash_name not in HASHES:
        raise FormatError(f"unsupported AF hash {hash_name!r}")
    if len(material) < key_size * stripes:
        raise FormatError("AF material shorter than key_size * stripes")
    h = HASHES[hash_name]
    d = bytes(key_size)
    for k in range(stripes - 1):
        d = _diffuse(_xor(d, material[k * key_size : (k + 1) * key_size]), h)
    return _xor(d, material[(stripes - 1) * key_size : stripes * key_size])
