"""Reading files that hold secrets (DESIGN.md "Files holding secrets").

Passphrase files: their bytes with one trailing newline removed (luksy's rule). Token files: text, one
trailing newline stripped, at least 32 characters. Master keys: exactly 32 raw bytes or 64 hex characters.
A secret file readable by group or others is refused. Errors name the file, never its content.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from cwbuild.errors import SecretFileError

#: Upper bound on any secret file: a passphrase or token longer than this is a mistake, not a secret.
MAX_SECRET_FILE = 64 * 1024
MIN_TOKEN_CHARS = 32


def _read_bounded(fd: int, what: str) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > MAX_SECRET_FILE:
            raise SecretFileError(f"{what} is larger than {MAX_SECRET_FILE} bytes")
        chunks.append(chunk)


def read_secret_file(path: str | Path) -> bytes:
    """The raw bytes of a secret file ('-' is stdin), refusing group/other-readable files."""
    if str(path) == "-":
        return _read_bounded(sys.stdin.fileno(), "standard input")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise SecretFileError(f"cannot open secret file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) and not stat.S_ISFIFO(st.st_mode):
            raise SecretFileError(f"secret file {path} is not a regular file")
        if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecretFileError(
                f"secret file {path} is accessible by group or others (mode {st.st_mode & 0o777:o})",
                hint=f"chmod 600 {path}",
            )
        return _read_bounded(fd, f"secret file {path}")
    finally:
        os.close(fd)


def _strip_one_newline(data: bytes) -> bytes:
    return data[:-1] if data.endswith(b"\n") else data


def read_passphrase_file(path: str | Path) -> bytes:
    """A passphrase: the file's bytes with one trailing newline removed; empty is refused."""
    data = _strip_one_newline(read_secret_file(path))
    if not data:
        raise SecretFileError(f"passphrase file {path} is empty")
    return data


def read_token_file(path: str | Path) -> str:
    """A bearer token: text, one trailing newline stripped, at least 32 printable characters."""
    raw = _strip_one_newline(read_secret_file(path))
    try:
        token = raw.decode("ascii")
    except UnicodeDecodeError:
        raise SecretFileError(f"token file {path} is not ASCII text") from None
    if len(token) < MIN_TOKEN_CHARS or not token.isprintable() or any(c.isspace() for c in token):
        raise SecretFileError(
            f"token file {path} must hold one token of at least {MIN_TOKEN_CHARS} printable characters"
        )
    return token


def read_master_key_file(path: str | Path) -> bytes:
    """A 256-bit master key: exactly 32 raw bytes, or 64 hex characters (one trailing newline allowed)."""
    raw = read_secret_file(path)
    if len(raw) == 32:
        return raw
    text = _strip_one_newline(raw)
    if len(text) == 64:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    raise SecretFileError(f"master key file {path} must hold exactly 32 raw bytes or 64 hex characters")
