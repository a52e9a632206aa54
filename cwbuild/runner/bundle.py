"""Reading a bundle for `cwbuild run`: what to launch, as a `LaunchSpec`, and what it was measured as.

Sources, in the bundle directory (DESIGN.md "Bundle"):
  - `measurement.json` (cwbuild.measure.bundle): the exact `cmdline`, each TEE's `firmware_sha256` and
    assumptions (`vcpus`, `vcpu_type`, `guest_features`, ...). A sim bundle is measured as `snp`.
  - an optional `launch` object (what `cwbuild.launch.launch_assumptions` returns: `tee`, `vcpus`,
    `memory_mib`, `policy`, `vcpu_model`, `guest_features`, `qemu_version`), looked up in `manifest.json` and
    then in `measurement.json`;
  - `manifest.json` for `workload_id` (and `tee`/`tees` when present).
Files are the bundle's fixed names (`vmlinuz`, `initrd.img`, `disk.img`); the firmware is the `firmware/`
file whose sha256 the measurement names, or the TEE's default name when none matches (the signer or the
hardware then measures that file, and the endpoint refuses the result).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cwbuild.errors import FormatError, UsageError
from cwbuild.fileio import read_json_object, sha256_file
from cwbuild.launch.spec import LaunchSpec, Tee
from cwbuild.measure.bundle import as_int

MAX_DOCUMENT = 1 << 20
RUNNABLE = (Tee.SNP, Tee.TDX, Tee.SIM)


def _load_json(path: Path, *, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise FormatError(f"{path} is missing: not a cwbuild bundle")
        return {}
    return read_json_object(path, limit=MAX_DOCUMENT)


def _int(value: Any, what: str) -> int:
    return as_int(value, what, source="bundle")


@dataclass(frozen=True)
class Bundle:
    root: Path
    measurement: dict[str, Any]
    manifest: dict[str, Any]

    @classmethod
    def load(cls, root: Path) -> Bundle:
        if not root.is_dir():
            raise UsageError(f"{root} is not a bundle directory")
        doc = _load_json(root / "measurement.json", required=True)
        if doc.get("format") != 1 or not isinstance(doc.get("measurements"), dict):
            raise FormatError(f"{root}/measurement.json is not a cwbuild measurement.json (format 1)")
        if not isinstance(doc.get("cmdline"), str):
            raise FormatError(f"{root}/measurement.json records no kernel command line")
        return cls(root.resolve(), doc, _load_json(root / "manifest.json", required=False))

    @property
    def launch(self) -> dict[str, Any]:
        for doc in (self.manifest, self.measurement):
            value = doc.get("launch")
            if isinstance(value, dict):
                return value
        return {}

    @property
    def workload_id(self) -> str:
        wid = self.manifest.get("workload_id")
        return wid if isinstance(wid, str) and wid else "bundle"

    def default_tee(self) -> Tee:
        """The TEE the bundle was built for, when it says so unambiguously."""
        named = self.launch.get("tee") or self.manifest.get("tee")
        tees = self.manifest.get("tees")
        if named is None and isinstance(tees, list) and len(tees) == 1:
            named = tees[0]
        if named is None:
            kinds = [t for t in ("snp", "tdx") if t in self.measurement["measurements"]]
            if len(kinds) != 1:
                raise UsageError("the bundle does not say which TEE to launch", hint="pass --tee snp|tdx|sim")
            named = kinds[0]
        try:
            tee = Tee(named)
        except ValueError:
            raise FormatError(f"bundle names an unknown TEE {named!r}") from None
        if tee not in RUNNABLE:
            raise UsageError(f"cwbuild run launches snp, tdx or sim bundles, not {tee}")
        return tee

    def measured(self, tee: Tee) -> dict[str, Any]:
        """The measurement.json entry a launch as `tee` is checked against (sim is measured as snp)."""
        key = "snp" if tee is Tee.SIM else str(tee)
        entry = self.measurement["measurements"].get(key)
        if not isinstance(entry, dict):
            raise UsageError(f"the bundle has no {key} measurement", hint="build it with --tee " + str(tee))
        return entry

    def firmware_for(self, tee: Tee) -> str:
        """Bundle-relative firmware path: the file matching the recorded sha256, else the default name."""
        want = self.measured(tee).get("firmware_sha256")
        fw_dir = self.root / "firmware"
        if fw_dir.is_dir():
            for p in sorted(fw_dir.iterdir()):
                if p.is_file() and not p.is_symlink() and sha256_file(p) == want:
                    return f"firmware/{p.name}"
        return tee.default_firmware

    def spec(self, tee: Tee, *, memory_mib: int | None = None) -> LaunchSpec:
        """The launch spec: values from the recorded assumptions, the launch section, then defaults."""
        a = self.measured(tee).get("assumptions") or {}
        launch = self.launch
        cpus = _int(launch.get("vcpus", a.get("vcpus", 1)), "vcpus")
        memory = memory_mib if memory_mib is not None else _int(launch.get("memory_mib", 2048), "memory_mib")
        extra: dict[str, Any] = {}
        model = launch.get("vcpu_model") or a.get("vcpu_type")
        if tee is not Tee.TDX:
            if isinstance(model, str):
                extra["vcpu_model"] = model
            if "policy" in launch:
                extra["policy"] = _int(launch["policy"], "policy")
            extra["guest_features"] = _int(
                launch.get("guest_features", a.get("guest_features", 1)), "features"
            )
        return LaunchSpec(
            tee=tee,
            workload_id=self.workload_id,
            cmdline=self.measurement["cmdline"],
            cpus=cpus,
            memory_mib=memory,
            firmware=self.firmware_for(tee),
            **extra,
        )
