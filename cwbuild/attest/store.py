"""State of the attestation endpoint behind a small interface (`Store`), with an SQLite (WAL) backend.

What is kept: workloads (reference values, policy, the secret sealed by the caller — this module never sees
plaintext), pending nonces (single use, with tombstones so a replay is told apart from a forgery), and a few
metadata values (the master-key check). The schema is versioned (`PRAGMA user_version`) and migrated forward
in one transaction; a newer database is refused. A PostgreSQL backend implements the same `Store` protocol.

Durability: workload writes commit with `synchronous=FULL` before the caller acknowledges them, so a
registration the client saw succeed survives kill -9 and power loss; nonce traffic uses `synchronous=NORMAL`
(a lost nonce after a crash only fails closed).
"""

from __future__ import annotations

import enum
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cwbuild.errors import AttestError

#: Schema versions and the statements that reach each from the one before.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE workloads (
            workload_id TEXT PRIMARY KEY NOT NULL,
            tee TEXT NOT NULL,
            reference_values TEXT NOT NULL,
            policy TEXT NOT NULL,
            sealed_secret BLOB NOT NULL,
            origin TEXT NOT NULL,
            tee_config TEXT,
            created_at REAL NOT NULL
        ) STRICT""",
        """CREATE TABLE nonces (
            nonce BLOB PRIMARY KEY NOT NULL,
            workload_id TEXT NOT NULL,
            client TEXT NOT NULL,
            expires_at REAL NOT NULL,
            used INTEGER NOT NULL DEFAULT 0
        ) STRICT""",
        "CREATE INDEX nonces_pending ON nonces (used, expires_at)",
        "CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value BLOB NOT NULL) STRICT",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)
#: How long a used or expired nonce is remembered, so a late replay is still reported as a replay.
TOMBSTONE_SECONDS = 120.0


@dataclass(frozen=True)
class Workload:
    """A registered workload. `sealed_secret` is ciphertext (wrap.seal); plaintext never reaches the store."""

    workload_id: str
    tee: str
    reference_values: tuple[Mapping[str, str], ...]
    policy: Mapping[str, Any]
    sealed_secret: bytes
    origin: str = "v1"
    tee_config: str | None = None
    created_at: float = 0.0


class NonceState(enum.StrEnum):
    """What `take_nonce` found; the value is the refusal reason id (DESIGN.md: stable ids)."""

    OK = "ok"
    UNKNOWN = "nonce.unknown"
    REPLAYED = "nonce.replayed"
    EXPIRED = "nonce.expired"


@dataclass(frozen=True)
class NonceTake:
    state: NonceState
    workload_id: str = ""


class Store(Protocol):
    """The interface the server uses; every method is atomic."""

    def put_workload(self, workload: Workload, *, replace: bool) -> bool:
        """Insert (or replace if `replace`); False when the id exists and `replace` is off."""

    def get_workload(self, workload_id: str) -> Workload | None: ...

    def delete_workload(self, workload_id: str) -> bool: ...

    def count_workloads(self) -> int: ...

    def add_nonce(
        self,
        nonce: bytes,
        *,
        workload_id: str,
        client: str,
        expires_at: float,
        now: float,
        limits: tuple[int, int],
    ) -> bool:
        """Record a pending nonce unless (global, per-client) pending limits are reached (then False)."""

    def take_nonce(self, nonce: bytes, *, now: float) -> NonceTake:
        """Mark a nonce used, exactly once, and say what it was."""

    def get_meta(self, key: str) -> bytes | None: ...

    def set_meta(self, key: str, value: bytes) -> None: ...

    def close(self) -> None: ...


class SqliteStore:
    """`Store` on one SQLite file in WAL mode; safe to share between threads (one lock, one connection)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            raise AttestError(f"cannot open database {path}: {exc}") from None
        path.chmod(0o600)
        self._lock = threading.Lock()
        self._durable: bool | None = None
        self._last_purge = 0.0
        self._migrate()

    @contextmanager
    def _tx(self, *, durable: bool) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if durable != self._durable:
                self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                self._durable = durable
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _migrate(self) -> None:
        with self._tx(durable=True) as db:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise AttestError(
                    f"database {self.path} has schema version {version}; this cwbuild knows {SCHEMA_VERSION}",
                    hint="upgrade cwbuild",
                )
            for statements in _MIGRATIONS[version:]:
                for statement in statements:
                    db.execute(statement)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # --- workloads ---

    def put_workload(self, workload: Workload, *, replace: bool) -> bool:
        row = (
            workload.workload_id,
            workload.tee,
            json.dumps(list(map(dict, workload.reference_values)), sort_keys=True),
            json.dumps(dict(workload.policy), sort_keys=True),
            workload.sealed_secret,
            workload.origin,
            workload.tee_config,
            workload.created_at,
        )
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        with self._tx(durable=True) as db:
            cur = db.execute(f"{verb} INTO workloads VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
            return cur.rowcount == 1

    def get_workload(self, workload_id: str) -> Workload | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM workloads WHERE workload_id = ?", (workload_id,)).fetchone()
        if row is None:
            return None
        return Workload(
            workload_id=row[0],
            tee=row[1],
            reference_values=tuple(json.loads(row[2])),
            policy=json.loads(row[3]),
            sealed_secret=bytes(row[4]),
            origin=row[5],
            tee_config=row[6],
            created_at=row[7],
        )

    def delete_workload(self, workload_id: str) -> bool:
        with self._tx(durable=True) as db:
            return db.execute("DELETE FROM workloads WHERE workload_id = ?", (workload_id,)).rowcount == 1

    def count_workloads(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM workloads").fetchone()[0])

    def each_workload_id(self, visit: Callable[[str], None]) -> None:
        """Call `visit` for every workload id (used by tests and maintenance tools)."""
        with self._lock:
            ids = [r[0] for r in self._db.execute("SELECT workload_id FROM workloads ORDER BY workload_id")]
        for wid in ids:
            visit(wid)

    # --- nonces ---

    def _purge(self, db: sqlite3.Connection, now: float) -> None:
        if now - self._last_purge < 1.0:
            return
        self._last_purge = now
        db.execute("DELETE FROM nonces WHERE expires_at < ?", (now - TOMBSTONE_SECONDS,))

    def add_nonce(
        self,
        nonce: bytes,
        *,
        workload_id: str,
        client: str,
        expires_at: float,
        now: float,
        limits: tuple[int, int],
    ) -> bool:
        max_total, max_client = limits
        with self._tx(durable=False) as db:
            self._purge(db, now)
            total, mine = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(client = ?), 0) FROM nonces WHERE used = 0 AND expires_at > ?",
                (client, now),
            ).fetchone()
            if int(total) >= max_total or int(mine) >= max_client:
                return False
            db.execute("INSERT INTO nonces VALUES (?, ?, ?, ?, 0)", (nonce, workload_id, client, expires_at))
            return True

    def take_nonce(self, nonce: bytes, *, now: float) -> NonceTake:
        with self._tx(durable=False) as db:
            row = db.execute(
                "SELECT workload_id, expires_at, used FROM nonces WHERE nonce = ?", (nonce,)
            ).fetchone()
            if row is None:
                return NonceTake(NonceState.UNKNOWN)
            workload_id, expires_at, used = row
            if used:
                return NonceTake(NonceState.REPLAYED, workload_id)
            db.execute("UPDATE nonces SET used = 1 WHERE nonce = ?", (nonce,))
            if expires_at <= now:
                return NonceTake(NonceState.EXPIRED, workload_id)
            return NonceTake(NonceState.OK, workload_id)

    # --- metadata ---

    def get_meta(self, key: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def set_meta(self, key: str, value: bytes) -> None:
        with self._tx(durable=True) as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_store(url_or_path: str | Path) -> Store:
    """A store from `--db`: a file path (SQLite). `postgresql://` is the planned second backend."""
    text = str(url_or_path)
    if text.startswith(("postgres://", "postgresql://")):
        raise AttestError("the PostgreSQL backend is not implemented yet", hint="use an SQLite path for --db")
    return SqliteStore(Path(text))
