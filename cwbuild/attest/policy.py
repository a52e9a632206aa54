"""The verification policy: what authentic evidence must also satisfy to be accepted.

The same schema is used by workload registration (`POST /v1/workloads`, field `policy`), by
`cwbuild verify-evidence --policy FILE` (JSON or YAML) and by `cwbuild serve`. Every key is optional;
unknown keys are refused so that a misspelt key cannot silently weaken a policy.

Schema (JSON/YAML; hex strings are case-insensitive, without 0x)::

    measurements: [hex, ...]      # allowed SNP MEASUREMENT / TDX MRTD values (48 bytes each);
                                  # empty or absent = not checked (only reported in the claims)
    rtmr0: [hex, ...]             # TDX: allowed RTMR0 values (48 bytes); rtmr1, rtmr2, rtmr3 likewise;
                                  # empty or absent = not checked
    report_data: hex | null       # expected REPORT_DATA / REPORTDATA (64 bytes); null = not checked
    host_data: hex | null         # SNP: expected HOST_DATA (32 bytes)
    mrconfigid: hex | null        # TDX: expected MRCONFIGID (48 bytes)
    mrowner: hex | null           # TDX: expected MROWNER (48 bytes)
    debug: false                  # allow SNP guest policy DEBUG / TDX TD_ATTRIBUTES.DEBUG
    migrate_ma: false             # SNP: allow a migration agent (guest policy MIGRATE_MA)
    smt: true                     # SNP: allow SMT (guest policy SMT)
    single_socket: false          # SNP: require guest policy SINGLE_SOCKET
    vmpl: 0                       # SNP: required VMPL (0..3), null = any
    abi_minimum: "0.0"            # SNP: minimum guest policy ABI "major.minor"
    min_guest_svn: 0              # SNP: minimum GUEST_SVN
    min_tcb:                      # SNP: minimum REPORTED_TCB per product, per component;
      Milan: {bl: 3, tee: 0, snp: 8, ucode: 115}      # a product not listed is not checked;
      Turin: {fmc: 1, bl: 1, tee: 1, snp: 4, ucode: 81}   # "*" applies to every product not listed
    permit_provisional_firmware: false   # SNP: accept COMMITTED_TCB/version below CURRENT
    sept_ve_disable: false        # TDX: require TD_ATTRIBUTES.SEPT_VE_DISABLE
    tcb_statuses: [UpToDate]      # TDX: TCB statuses accepted (checked when collateral is given)
    require_collateral: false     # TDX: refuse when no collateral is given

Sources for the individual checks: spec/attestation.md §1.3 (guest policy bits), §1.10 step 8 (SNP policy
checks), §3.2 (TD attributes), §3.6 step 10 (TDX policy).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from cwbuild.attest.tcb import COMPONENTS, Product, TcbParts
from cwbuild.errors import ConfigError

#: Intel PCS TCB statuses (spec §3.6 step 10, GTG pcs.go).
TCB_STATUSES = frozenset(
    {
        "UpToDate",
        "SWHardeningNeeded",
        "ConfigurationNeeded",
        "ConfigurationAndSWHardeningNeeded",
        "OutOfDate",
        "OutOfDateConfigurationNeeded",
        "Revoked",
    }
)

_MEASUREMENT_LEN = 48  # SNP MEASUREMENT (§1.1 0x090) and TDX MRTD/RTMR (§3.2) are both 48 bytes
_REPORT_DATA_LEN = 64  # SNP REPORT_DATA (§1.1 0x050), TDX REPORTDATA (§3.2 body 520)
_HOST_DATA_LEN = 32  # SNP HOST_DATA (§1.1 0x0C0)


def _hex(value: Any, length: int, key: str) -> bytes:
    if not isinstance(value, str):
        raise ConfigError(f"policy: {key} must be a hex string")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise ConfigError(f"policy: {key} is not hex") from None
    if len(raw) != length:
        raise ConfigError(f"policy: {key} must be {length} bytes, got {len(raw)}")
    return raw


def _hex_list(value: Any, key: str) -> tuple[bytes, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f"policy: {key} must be a list of hex strings")
    return tuple(_hex(item, _MEASUREMENT_LEN, f"{key}[{i}]") for i, item in enumerate(value))


def _opt_hex(value: Any, length: int, key: str) -> bytes | None:
    return None if value is None else _hex(value, length, key)


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"policy: {key} must be true or false")
    return value


def _int(value: Any, key: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"policy: {key} must be an integer in {lo}..{hi}")
    return value


def _abi(value: Any) -> tuple[int, int]:
    text = str(value)
    major, sep, minor = text.partition(".")
    if not sep or not major.isdigit() or not minor.isdigit():
        raise ConfigError('policy: abi_minimum must be "major.minor"')
    return _int(int(major), "abi_minimum major", 0, 255), _int(int(minor), "abi_minimum minor", 0, 255)


def _tcb(value: Any, key: str) -> TcbParts:
    if not isinstance(value, Mapping):
        raise ConfigError(f"policy: {key} must be a mapping of component to SPL")
    unknown = set(value) - set(COMPONENTS)
    if unknown:
        raise ConfigError(f"policy: {key} has unknown components {sorted(unknown)}")
    parts = {
        name: _int(value.get(name, 0), f"{key}.{name}", 0, 255) for name in ("bl", "tee", "snp", "ucode")
    }
    fmc = value.get("fmc")
    return TcbParts(**parts, fmc=None if fmc is None else _int(fmc, f"{key}.fmc", 0, 255))


def _min_tcb(value: Any) -> tuple[tuple[str, TcbParts], ...]:
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise ConfigError("policy: min_tcb must be a mapping of product to TCB")
    names = {p.value for p in Product} | {"*"}
    out = []
    for product, tcb in value.items():
        if product not in names:
            raise ConfigError(f"policy: min_tcb product {product!r} is not one of {sorted(names)}")
        out.append((str(product), _tcb(tcb, f"min_tcb.{product}")))
    return tuple(sorted(out, key=lambda item: item[0]))


def _statuses(value: Any) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError("policy: tcb_statuses must be a list of strings")
    unknown = set(value) - TCB_STATUSES
    if unknown:
        raise ConfigError(f"policy: unknown tcb_statuses {sorted(unknown)}")
    return frozenset(value)


@dataclass(frozen=True)
class Policy:
    """A verification policy; see the module docstring for the schema and defaults."""

    measurements: tuple[bytes, ...] = ()
    rtmrs: tuple[tuple[bytes, ...], ...] = ((), (), (), ())
    report_data: bytes | None = None
    host_data: bytes | None = None
    mrconfigid: bytes | None = None
    mrowner: bytes | None = None
    debug: bool = False
    migrate_ma: bool = False
    smt: bool = True
    single_socket: bool = False
    vmpl: int | None = 0
    abi_minimum: tuple[int, int] = (0, 0)
    min_guest_svn: int = 0
    min_tcb: tuple[tuple[str, TcbParts], ...] = ()
    permit_provisional_firmware: bool = False
    sept_ve_disable: bool = False
    tcb_statuses: frozenset[str] = field(default_factory=lambda: frozenset({"UpToDate"}))
    require_collateral: bool = False

    def min_tcb_for(self, product: Product) -> TcbParts | None:
        """The minimum TCB that applies to `product` (its own entry, else "*", else None)."""
        table = dict(self.min_tcb)
        return table.get(product.value, table.get("*"))

    def with_report_data(self, report_data: bytes) -> Policy:
        """A copy expecting `report_data` (the endpoint binds the nonce per request)."""
        return replace(self, report_data=report_data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        """Parse and validate the schema above; raises ConfigError naming the bad key."""
        if not isinstance(data, Mapping):
            raise ConfigError("policy must be a mapping")
        known = {"measurements", "rtmr0", "rtmr1", "rtmr2", "rtmr3"} | {f.name for f in fields(cls)}
        known.discard("rtmrs")
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"policy: unknown keys {sorted(unknown)}")
        get = data.get
        vmpl = get("vmpl", 0)
        return cls(
            measurements=_hex_list(get("measurements"), "measurements"),
            rtmrs=tuple(_hex_list(get(f"rtmr{i}"), f"rtmr{i}") for i in range(4)),
            report_data=_opt_hex(get("report_data"), _REPORT_DATA_LEN, "report_data"),
            host_data=_opt_hex(get("host_data"), _HOST_DATA_LEN, "host_data"),
            mrconfigid=_opt_hex(get("mrconfigid"), _MEASUREMENT_LEN, "mrconfigid"),
            mrowner=_opt_hex(get("mrowner"), _MEASUREMENT_LEN, "mrowner"),
            debug=_bool(get("debug", False), "debug"),
            migrate_ma=_bool(get("migrate_ma", False), "migrate_ma"),
            smt=_bool(get("smt", True), "smt"),
            single_socket=_bool(get("single_socket", False), "single_socket"),
            vmpl=None if vmpl is None else _int(vmpl, "vmpl", 0, 3),
            abi_minimum=_abi(get("abi_minimum", "0.0")),
            min_guest_svn=_int(get("min_guest_svn", 0), "min_guest_svn", 0, 0xFFFFFFFF),
            min_tcb=_min_tcb(get("min_tcb")),
            permit_provisional_firmware=_bool(
                get("permit_provisional_firmware", False), "permit_provisional_firmware"
            ),
            sept_ve_disable=_bool(get("sept_ve_disable", False), "sept_ve_disable"),
            tcb_statuses=_statuses(get("tcb_statuses", ["UpToDate"])),
            require_collateral=_bool(get("require_collateral", False), "require_collateral"),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form; `Policy.from_dict(p.to_dict()) == p`."""
        out: dict[str, Any] = {
            "measurements": [m.hex() for m in self.measurements],
            "report_data": _maybe_hex(self.report_data),
            "host_data": _maybe_hex(self.host_data),
            "mrconfigid": _maybe_hex(self.mrconfigid),
            "mrowner": _maybe_hex(self.mrowner),
            "debug": self.debug,
            "migrate_ma": self.migrate_ma,
            "smt": self.smt,
            "single_socket": self.single_socket,
            "vmpl": self.vmpl,
            "abi_minimum": f"{self.abi_minimum[0]}.{self.abi_minimum[1]}",
            "min_guest_svn": self.min_guest_svn,
            "min_tcb": {product: tcb.to_dict() for product, tcb in self.min_tcb},
            "permit_provisional_firmware": self.permit_provisional_firmware,
            "sept_ve_disable": self.sept_ve_disable,
            "tcb_statuses": sorted(self.tcb_statuses),
            "require_collateral": self.require_collateral,
        }
        for i, values in enumerate(self.rtmrs):
            out[f"rtmr{i}"] = [v.hex() for v in values]
        return out


def _maybe_hex(value: bytes | None) -> str | None:
    return None if value is None else value.hex()


def load_policy_text(text: str) -> Policy:
    """Parse a policy file's text (YAML, which includes JSON)."""
    import yaml  # noqa: PLC0415 - only the file loader needs yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"policy file is not valid YAML/JSON: {exc}") from None
    return Policy.from_dict(data if data is not None else {})
