"""Small file readers shared across the package: a file's sha256 and bounded JSON documents.

Reads only; no subprocess, no network (so `measure/` may use it too, STYLE.md rule 6).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cwbuild.errors import CwbuildError, FormatError


def sha256_file(path: Path) -> str:
    """Streaming sha256 of a file, hex (constant memory)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_limited(path: Path, *, limit: int, error: type[CwbuildError], what: str = "") -> bytes:
    """All of `path`, at most `limit` bytes; raises `error` naming "[WHAT ]PATH" when unreadable or larger."""
    name = f"{what} {path}" if what else str(path)
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise error(f"cannot read {name}: {exc.strerror}") from None
    if len(data) > limit:
        raise error(f"{name} is larger than {limit} bytes")
    return data


def read_json(path: Path, *, limit: int) -> Any:
    """The JSON value in `path`, read at most `limit` bytes; FormatError when larger or not JSON.

    OSError from opening or reading propagates: callers decide what an unreadable file means.
    """
    with path.open("rb") as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise FormatError(f"{path} is larger than {limit} bytes")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path} is not JSON: {exc}") from None


def read_json_object(path: Path, *, limit: int) -> dict[str, Any]:
    """`read_json`, and the value must be a JSON object."""
    doc = read_json(path, limit=limit)
    if not isinstance(doc, dict):
        raise FormatError(f"{path} is not a JSON object")
    return doc
