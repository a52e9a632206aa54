"""krun-sev.json against files written by Debian sid's `buildah mkcw` 1.43.2 (see tests/golden/README.md).

Same inputs, byte-identical output: key order, Go's JSON escaping (<, >, & as \\u003c...), the tee_data
string, sev_no_es canonicalised to "sev".
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cwbuild.launch import render_launch
from cwbuild.launch.spec import Tee
from tests.launchutil import spec_for

GOLDEN = Path(__file__).parent / "launch"
#: The URL given to buildah: its <, > and & exercise Go's HTML-safe escaping.
URL = "http://127.0.0.1:1/a<b>&c"


@pytest.mark.parametrize(
    ("buildah_type", "tee"), [("snp", Tee.SNP), ("sev", Tee.SEV_ES), ("sev_no_es", Tee.SEV)]
)
def test_krun_sev_json_equals_buildah_mkcw(buildah_type: str, tee: Tee) -> None:
    assert Tee.from_buildah_type(buildah_type) is tee
    spec = spec_for(tee, workload_id=f"lw-{buildah_type}-0123", cpus=3, memory_mib=1024, attestation_url=URL)
    rendered = render_launch(spec)["launch/krun-sev.json"].encode()
    assert rendered == (GOLDEN / f"buildah-mkcw-{buildah_type}.json").read_bytes()


def test_other_values_change_the_file() -> None:
    """The golden files are not matched by accident: each input moves the output."""
    base = spec_for(Tee.SNP, workload_id="lw-snp-0123", cpus=3, memory_mib=1024, attestation_url=URL)
    golden = (GOLDEN / "buildah-mkcw-snp.json").read_bytes()
    for change in ({"cpus": 4}, {"memory_mib": 2048}, {"snp_gen": "genoa"}, {"attestation_url": ""}):
        spec = dataclasses.replace(base, **change)
        assert render_launch(spec)["launch/krun-sev.json"].encode() != golden
