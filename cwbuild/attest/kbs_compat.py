"""`--kbs-compat`: reference-kbs as buildah mkcw and the krun C guest speak it (cw-format.md §2, §4.4, §5).

Byte-level quirks kept: buildah's `register_workload` body (four JSON strings, `tee_config` a JSON string,
no credentials) answered 200 with an empty body; the krun guest's `/auth` with `extra-params` as a JSON
string and the cookie `session_id`; `/attest` answered with an empty body on success (any body is failure to
the guest); `/key/<id>` answered with a JSON string of hex RSA-PKCS#1 v1.5 ciphertext, small enough for the
guest's single-chunk reader.

Holes of reference-kbs closed (§5 "Security observations"): registration only from `--kbs-compat-allow`
networks and never overwriting; a session attests once, for the workload it named at `/auth`, and fetches
only that workload's key, once; evidence goes through the same verifier and policy (TCB, debug, VMPL) as v1.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from cwbuild.attest import wrap
from cwbuild.attest.api import MAX_EVIDENCE_BYTES, Registration, Service, check_workload_id
from cwbuild.attest.ratelimit import RateLimiter
from cwbuild.errors import AttestError, AttestRefused, ConfigError, FormatError

#: reference-kbs keeps sessions 3 h (§5); trustee 5 min (§6.1). A guest needs seconds.
SESSION_TTL = 300.0
MAX_SESSIONS = 10000
COOKIE = "session_id"  # §4.4: the C guest reads exactly this cookie name
MAX_KBS_BODY = 8 * 1024  # the guest's request buffer is 1024 bytes; the report travels as 2368 hex chars
MAX_TEE_CONFIG = 1024
_REGISTER_KEYS = frozenset({"workload_id", "launch_measurement", "passphrase", "tee_config"})
_SNP_MEASUREMENT_HEX = 96  # §2.1/§8: the `SNP:` line of krunfw_measurement, 48 bytes
DEFAULT_ALLOW = ("127.0.0.0/8", "::1/128")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class Session:
    workload_id: str
    nonce: str
    client: str
    created: float
    state: str = "new"  # new -> attested -> used, or new -> failed
    key: rsa.RSAPublicKey | None = field(default=None, repr=False)


class Sessions:
    """Bounded, expiring, thread-safe session table."""

    def __init__(self, ttl: float = SESSION_TTL, limit: int = MAX_SESSIONS) -> None:
        self.ttl = ttl
        self.limit = limit
        self._items: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def new(self, workload_id: str, client: str) -> tuple[str, Session]:
        sid = secrets.token_hex(16)  # 32 hex characters, like reference-kbs's simple UUID
        session = Session(workload_id, secrets.token_hex(16), client, time.monotonic())
        with self._lock:
            self._items[sid] = session
            while len(self._items) > self.limit:
                self._items.popitem(last=False)
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        with self._lock:
            session = self._items.get(sid)
            if session is not None and time.monotonic() - session.created > self.ttl:
                del self._items[sid]
                return None
            return session

    def transition(self, session: Session, expected: str, new: str) -> bool:
        """Atomically move `session` from `expected` to `new`."""
        with self._lock:
            if session.state != expected:
                return False
            session.state = new
            return True


def parse_networks(cidrs: Sequence[str]) -> tuple[Network, ...]:
    try:
        return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)
    except ValueError as exc:
        raise ConfigError(f"--kbs-compat-allow: {exc}") from None


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    if len(raw) > MAX_KBS_BODY:
        raise AttestRefused("request.too_large", f"{what} body is too large", status=413)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise AttestRefused("request.malformed", f"{what} body is not JSON", status=400) from None
    if not isinstance(data, dict):
        raise AttestRefused("request.malformed", f"{what} body is not a JSON object", status=400)
    return data


def _string(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise AttestRefused("request.malformed", f"{key} must be a string", status=400)
    return value


def _inner_json(text: str, what: str) -> dict[str, Any]:
    """§4.4: `extra-params` and `tee-evidence` are JSON documents inside JSON strings."""
    return _json_object(text.encode("utf-8"), what)


def _registration(data: dict[str, Any]) -> tuple[Registration, str]:
    """buildah's RegistrationRequest (§2.1) as a registration under the server's default policy."""
    if set(data) != _REGISTER_KEYS:
        raise AttestRefused(
            "request.malformed", "register_workload needs exactly buildah's four fields", status=400
        )
    wid = check_workload_id(_string(data, "workload_id"))
    measurement = _string(data, "launch_measurement").lower()
    if len(measurement) != _SNP_MEASUREMENT_HEX or not all(c in "0123456789abcdef" for c in measurement):
        raise AttestRefused(
            "kbs.measurement_unsupported",
            "launch_measurement must be an SNP measurement (96 hex)",
            status=400,
        )
    tee_config = _string(data, "tee_config")
    if len(tee_config) > MAX_TEE_CONFIG:
        raise AttestRefused("request.malformed", "tee_config is too long", status=400)
    _inner_json(
        tee_config, "tee_config"
    )  # kept verbatim for the audit log only (§2.2: bits 15 is permissive)
    secret = _string(data, "passphrase").encode("utf-8")
    if not 1 <= len(secret) <= wrap.MAX_SECRET_PKCS1:
        raise AttestRefused(
            "request.malformed", f"passphrase must be 1..{wrap.MAX_SECRET_PKCS1} bytes", status=400
        )
    return Registration(wid, "snp", (measurement,), {}, secret, replace=False), tee_config


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


class KbsCompat:
    """The `/kbs/v0` routes on top of the v1 service."""

    def __init__(self, service: Service, *, allow: Sequence[Network], limiter: RateLimiter) -> None:
        self.service = service
        self.allow = tuple(allow)
        self.limiter = limiter
        self.sessions = Sessions()

    def _refuse(
        self, event: str, reason: str, detail: str, *, status: int, wid: str | None, client: str
    ) -> Response:
        self.service.decide(event, "refuse", reason, workload_id=wid, client=client, detail=detail)
        body = json.dumps({"error": reason}, separators=(",", ":"))
        return Response(body, status_code=status, media_type="application/json")

    def _allowed(self, client: str) -> bool:
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return False
        return any(address in net for net in self.allow)

    async def register_workload(self, request: Request) -> Response:
        client = _client(request)
        if not self._allowed(client):
            return self._refuse(
                "kbs.register",
                "kbs.network_refused",
                "client not in --kbs-compat-allow",
                status=403,
                wid=None,
                client=client,
            )
        try:
            reg, tee_config = _registration(_json_object(await request.body(), "register_workload"))
            self.service.register(reg, client=client, origin="kbs", tee_config=tee_config)
        except AttestRefused as exc:
            if exc.audited:
                return Response(status_code=exc.status)
            return self._refuse(
                "kbs.register", exc.reason, exc.detail, status=exc.status, wid=None, client=client
            )
        return Response(status_code=200)  # §2.1: the body is ignored; reference-kbs sends none

    async def auth(self, request: Request) -> Response:
        client = _client(request)
        if not self.limiter.allow(client):
            return self._refuse(
                "kbs.auth", "rate.limited", "too many requests", status=429, wid=None, client=client
            )
        try:
            data = _json_object(await request.body(), "auth")
            if _string(data, "tee") != "snp":
                raise AttestRefused("kbs.tee_unsupported", "only tee snp is supported", status=400)
            wid = check_workload_id(
                _string(_inner_json(_string(data, "extra-params"), "extra-params"), "workload_id")
            )
        except AttestRefused as exc:
            return self._refuse(
                "kbs.auth", exc.reason, exc.detail, status=exc.status, wid=None, client=client
            )
        workload = self.service.store.get_workload(wid)
        if workload is None or workload.tee not in ("snp", "sim"):
            return self._refuse(
                "kbs.auth",
                "workload.not_found",
                "no SNP workload with this id",
                status=400,
                wid=wid,
                client=client,
            )
        sid, session = self.sessions.new(wid, client)
        self.service.decide("kbs.auth", "allow", "session.issued", workload_id=wid, client=client)
        body = json.dumps({"nonce": session.nonce, "extra-params": ""}, separators=(",", ":"))
        response = Response(body, media_type="application/json")
        response.set_cookie(COOKIE, sid, max_age=int(SESSION_TTL), httponly=True, path="/")
        return response

    async def attest(self, request: Request) -> Response:
        client = _client(request)
        session = self.sessions.get(request.cookies.get(COOKIE))
        try:
            wid, tee = await self._attest(session, await request.body())
        except AttestRefused as exc:
            named = session.workload_id if session else None
            return self._refuse(
                "kbs.attest", exc.reason, exc.detail, status=exc.status, wid=named, client=client
            )
        self.service.decide(
            "kbs.attest", "allow", "session.attested", workload_id=wid, client=client, tee=tee
        )
        return Response(status_code=200)  # §4.4 4e: any non-empty body is failure to the guest

    async def _attest(self, session: Session | None, body: bytes) -> tuple[str, str]:
        """Verify the session's one attempt: (workload id, TEE type) on success, else AttestRefused."""
        if session is None:
            raise AttestRefused("session.unknown", "no valid session cookie", status=401)
        if not self.sessions.transition(session, "new", "failed"):
            raise AttestRefused("session.used", "this session already attested", status=401)
        report, key, report_data = self._evidence(body, session)
        workload = self.service.store.get_workload(session.workload_id)
        if workload is None:
            raise AttestRefused("workload.not_found", "workload was deleted", status=404)
        policy, gate, now = (
            self.service.policy_for(workload, report_data),
            self.service.gate,
            self.service.now(),
        )
        if gate.may_fetch(workload.tee, report, None):  # a VCEK from KDS: off the event loop
            verdict = await run_in_threadpool(gate.verify, workload.tee, report, None, policy=policy, now=now)
        else:
            verdict = gate.verify(workload.tee, report, None, policy=policy, now=now)
        if not verdict.ok:
            raise AttestRefused(verdict.failures[0].id, ",".join(verdict.failure_ids()))
        session.key = key
        session.state = "attested"
        return workload.workload_id, workload.tee

    def _evidence(self, raw: bytes, session: Session) -> tuple[bytes, rsa.RSAPublicKey, bytes]:
        data = _json_object(raw, "attest")
        pub = data.get("tee-pubkey")
        if not isinstance(pub, dict) or pub.get("alg") != "RSA":
            raise AttestRefused(
                "request.malformed", "tee-pubkey must be {alg: RSA, k-mod, k-exp}", status=400
            )
        k_mod, k_exp = _string(pub, "k-mod"), _string(pub, "k-exp")
        evidence = _inner_json(_string(data, "tee-evidence"), "tee-evidence")
        report_hex = _string(evidence, "report")
        if len(report_hex) > 2 * MAX_EVIDENCE_BYTES:
            raise AttestRefused("request.malformed", "report is too long", status=400)
        try:
            report = bytes.fromhex(report_hex)
            key = wrap.load_krun_pubkey(k_mod, k_exp)
        except ValueError:
            raise AttestRefused("request.malformed", "report is not hex", status=400) from None
        except FormatError as exc:
            raise AttestRefused("pubkey.invalid", exc.message, status=400) from None
        return report, key, wrap.report_data_krun(session.nonce, k_mod, k_exp)

    async def key(self, request: Request, key_id: str) -> Response:
        client = _client(request)
        try:
            ciphertext, tee = self._key(self.sessions.get(request.cookies.get(COOKIE)), key_id)
        except AttestRefused as exc:
            return self._refuse(
                "kbs.key", exc.reason, exc.detail, status=exc.status, wid=key_id[:128], client=client
            )
        self.service.decide("kbs.key", "allow", "key.released", workload_id=key_id, client=client, tee=tee)
        return Response(json.dumps(ciphertext.hex()), media_type="application/json")  # §4.4 4f: "<hex>"

    def _key(self, session: Session | None, key_id: str) -> tuple[bytes, str]:
        """The secret of `key_id` for an attested session of that very workload, once (§5's hole closed)."""
        if session is None or session.key is None:
            raise AttestRefused("session.unknown", "no attested session", status=401)
        if key_id != session.workload_id:
            raise AttestRefused("session.wrong_workload", f"session attested for {session.workload_id}")
        if not self.sessions.transition(session, "attested", "used"):
            raise AttestRefused("session.used", "key already fetched in this session", status=401)
        workload = self.service.store.get_workload(key_id)
        if workload is None:
            raise AttestRefused("workload.not_found", "workload was deleted", status=404)
        try:
            return wrap.wrap_pkcs1v15(session.key, self.service.unseal(workload)), workload.tee
        except AttestError:
            raise AttestRefused(
                "secret.too_long_for_key", "secret does not fit the key", status=400
            ) from None

    def router(self) -> APIRouter:
        router = APIRouter(prefix="/kbs/v0", include_in_schema=False)
        router.add_api_route("/register_workload", self.register_workload, methods=["POST"])
        router.add_api_route("/auth", self.auth, methods=["POST"])
        router.add_api_route("/attest", self.attest, methods=["POST"])
        router.add_api_route("/key/{key_id}", self.key, methods=["GET"])
        return router
