"""The verification policy schema: parsing, validation, round trip."""

from __future__ import annotations

import json

import pytest

from cwbuild.attest.policy import Policy, load_policy_text
from cwbuild.attest.tcb import Product, TcbParts
from cwbuild.attest.verdict import FAILURE_IDS, Failure, Findings, Verdict
from cwbuild.errors import ConfigError


def test_defaults() -> None:
    p = Policy.from_dict({})
    assert p == Policy()
    assert (p.debug, p.migrate_ma, p.smt, p.single_socket, p.vmpl) == (False, False, True, False, 0)
    assert p.tcb_statuses == frozenset({"UpToDate"})


def test_round_trip() -> None:
    p = Policy.from_dict(
        {
            "measurements": ["ab" * 48],
            "rtmr2": ["cd" * 48],
            "report_data": "00" * 64,
            "host_data": "11" * 32,
            "debug": True,
            "vmpl": None,
            "abi_minimum": "1.51",
            "min_tcb": {"Turin": {"fmc": 1, "bl": 1, "tee": 1, "snp": 4, "ucode": 81}, "*": {"ucode": 9}},
            "tcb_statuses": ["UpToDate", "SWHardeningNeeded"],
            "sept_ve_disable": True,
        }
    )
    assert p.rtmrs[2] == (bytes.fromhex("cd" * 48),)
    assert p.abi_minimum == (1, 51)
    assert p.min_tcb_for(Product.TURIN) == TcbParts(fmc=1, bl=1, tee=1, snp=4, ucode=81)
    assert p.min_tcb_for(Product.MILAN) == TcbParts(bl=0, tee=0, snp=0, ucode=9)
    assert Policy.from_dict(json.loads(json.dumps(p.to_dict()))) == p


@pytest.mark.parametrize(
    "bad",
    [
        {"debugg": True},
        {"debug": "yes"},
        {"measurements": ["zz"]},
        {"measurements": ["00" * 47]},
        {"vmpl": 4},
        {"abi_minimum": "1"},
        {"min_tcb": {"Rome": {}}},
        {"min_tcb": {"Milan": {"xyz": 1}}},
        {"tcb_statuses": ["Fine"]},
        {"report_data": "00" * 32},
    ],
)
def test_rejects(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        Policy.from_dict(bad)


def test_yaml_text() -> None:
    assert load_policy_text("debug: true\nsmt: false\n") == Policy(debug=True, smt=False)
    with pytest.raises(ConfigError):
        load_policy_text("[1, 2")


def test_verdict_json() -> None:
    v = Verdict(ok=False, failures=(Failure("snp.policy_debug", "x"),), claims={"a": 1})
    assert json.loads(v.to_json()) == {
        "ok": False,
        "failures": [{"id": "snp.policy_debug", "detail": "x"}],
        "claims": {"a": 1},
    }
    f = Findings()
    with pytest.raises(KeyError):
        f.fail("snp.no_such_id", "")
    assert all(k.split(".")[0] in ("snp", "tdx") for k in FAILURE_IDS)
