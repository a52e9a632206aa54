"""Helpers for binary layouts (STYLE.md rule 3).

Every layout is declared once: a ctypes `LittleEndianStructure` with `_pack_ = 1` whose size is checked at
import, or a `struct.Struct` checked the same way. Structures are built through `build()`, which rejects field
names the structure does not have: ctypes silently accepts (and ignores) an unknown keyword, which is how
sev-snp-measure's SVSM VMSA ended up with `fcw=` instead of `x87_fcw` (spec measurement.md §1.9).
"""

from __future__ import annotations

import ctypes
import struct
import uuid
from typing import Any, TypeVar

S = TypeVar("S", bound=ctypes.Structure)


def check_size(layout: type[ctypes.Structure] | struct.Struct, size: int) -> None:
    """Fail at import when a declared layout does not have the size its spec table gives."""
    actual = layout.size if isinstance(layout, struct.Struct) else ctypes.sizeof(layout)
    if actual != size:
        raise ImportError(f"layout {layout!r} is {actual} bytes, spec says {size}")


def field_names(cls: type[ctypes.Structure]) -> frozenset[str]:
    return frozenset(name for name, *_ in cls._fields_)


def build(cls: type[S], **fields: Any) -> S:
    """Instantiate `cls`, refusing any keyword that is not one of its declared fields."""
    unknown = set(fields) - field_names(cls)
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {', '.join(sorted(unknown))}")
    return cls(**fields)


def guid(text: str) -> bytes:
    """A GUID in the on-disk EFI order (first three fields little-endian), as OVMF and QEMU store them."""
    return uuid.UUID(text).bytes_le
