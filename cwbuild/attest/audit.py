"""The audit trail: one JSON line per decision, with its stable reason id, never a secret.

Each line: `{"ts", "event", "outcome": "allow"|"refuse", "reason", "workload_id", "client", ...details}`.
Details are limited to short scalars chosen by the caller (ids, measurements, TEE type, counts); the secret,
wrapped keys, tokens and nonces are never passed in. Lines go to the audit file (mode 0600, appended and
flushed per line) or, without a file, to the `cwbuild.audit` logger.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import IO

log = logging.getLogger("cwbuild.audit")

Scalar = str | int | float | bool | None
_MAX_DETAIL = 256


def _clip(value: Scalar) -> Scalar:
    if isinstance(value, str) and len(value) > _MAX_DETAIL:
        return value[:_MAX_DETAIL] + "..."
    return value


class Audit:
    """Writes audit lines; thread-safe."""

    def __init__(self, path: Path | None) -> None:
        self._file: IO[str] | None = None
        self._lock = threading.Lock()
        if path is not None:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._file = os.fdopen(fd, "a", encoding="utf-8", buffering=1)

    def record(
        self,
        event: str,
        *,
        outcome: str,
        reason: str,
        workload_id: str | None = None,
        client: str | None = None,
        **details: Scalar,
    ) -> None:
        line = {
            "ts": round(time.time(), 3),
            "event": event,
            "outcome": outcome,
            "reason": reason,
            "workload_id": _clip(workload_id),
            "client": client,
            **{k: _clip(v) for k, v in sorted(details.items())},
        }
        text = json.dumps(line, separators=(",", ":"), ensure_ascii=True)
        with self._lock:
            if self._file is not None:
                self._file.write(text + "\n")
                self._file.flush()
                return
        level = logging.INFO if outcome == "allow" else logging.WARNING
        log.log(level, "audit %s", text)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
