"""The HTTP layer of the attestation endpoint: FastAPI routes for API v1, health, metrics (DESIGN.md).

A route table maps each path to its handler and its auth action (admin bearer token or guest rate limit);
handlers translate JSON to the service's frozen dataclasses and back. Refusals become
`{"error": <reason id>, "detail": ...}` with their HTTP status; nothing here does cryptography. Request
bodies are bounded by a middleware before any parsing.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from cwbuild import __version__
from cwbuild.attest import wrap
from cwbuild.attest.api import AttestRequest, Registration, Service, check_workload_id, describe
from cwbuild.attest.metrics import CONTENT_TYPE
from cwbuild.attest.ratelimit import RateLimiter
from cwbuild.errors import AttestRefused, ConfigError, CwbuildError

log = logging.getLogger("cwbuild.attest.server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Largest request body accepted (an SNP report with a cert table is ~12 KiB of base64).
DEFAULT_MAX_BODY = 128 * 1024
_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class ErrorBody(BaseModel):
    error: str = Field(description="stable reason id, e.g. nonce.replayed")
    detail: str = ""


class RegistrationBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workload_id: str = Field(pattern=_ID, max_length=128)
    tee: str = Field(pattern="^(snp|tdx|sim)$")
    reference_values: list[Annotated[str, Field(pattern="^[0-9a-fA-F]{96}$")]] = Field(
        min_length=1, max_length=64
    )
    policy: dict[str, Any] = Field(default_factory=dict)
    secret: str = Field(max_length=4096, description="base64 of the secret (1..190 bytes)")
    replace: bool = False


class WorkloadInfo(BaseModel):
    workload_id: str
    tee: str
    reference_values: list[str]
    policy: dict[str, Any]
    origin: str
    created_at: float
    has_secret: bool
    tee_config: str | None = None


class ChallengeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workload_id: str = Field(pattern=_ID, max_length=128)
    tee: str = Field(pattern="^(snp|tdx|sim)$")


class ChallengeResponse(BaseModel):
    nonce: str = Field(description="32 random bytes, base64url without padding")
    expires_at: str = Field(description="RFC 3339 UTC")


class AttestBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workload_id: str = Field(pattern=_ID, max_length=128)
    nonce: str = Field(max_length=64)
    evidence: str = Field(max_length=48 * 1024, description="base64 of the SNP report or TDX quote")
    certs: str | None = Field(default=None, max_length=96 * 1024, description="base64 of the SNP cert table")
    pubkey: str = Field(max_length=4096, description="base64 of an RSA (>= 2048) SubjectPublicKeyInfo DER")


class AttestResponse(BaseModel):
    wrapped_key: str = Field(description="base64 of RSA-OAEP-SHA256(MGF1-SHA256) of the secret")


@dataclass(frozen=True)
class ServerOptions:
    admin_token: str
    guest_limiter: RateLimiter
    admin_limiter: RateLimiter
    max_body: int = DEFAULT_MAX_BODY


def refusal_response(reason: str, detail: str, status: int) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": reason, "detail": detail}, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: read the whole body (bounded) before the route; above `limit` bytes answer 413."""

    def __init__(self, app: ASGIApp, limit: int, on_refuse: Callable[[str, str], None]) -> None:
        self.app = app
        self.limit = limit
        self.on_refuse = on_refuse  # (client, path): the audit line of this decision

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                await self._refuse(scope, receive, send)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, receive, send)  # the client went away; let the app see it
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        self.on_refuse(str(client[0]) if client else "unknown", str(scope.get("path", "")))
        response = refusal_response("request.too_large", f"request body exceeds {self.limit} bytes", 413)
        await response(scope, receive, send)


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _install_handlers(app: FastAPI, service: Service) -> None:
    @app.exception_handler(AttestRefused)
    async def _refused(request: Request, exc: AttestRefused) -> JSONResponse:
        if not exc.audited:
            service.decide("request", "refuse", exc.reason, client=_client(request), path=request.url.path)
        return refusal_response(exc.reason, exc.detail, exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        where = ", ".join(".".join(map(str, e.get("loc", ()))) for e in exc.errors()[:3])
        service.decide(
            "request",
            "refuse",
            "request.malformed",
            client=_client(request),
            path=request.url.path,
            detail=where,
        )
        return refusal_response("request.malformed", f"invalid request: {where}", 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:  # noqa: ARG001
        reason = {404: "route.not_found", 405: "route.method_not_allowed"}.get(
            exc.status_code, "request.refused"
        )
        return refusal_response(reason, str(exc.detail), exc.status_code)

    @app.exception_handler(CwbuildError)
    async def _cwbuild(request: Request, exc: CwbuildError) -> JSONResponse:
        reason = "request.malformed" if isinstance(exc, ConfigError) else "internal"
        status = 400 if isinstance(exc, ConfigError) else 500
        service.decide(
            "request", "refuse", reason, client=_client(request), path=request.url.path, detail=exc.message
        )
        return refusal_response(reason, exc.message if status == 400 else "internal error", status)

    @app.exception_handler(Exception)
    async def _internal(
        request: Request, exc: Exception
    ) -> JSONResponse:  # the HTTP error middleware (rule 7)
        log.error("internal error on %s: %s", request.url.path, type(exc).__name__)
        service.decide("request", "refuse", "internal", client=_client(request), path=request.url.path)
        return refusal_response("internal", "internal error", 500)


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 429)
}


