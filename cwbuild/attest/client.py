"""Client of the endpoint's admin API: register, describe and delete workloads (issue 5 item 6).

Used by `cwbuild register` and by `cwbuild build` (which calls `register_workload` and, when a later step
fails, `delete_workload` to roll back). TLS is verified against the system store or a CA file; requests
have timeouts and a bounded retry budget (`cwbuild.net`). The token and the secret never appear in errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cwbuild import net
from cwbuild.attest.api import Registration, check_workload_id
from cwbuild.errors import AttestError, AttestRefused, NetworkError

DEFAULT_TIMEOUT = 10.0
DEFAULT_RETRIES = 2


def _endpoint(url: str, *parts: str) -> str:
    return url.rstrip("/") + "/" + "/".join(parts)


def _options(ca_file: Path | str | None, timeout: float, retries: int) -> net.Options:
    return net.Options(
        ca_file=Path(ca_file) if ca_file else None, timeout=timeout, retries=retries, max_bytes=1 << 20
    )


def _headers(token: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        "Accept": "application/json",
    }


def _refusal(resp: net.Response, what: str) -> AttestError:
    try:
        body = json.loads(resp.body)
        reason, detail = str(body.get("error", "")), str(body.get("detail", ""))[:200]
    except (ValueError, AttributeError):
        reason, detail = "", resp.text()
    if reason:
        hint = {
            "workload.exists": "pass --replace to overwrite it",
            "auth.bad_token": "check the token file",
        }.get(reason)
        return AttestRefused(reason, f"{what}: {detail}", status=resp.status, hint=hint)
    return AttestError(f"{what}: HTTP {resp.status} {detail}")


def _on_workload(
    method: str, url: str, token: str, workload_id: str, ca_file: Path | str | None, timeout: float
) -> net.Response:
    """`method` /v1/workloads/{id} (the id checked first) with the admin token."""
    return net.request(
        method,
        _endpoint(url, "v1", "workloads", check_workload_id(workload_id)),
        headers=_headers(token),
        options=_options(ca_file, timeout, DEFAULT_RETRIES),
    )


def register_workload(  # noqa: PLR0913 - the build step's call signature (issue 5 item 6)
    url: str,
    token: str,
    registration: Registration,
    ca_file: Path | str | None = None,
    replace: bool = False,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
) -> None:
    """POST /v1/workloads; returns once the endpoint acknowledged (201), else AttestError/NetworkError."""
    body = {**registration.to_json(), "replace": bool(replace or registration.replace)}
    resp = net.request(
        "POST",
        _endpoint(url, "v1", "workloads"),
        body=json.dumps(body).encode(),
        headers=_headers(token),
        options=_options(ca_file, timeout, retries),
    )
    if resp.status != 201:
        raise _refusal(resp, f"registering workload {registration.workload_id}")


def get_workload(
    url: str,
    token: str,
    workload_id: str,
    ca_file: Path | str | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, Any]:
    """GET /v1/workloads/{id}: reference values and policy (never the secret)."""
    resp = _on_workload("GET", url, token, workload_id, ca_file, timeout)
    if resp.status != 200:
        raise _refusal(resp, f"reading workload {workload_id}")
    try:
        data = json.loads(resp.body)
    except ValueError:
        raise NetworkError("the endpoint answered with something that is not JSON") from None
    if not isinstance(data, dict):
        raise NetworkError("the endpoint answered with something that is not a JSON object")
    return data


def delete_workload(
    url: str,
    token: str,
    workload_id: str,
    ca_file: Path | str | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """DELETE /v1/workloads/{id} (the rollback of `register_workload`); a missing workload is not an error."""
    resp = _on_workload("DELETE", url, token, workload_id, ca_file, timeout)
    if resp.status not in (204, 404):
        raise _refusal(resp, f"deleting workload {workload_id}")
