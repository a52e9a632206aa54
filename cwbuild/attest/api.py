"""The attestation service: the decisions behind API v1, independent of HTTP (DESIGN.md "Attestation API v1").

`Service` registers, describes and deletes workloads, issues nonces and decides attestations. Every decision
is written to the audit log with its stable reason id and counted in the metrics; every refusal raises
`AttestRefused(reason, ...)` and releases nothing. Secrets are sealed before they reach the store and
unsealed only to be wrapped to the key the evidence binds.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cwbuild.attest import wrap
from cwbuild.attest.audit import Audit
from cwbuild.attest.evidence_gate import EvidenceGate
from cwbuild.attest.metrics import Metrics
from cwbuild.attest.policy import Policy
from cwbuild.attest.store import NonceState, Store, Workload
from cwbuild.errors import AttestError, AttestRefused, ConfigError, FormatError

log = logging.getLogger("cwbuild.attest")

#: Registrable TEE types (DESIGN.md: `tee: sim` is the simulated TEE).
TEES = ("snp", "tdx", "sim")
#: Workload ids: buildah's 64-hex and cwbuild's 32-hex ids fit; nothing that needs JSON or URL escapes
#: (cw-format.md §4.4: the krun guest copies them unescaped into fixed buffers).
WORKLOAD_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
#: SNP MEASUREMENT and TDX MRTD are 48 bytes (spec/attestation.md §1.1 0x090, §3.2).
MEASUREMENT_BYTES = 48
MAX_REFERENCE_VALUES = 64
#: Bounds on decoded guest input: an SNP report is 1184 bytes, a TDX quote with its PCK chain a few KiB.
MAX_EVIDENCE_BYTES = 32 * 1024
MAX_CERTS_BYTES = 64 * 1024
MASTER_KEY_CHECK = "master_key_check"
#: Keys of the registration policy that the endpoint sets itself.
_SERVER_POLICY_KEYS = frozenset({"measurements", "report_data"})


@dataclass(frozen=True)
class Limits:
    """Nonce lifetime and bounds (DESIGN.md: nonces live 60 s and are single use)."""

    nonce_ttl: float = 60.0
    max_pending: int = 10000
    max_pending_per_client: int = 64


def check_workload_id(workload_id: str) -> str:
    if not isinstance(workload_id, str) or not WORKLOAD_ID_RE.match(workload_id):
        raise AttestRefused(
            "request.malformed", "workload_id must match [A-Za-z0-9][A-Za-z0-9._-]{0,127}", status=400
        )
    return workload_id


def _measurements(values: Any) -> tuple[str, ...]:
    if not isinstance(values, list) or not 1 <= len(values) <= MAX_REFERENCE_VALUES:
        raise ConfigError(f"reference_values must be a list of 1..{MAX_REFERENCE_VALUES} hex measurements")
    out = []
    for item in values:
        try:
            raw = bytes.fromhex(item) if isinstance(item, str) else b""
        except ValueError:
            raw = b""
        if len(raw) != MEASUREMENT_BYTES:
            raise ConfigError(f"reference value {str(item)[:100]!r} is not {MEASUREMENT_BYTES} bytes of hex")
        out.append(raw.hex())
    return tuple(out)


@dataclass(frozen=True)
class Registration:
    """`POST /v1/workloads`: what the admin registers. `secret` is raw bytes (base64 on the wire)."""

    workload_id: str
    tee: str
    reference_values: tuple[str, ...]
    policy: Mapping[str, Any]
    secret: bytes = field(repr=False)
    replace: bool = False

    @classmethod
    def build(
        cls,
        *,
        workload_id: str,
        tee: Any,
        reference_values: Any,
        policy: Any,
        secret: bytes,
        replace: Any = False,
    ) -> Registration:
        """Validate every field; `ConfigError` names the bad one, never the secret."""
        wid = check_workload_id(workload_id)
        if tee not in TEES:
            raise ConfigError(f"tee must be one of {', '.join(TEES)}")
        policy = policy or {}
        if not isinstance(policy, Mapping) or _SERVER_POLICY_KEYS & set(policy):
            raise ConfigError(
                "policy must be a mapping without measurements/report_data (use reference_values)"
            )
        canonical = Policy.from_dict(policy).to_dict()  # validated; hex lowercase; only the keys given
        policy = {key: canonical[key] for key in policy}
        if not 1 <= len(secret) <= wrap.MAX_SECRET_V1:
            raise ConfigError(f"secret must be 1..{wrap.MAX_SECRET_V1} bytes (the OAEP limit of RSA-2048)")
        if not isinstance(replace, bool):
            raise ConfigError("replace must be true or false")
        return cls(wid, tee, _measurements(reference_values), dict(policy), secret, replace)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Registration:
        """The wire form: like `build`, the secret as base64."""
        secret_text = data.get("secret")
        if not isinstance(secret_text, str):
            raise ConfigError("secret must be a base64 string")
        try:
            secret = wrap.b64_decode(secret_text, what="secret", max_bytes=wrap.MAX_SECRET_V1)
        except FormatError as exc:
            raise ConfigError(exc.message) from None
        return cls.build(
            workload_id=data.get("workload_id", ""),
            tee=data.get("tee"),
            reference_values=data.get("reference_values"),
            policy=data.get("policy"),
            secret=secret,
            replace=data.get("replace", False),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "workload_id": self.workload_id,
            "tee": self.tee,
            "reference_values": list(self.reference_values),
            "policy": dict(self.policy),
            "secret": wrap.b64(self.secret),
            "replace": self.replace,
        }


@dataclass(frozen=True)
class AttestRequest:
    """`POST /v1/attest`, decoded and bounded."""

    workload_id: str
    nonce: bytes
    evidence: bytes
    pubkey_der: bytes
    certs: bytes | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AttestRequest:
        def text(name: str) -> str:
            value = data.get(name)
            if not isinstance(value, str):
                raise AttestRefused("request.malformed", f"{name} must be a string", status=400)
            return value

        try:
            nonce = wrap.b64url_decode(text("nonce"), what="nonce", max_bytes=wrap.NONCE_BYTES)
            evidence = wrap.b64_decode(text("evidence"), what="evidence", max_bytes=MAX_EVIDENCE_BYTES)
            pubkey = wrap.b64_decode(text("pubkey"), what="pubkey", max_bytes=wrap.MAX_PUBKEY_DER)
            certs = data.get("certs")
            table = (
                None
                if certs is None
                else wrap.b64_decode(text("certs"), what="certs", max_bytes=MAX_CERTS_BYTES)
            )
        except FormatError as exc:
            raise AttestRefused("request.malformed", exc.message, status=400) from None
        if len(nonce) != wrap.NONCE_BYTES:
            raise AttestRefused("request.malformed", "nonce must be 32 bytes", status=400)
        return cls(check_workload_id(text("workload_id")), nonce, evidence, pubkey, table)


def describe(workload: Workload) -> dict[str, Any]:
    """`GET /v1/workloads/{id}`: reference values and policy, lowercase hex; never the secret."""
    out: dict[str, Any] = {
        "workload_id": workload.workload_id,
        "tee": workload.tee,
        "reference_values": [dict(v).get("measurement", "") for v in workload.reference_values],
        "policy": dict(workload.policy),
        "origin": workload.origin,
        "created_at": workload.created_at,
        "has_secret": bool(workload.sealed_secret),
    }
    if workload.tee_config is not None:
        out["tee_config"] = workload.tee_config
    return out


class Service:
    """The endpoint's decisions. Thread-safe (the store and audit are)."""

    def __init__(  # noqa: PLR0913 - the service's collaborators, keyword-only
        self,
        *,
        store: Store,
        master_key: bytes,
        audit: Audit,
        metrics: Metrics,
        gate: EvidenceGate,
        limits: Limits = Limits(),
        default_policy: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self._master_key = master_key
        self.audit = audit
        self.metrics = metrics
        self.gate = gate
        self.limits = limits
        self.default_policy = dict(default_policy or {})
        self.clock = clock
        Policy.from_dict(self.default_policy)
        self._check_master_key()

    def _check_master_key(self) -> None:
        """Refuse to run against a database sealed under another master key."""
        sealed = self.store.get_meta(MASTER_KEY_CHECK)
        if sealed is None:
            self.store.set_meta(MASTER_KEY_CHECK, wrap.seal(self._master_key, MASTER_KEY_CHECK, b"cwbuild"))
            return
        try:
            wrap.unseal(self._master_key, MASTER_KEY_CHECK, sealed)
        except AttestError:
            raise AttestError(
                "the master key does not open this database",
                hint="use the master key the database was created with",
            ) from None

    def decide(
        self,
        event: str,
        outcome: str,
        reason: str,
        *,
        workload_id: str | None = None,
        client: str | None = None,
        **fields: str | int | float | bool | None,
    ) -> None:
        self.audit.record(
            event, outcome=outcome, reason=reason, workload_id=workload_id, client=client, **fields
        )
        self.metrics.decision(event, outcome, reason)

    def refuse(
        self, event: str, reason: str, detail: str, *, status: int = 403, workload_id: str | None, client: str
    ) -> AttestRefused:
        self.decide(event, "refuse", reason, workload_id=workload_id, client=client, detail=detail)
        refusal = AttestRefused(reason, detail, status=status)
        refusal.audited = True
        return refusal

    # --- admin ---

    def register(
        self, reg: Registration, *, client: str, origin: str = "v1", tee_config: str | None = None
    ) -> None:
        workload = Workload(
            workload_id=reg.workload_id,
            tee=reg.tee,
            reference_values=tuple({"measurement": m} for m in reg.reference_values),
            policy=dict(reg.policy),
            sealed_secret=wrap.seal(self._master_key, reg.workload_id, reg.secret),
            origin=origin,
            tee_config=tee_config,
            created_at=round(self.clock(), 3),
        )
        event = "register" if origin == "v1" else "kbs.register"
        if not self.store.put_workload(workload, replace=reg.replace):
            raise self.refuse(
                event,
                "workload.exists",
                "workload id already registered",
                status=409,
                workload_id=reg.workload_id,
                client=client,
            )
        self.decide(
            event,
            "allow",
            "workload.registered",
            workload_id=reg.workload_id,
            client=client,
            tee=reg.tee,
            replace=reg.replace,
            reference_values=",".join(reg.reference_values),
            tee_config=tee_config,
        )

    def get(self, workload_id: str, *, client: str) -> Workload:
        workload = self.store.get_workload(workload_id)
        if workload is None:
            raise self.refuse(
                "get",
                "workload.not_found",
                "no such workload",
                status=404,
                workload_id=workload_id,
                client=client,
            )
        return workload

    def delete(self, workload_id: str, *, client: str) -> None:
        if not self.store.delete_workload(workload_id):
            raise self.refuse(
                "delete",
                "workload.not_found",
                "no such workload",
                status=404,
                workload_id=workload_id,
                client=client,
            )
        self.decide("delete", "allow", "workload.deleted", workload_id=workload_id, client=client)

    # --- guest ---

    def challenge(self, workload_id: str, tee: str, *, client: str) -> tuple[bytes, float]:
        """A fresh nonce bound to `workload_id`, and when it expires (epoch seconds)."""
        workload = self.store.get_workload(workload_id)
        if workload is None:
            raise self.refuse(
                "challenge",
                "workload.not_found",
                "no such workload",
                status=404,
                workload_id=workload_id,
                client=client,
            )
        if tee != workload.tee:
            raise self.refuse(
                "challenge",
                "workload.tee_mismatch",
                f"workload is registered for {workload.tee}",
                status=400,
                workload_id=workload_id,
                client=client,
            )
        now = self.clock()
        nonce = wrap.new_nonce()
        expires = now + self.limits.nonce_ttl
        limits = (self.limits.max_pending, self.limits.max_pending_per_client)
        if not self.store.add_nonce(
            nonce, workload_id=workload_id, client=client, expires_at=expires, now=now, limits=limits
        ):
            raise self.refuse(
                "challenge",
                "nonce.too_many_pending",
                "too many pending nonces",
                status=429,
                workload_id=workload_id,
                client=client,
            )
        self.decide("challenge", "allow", "nonce.issued", workload_id=workload_id, client=client)
        return nonce, expires

    def now(self) -> datetime:
        """The verification time: the service clock (so tests can verify old evidence at its time)."""
        return datetime.fromtimestamp(self.clock(), UTC)

    def unseal(self, workload: Workload) -> bytes:
        """The plaintext secret of `workload`, only ever to be wrapped to an attested key."""
        return wrap.unseal(self._master_key, workload.workload_id, workload.sealed_secret)

    def policy_for(self, workload: Workload, report_data: bytes) -> Policy:
        merged = {**self.default_policy, **dict(workload.policy)}
        merged["measurements"] = [dict(v)["measurement"] for v in workload.reference_values]
        return Policy.from_dict(merged).with_report_data(report_data)

    def may_block(self, req: AttestRequest) -> bool:
        """Whether deciding `req` may wait on the network (a VCEK fetch from AMD KDS)."""
        if self.gate.certs.options.offline:
            return False
        workload = self.store.get_workload(req.workload_id)
        return workload is not None and self.gate.may_fetch(workload.tee, req.evidence, req.certs)

    def attest(self, req: AttestRequest, *, client: str) -> bytes:
        """Decide; the secret wrapped (RSA-OAEP-SHA256) to the key bound in the evidence, or AttestRefused."""
        wid = req.workload_id

        def no(reason: str, detail: str, status: int = 403) -> AttestRefused:
            return self.refuse("attest", reason, detail, status=status, workload_id=wid, client=client)

        taken = self.store.take_nonce(req.nonce, now=self.clock())  # spent whatever happens next
        if taken.state is not NonceState.OK:
            raise no(taken.state.value, "nonce refused")
        if taken.workload_id != wid:
            raise no("nonce.workload_mismatch", "nonce was issued for another workload")
        workload = self.store.get_workload(wid)
        if workload is None:
            raise no("workload.not_found", "no such workload", 404)
        try:
            key = wrap.load_pubkey_der(req.pubkey_der)
        except FormatError as exc:
            raise no("pubkey.invalid", exc.message, 400) from None
        policy = self.policy_for(workload, wrap.report_data_v1(req.nonce, req.pubkey_der))
        verdict = self.gate.verify(workload.tee, req.evidence, req.certs, policy=policy, now=self.now())
        if not verdict.ok:
            raise no(verdict.failures[0].id, "evidence refused: " + ",".join(verdict.failure_ids()))
        try:
            wrapped = wrap.wrap_oaep(key, self.unseal(workload))
        except AttestError:
            raise no("secret.too_long_for_key", "secret does not fit the key", 400) from None
        measurement = str(verdict.claims.get("measurement", ""))
        self.decide(
            "attest",
            "allow",
            "key.released",
            workload_id=wid,
            client=client,
            tee=workload.tee,
            measurement=measurement,
        )
        return wrapped