async def require_admin(request: Request) -> str:
    """Auth action "admin": a bearer token compared in constant time; failures are rate-limited per client."""
    service: Service = request.app.state.service
    options: ServerOptions = request.app.state.options
    client = _client(request)
    if options.admin_limiter.wait_time(client) > 0:
        raise service.refuse(
            "auth", "rate.limited", "too many failed attempts", status=429, workload_id=None, client=client
        )
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    token = options.admin_token.encode("ascii")
    if not (
        scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8", "replace"), token)
    ):
        options.admin_limiter.allow(client)
        raise service.refuse(
            "auth",
            "auth.bad_token",
            "missing or wrong bearer token",
            status=401,
            workload_id=None,
            client=client,
        )
    return client


async def require_guest(request: Request) -> str:
    """Auth action "guest": anyone, rate-limited per client address."""
    service: Service = request.app.state.service
    options: ServerOptions = request.app.state.options
    client = _client(request)
    if not options.guest_limiter.allow(client):
        raise service.refuse(
            "rate", "rate.limited", "too many requests", status=429, workload_id=None, client=client
        )
    return client


Admin = Annotated[str, Depends(require_admin)]
WorkloadId = Annotated[str, Path(pattern=_ID, max_length=128)]
Guest = Annotated[str, Depends(require_guest)]


def create_app(service: Service, options: ServerOptions) -> FastAPI:
    """The ASGI application: routes of API v1 plus /healthz and /metrics."""
    app = FastAPI(title="cwbuild attestation endpoint", version=__version__, docs_url=None, redoc_url=None)
    _install_handlers(app, service)

    def too_large(client: str, path: str) -> None:
        service.decide("request", "refuse", "request.too_large", client=client, path=path)

    app.add_middleware(BodyLimit, limit=options.max_body, on_refuse=too_large)
    app.state.service = service
    app.state.options = options

    @app.post("/v1/workloads", status_code=201, responses=_ERRORS, response_model=WorkloadInfo)
    def register(body: RegistrationBody, client: Admin) -> dict[str, Any]:
        reg = Registration.from_json(body.model_dump())
        service.register(reg, client=client)
        return describe(service.get(reg.workload_id, client=client))

    @app.get("/v1/workloads/{workload_id}", responses=_ERRORS, response_model=WorkloadInfo)
    def get_workload(workload_id: WorkloadId, client: Admin) -> dict[str, Any]:
        return describe(service.get(check_workload_id(workload_id), client=client))

    @app.delete("/v1/workloads/{workload_id}", status_code=204, responses=_ERRORS)
    def delete_workload(workload_id: WorkloadId, client: Admin) -> Response:
        service.delete(check_workload_id(workload_id), client=client)
        return Response(status_code=204)

    # Guest routes are coroutines: their work is ~1 ms of CPU and a non-durable SQLite write, cheaper inline
    # than a thread hop. Only an SNP attestation that may fetch a VCEK from KDS goes to the thread pool.
    @app.post("/v1/challenge", responses=_ERRORS, response_model=ChallengeResponse)
    async def challenge(body: ChallengeBody, client: Guest) -> dict[str, str]:
        nonce, expires = service.challenge(body.workload_id, body.tee, client=client)
        return {"nonce": wrap.b64url(nonce), "expires_at": _rfc3339(expires)}

    @app.post("/v1/attest", responses=_ERRORS, response_model=AttestResponse)
    async def attest(body: AttestBody, client: Guest) -> dict[str, str]:
        start = time.perf_counter()
        try:
            req = AttestRequest.from_json(body.model_dump())
            if service.may_block(req):
                wrapped = await run_in_threadpool(service.attest, req, client=client)
            else:
                wrapped = service.attest(req, client=client)
        finally:
            service.metrics.observe("attest", time.perf_counter() - start)
        return {"wrapped_key": wrap.b64(wrapped)}

    _ops_routes(app, service)
    return app


def _ops_routes(app: FastAPI, service: Service) -> None:
    """Liveness and Prometheus metrics; no auth (they carry counts and ids only)."""

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "workloads": service.store.count_workloads()}

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(service.metrics.render(), media_type=CONTENT_TYPE)
