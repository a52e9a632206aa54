"""The one network client module (STYLE.md rule 1: "Network access lives in one client module").

Every HTTP(S) request cwbuild makes goes through `request()`: TLS verified against the system store or a
given CA file, bounded timeouts, bounded retries with backoff, bounded response sizes, no redirects, and
errors that name the URL (without its query string) but never a request body or an Authorization header.
"""

from __future__ import annotations

import logging
import ssl
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from cwbuild.errors import NetworkError

log = logging.getLogger("cwbuild.net")

#: Statuses worth another try: the peer is overloaded or a proxy in between failed (RFC 9110 §15.6).
RETRY_STATUSES = frozenset({429, 502, 503, 504})
DEFAULT_MAX_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Options:
    """How to reach a peer: TLS trust, timeouts and retry budget."""

    ca_file: Path | None = None
    timeout: float = 10.0
    retries: int = 2
    backoff: float = 0.5
    max_bytes: int = DEFAULT_MAX_BYTES


@dataclass(frozen=True)
class Response:
    """A complete, size-bounded response."""

    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)

    def text(self, limit: int = 200) -> str:
        """The start of the body as text, for error messages."""
        return self.body[:limit].decode("utf-8", "replace").strip()


def redact_url(url: str) -> str:
    """The URL without credentials or query string, fit for logs and error messages."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def _check_url(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise NetworkError(f"not an http(s) URL: {redact_url(url)!r}")


def _verify(options: Options) -> ssl.SSLContext:
    if options.ca_file is None:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=str(options.ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise NetworkError(f"cannot use CA file {options.ca_file}: {exc}") from None


def _read_bounded(resp: httpx.Response, max_bytes: int, url: str) -> bytes:
    declared = resp.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise NetworkError(f"{redact_url(url)}: response larger than {max_bytes} bytes")
    chunks: list[bytes] = []
    total = 0
    for chunk in resp.iter_bytes():
        total += len(chunk)
        if total > max_bytes:
            raise NetworkError(f"{redact_url(url)}: response larger than {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _once(
    client: httpx.Client,
    method: str,
    url: str,
    *,
    body: bytes | None,
    headers: Mapping[str, str],
    max_bytes: int,
) -> Response:
    with client.stream(method, url, content=body, headers=dict(headers)) as resp:
        data = _read_bounded(resp, max_bytes, url)
        return Response(resp.status_code, data, dict(resp.headers))


def request(
    method: str,
    url: str,
    *,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    options: Options | None = None,
    idempotent: bool | None = None,
) -> Response:
    """Send one request, retrying within the budget; any HTTP status is returned, transport failures raise.

    Non-idempotent requests (POST by default) are retried only when the connection was never made or the
    peer answered 429/503, so a request that may have been processed is never sent twice.
    """
    _check_url(url)
    opts = options or Options()
    if idempotent is None:
        idempotent = method.upper() in ("GET", "HEAD", "PUT", "DELETE")
    timeout = httpx.Timeout(opts.timeout, connect=min(opts.timeout, 5.0))
    attempts = max(0, opts.retries) + 1
    last: Exception | None = None
    client = httpx.Client(verify=_verify(opts), timeout=timeout, follow_redirects=False, trust_env=False)
    with client:
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(opts.backoff * 2 ** (attempt - 1), 8.0))
            try:
                resp = _once(client, method, url, body=body, headers=headers or {}, max_bytes=opts.max_bytes)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                last = exc
                log.debug("%s %s: %s (attempt %d/%d)", method, redact_url(url), exc, attempt + 1, attempts)
                continue
            except httpx.HTTPError as exc:
                last = exc
                if not idempotent:
                    break
                continue
            retryable = resp.status in RETRY_STATUSES and (idempotent or resp.status in (429, 503))
            if retryable and attempt + 1 < attempts:
                log.debug("%s %s: HTTP %d, retrying", method, redact_url(url), resp.status)
                continue
            return resp
    reason = type(last).__name__ if last is not None else "no response"
    detail = str(last) if last is not None and str(last) else reason
    raise NetworkError(
        f"{method} {redact_url(url)} failed after {attempts} attempt(s): {detail}",
        hint="check the URL, the network and, for https, the CA file",
    )


def fetch(url: str, *, options: Options | None = None) -> bytes:
    """GET a resource; anything but 200 is a `NetworkError`."""
    resp = request("GET", url, options=options)
    if resp.status != 200:
        raise NetworkError(f"GET {redact_url(url)}: HTTP {resp.status}")
    return resp.body
