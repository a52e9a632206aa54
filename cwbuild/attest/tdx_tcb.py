"""Matching a TDX quote against verified TCB info and QE identity (spec/attestation.md §3.6 steps 8-9, §3.8).

Input objects are the already signature-checked JSON of Intel PCS v4 (`tcbInfo` v3, `enclaveIdentity` v2).
Malformed content raises FormatError / KeyError / TypeError / ValueError, which the caller turns into
`tdx.collateral_malformed`.
"""

from __future__ import annotations

from typing import Any

from cwbuild.attest.intel_certs import SGX_TCB_COMPONENTS, PckInfo
from cwbuild.attest.tdx_quote import QeReport, TdBody
from cwbuild.attest.verdict import Findings
from cwbuild.errors import FormatError

TDX_TCB_COMPONENTS = 16  # §3.7 tdxtcbcomponents[16], matched against TEE_TCB_SVN[16]
_MAX_LEVELS = 512  # bounds the walk over hostile collateral


def _masked_equal(value: bytes, mask_hex: str, expected_hex: str) -> bool:
    mask, expected = bytes.fromhex(mask_hex), bytes.fromhex(expected_hex)
    if len(mask) != len(value) or len(expected) != len(value):
        raise FormatError("collateral mask/value length does not match the quote field")
    return bytes(a & b for a, b in zip(value, mask, strict=True)) == expected


def _svns(components: list[Any]) -> list[int]:
    if not isinstance(components, list) or len(components) != SGX_TCB_COMPONENTS:
        raise FormatError("TCB level component list is not 16 entries")
    return [int(c["svn"]) for c in components]


def _level_matches(level: dict[str, Any], *, pck: PckInfo, tee_tcb_svn: bytes) -> bool:
    """§3.8 step 1."""
    tcb = level["tcb"]
    sgx = _svns(tcb["sgxtcbcomponents"])
    tdx = _svns(tcb["tdxtcbcomponents"])
    if any(have < need for have, need in zip(pck.sgx_tcb, sgx, strict=True)):
        return False
    if pck.pcesvn < int(tcb["pcesvn"]):
        return False
    skip = {0, 1} if tee_tcb_svn[1] > 0 else set()  # GTG: module SVNs are matched via the module identity
    return all(tee_tcb_svn[i] >= tdx[i] for i in range(TDX_TCB_COMPONENTS) if i not in skip)


def _levels(obj: dict[str, Any]) -> list[dict[str, Any]]:
    levels = obj["tcbLevels"]
    if not isinstance(levels, list) or len(levels) > _MAX_LEVELS:
        raise FormatError("tcbLevels is not a bounded list")
    return levels


def _module_status(tcb_info: dict[str, Any], body: TdBody, f: Findings) -> str | None:
    """§3.8 step 3: the tdxModuleIdentities entry TDX_%02X, first level with isvsvn <= TEE_TCB_SVN[0]."""
    svn = body.tee_tcb_svn
    if svn[1] == 0:
        return None
    wanted = f"TDX_{svn[1]:02X}"
    for identity in tcb_info.get("tdxModuleIdentities", []):
        if identity.get("id") != wanted:
            continue
        if bytes.fromhex(identity["mrsigner"]) != body.mrsignerseam or not _masked_equal(
            body.seam_attributes, identity["attributesMask"], identity["attributes"]
        ):
            f.fail("tdx.collateral_mismatch", f"TDX module {wanted} signer or attributes do not match")
        for level in _levels(identity):
            if int(level["tcb"]["isvsvn"]) <= svn[0]:
                return str(level["tcbStatus"])
        return None
    f.fail("tdx.collateral_mismatch", f"TCB info has no module identity {wanted}")
    return None


def match_platform(
    tcb_info: dict[str, Any], *, body: TdBody, pck: PckInfo, f: Findings
) -> tuple[str | None, str | None, tuple[str, ...], str | None]:
    """(platform status, module status, advisory ids, tcb date); None where no level matches."""
    if tcb_info.get("id") != "TDX" or tcb_info.get("version") != 3:
        raise FormatError("TCB info is not id TDX version 3")
    if str(tcb_info["fmspc"]).lower() != pck.fmspc.hex() or bytes.fromhex(tcb_info["pceId"]) != pck.pceid:
        f.fail(
            "tdx.collateral_mismatch", f"TCB info is for FMSPC {tcb_info['fmspc']}, the PCK {pck.fmspc.hex()}"
        )
    module = tcb_info["tdxModule"]
    if bytes.fromhex(module["mrsigner"]) != body.mrsignerseam or not _masked_equal(
        body.seam_attributes, module["attributesMask"], module["attributes"]
    ):
        f.fail("tdx.collateral_mismatch", "MRSIGNERSEAM / SEAMATTRIBUTES do not match the TDX module")
    status: str | None = None
    advisories: tuple[str, ...] = ()
    date: str | None = None
    for level in _levels(tcb_info):
        if _level_matches(level, pck=pck, tee_tcb_svn=body.tee_tcb_svn):
            status, date = str(level["tcbStatus"]), str(level.get("tcbDate"))
            advisories = tuple(str(a) for a in level.get("advisoryIDs", []))
            break
    return status, _module_status(tcb_info, body, f), advisories, date


def match_qe(qe_identity: dict[str, Any], *, qe: QeReport, f: Findings) -> str | None:
    """§3.6 step 9: masked MISCSELECT and ATTRIBUTES, MRSIGNER, ISVPRODID; the QE TCB level's status."""
    if qe_identity.get("id") != "TD_QE" or qe_identity.get("version") != 2:
        raise FormatError("QE identity is not id TD_QE version 2")
    misc = qe.misc_select.to_bytes(4, "little")
    checks = {
        "miscselect": _masked_equal(misc, qe_identity["miscselectMask"], qe_identity["miscselect"]),
        "attributes": _masked_equal(qe.attributes, qe_identity["attributesMask"], qe_identity["attributes"]),
        "mrsigner": bytes.fromhex(qe_identity["mrsigner"]) == qe.mr_signer,
        "isvprodid": int(qe_identity["isvprodid"]) == qe.isv_prod_id,
    }
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        f.fail("tdx.qe_identity_mismatch", f"QE report differs from the QE identity in {bad}")
    for level in _levels(qe_identity):
        if int(level["tcb"]["isvsvn"]) <= qe.isv_svn:
            return str(level["tcbStatus"])
    return None
