"""Where the endpoint gets Intel TDX collateral (issue 5 item 3; spec/attestation.md §3.7).

Either a fixed offline bundle (`tdx_collateral: FILE` in server.yaml), or — unless offline — the Intel PCS v4
responses for the quote's FMSPC, fetched through `cwbuild.net`, rate-limited, kept in memory for an hour
and failures remembered for a minute. What is fetched is only input to the verifier, which checks every
signature against the pinned Intel root; a failed fetch means "no collateral" (the policy decides whether
that is acceptable: `require_collateral`).
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from dataclasses import dataclass

from cwbuild import net
from cwbuild.attest.collateral import Collateral
from cwbuild.attest.intel_certs import parse_pck_extension, split_pem_chain
from cwbuild.attest.ratelimit import Rate, RateLimiter
from cwbuild.attest.tdx_quote import TdxQuote
from cwbuild.attest.trust import cn
from cwbuild.errors import CwbuildError, FormatError

log = logging.getLogger("cwbuild.attest.pcs")

#: spec §3.7 table: Intel PCS API v4 and the certificates host.
PCS_BASE = "https://api.trustedservices.intel.com"
CERTS_BASE = "https://certificates.trustedservices.intel.com"
TCB_ISSUER_HEADER = "tcb-info-issuer-chain"  # §3.7: URL-encoded PEM, TCB Signing + Root
MAX_RESPONSE = 256 * 1024
CACHE_SECONDS = 3600.0
NEGATIVE_SECONDS = 60.0
PCS_RATE = Rate(per_second=1.0, burst=8)


@dataclass(frozen=True)
class PcsOptions:
    fixed: Collateral | None = None
    offline: bool = False
    pcs_base: str = PCS_BASE
    certs_base: str = CERTS_BASE
    timeout: float = 10.0


def quote_fmspc_and_ca(quote: bytes) -> tuple[str, str]:
    """The FMSPC (12 hex) of the quote's PCK certificate and its PCK CA ("platform" or "processor")."""
    chain = split_pem_chain(TdxQuote.parse(quote).pck_chain_pem)
    if not chain:
        raise FormatError("the quote carries no PCK certificate")
    issuer = cn(chain[0].issuer).lower()
    return parse_pck_extension(chain[0]).fmspc.hex(), "processor" if "processor" in issuer else "platform"


class CollateralSource:
    """Collateral for a quote: the fixed bundle, or PCS responses cached per FMSPC. Thread-safe."""

    def __init__(self, options: PcsOptions) -> None:
        self.options = options
        self._cache: dict[tuple[str, str], tuple[float, Collateral | None]] = {}
        self._lock = threading.Lock()
        self._limiter = RateLimiter(PCS_RATE)

    def _key(self, quote: bytes) -> tuple[str, str] | None:
        try:
            return quote_fmspc_and_ca(quote)
        except FormatError:
            return None  # the verifier reports the malformed quote itself

    def _cached(self, key: tuple[str, str]) -> tuple[bool, Collateral | None]:
        with self._lock:
            hit = self._cache.get(key)
        if hit is None:
            return False, None
        expires, value = hit
        return time.monotonic() < expires, value

    def may_fetch(self, quote: bytes) -> bool:
        """Whether `for_quote` may go to the network for this quote."""
        if self.options.fixed is not None or self.options.offline:
            return False
        key = self._key(quote)
        return key is not None and not self._cached(key)[0]

    def for_quote(self, quote: bytes) -> Collateral | None:
        if self.options.fixed is not None or self.options.offline:
            return self.options.fixed
        key = self._key(quote)
        if key is None:
            return None
        fresh, value = self._cached(key)
        if fresh:
            return value
        if not self._limiter.allow("pcs"):
            log.warning("PCS rate limit reached; no collateral fetched for FMSPC %s", key[0])
            return None
        value = self._fetch(*key)
        with self._lock:
            self._cache[key] = (time.monotonic() + (CACHE_SECONDS if value else NEGATIVE_SECONDS), value)
        return value

    def _get(self, url: str) -> net.Response:
        opts = net.Options(timeout=self.options.timeout, retries=1, max_bytes=MAX_RESPONSE)
        resp = net.request("GET", url, options=opts)
        if resp.status != 200:
            raise FormatError(f"{net.redact_url(url)}: HTTP {resp.status}")
        return resp

    def _fetch(self, fmspc: str, ca: str) -> Collateral | None:
        pcs, certs = self.options.pcs_base, self.options.certs_base
        try:
            tcb = self._get(f"{pcs}/tdx/certification/v4/tcb?fmspc={fmspc}")
            chain = urllib.parse.unquote(tcb.headers.get(TCB_ISSUER_HEADER, "")).encode()
            qe = self._get(f"{pcs}/tdx/certification/v4/qe/identity")
            pck_crl = self._get(f"{pcs}/sgx/certification/v4/pckcrl?ca={ca}&encoding=der").body
            root_crl = self._get(f"{certs}/IntelSGXRootCA.der").body
            return Collateral.from_pcs(
                tcb_info_response=tcb.body,
                qe_identity_response=qe.body,
                issuer_chain=chain,
                pck_crl=pck_crl,
                root_ca_crl=root_crl,
            )
        except CwbuildError as exc:
            log.warning("fetching TDX collateral for FMSPC %s failed: %s", fmspc, exc.message)
            return None
