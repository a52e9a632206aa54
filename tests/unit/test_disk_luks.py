"""LUKS writer/reader: round trips (hypothesis), the AF splitter, and hostile headers -> typed errors."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cwbuild.disk import af, footer, luks1, luks2, xts
from cwbuild.disk.kdf import KdfLimits, KdfSpec, KdfType
from cwbuild.disk.luks import LuksFormat, LuksSpec, decrypt_image, encrypt_image, read_header, unlock
from cwbuild.errors import CwbuildError, DiskError, FormatError

FAST = KdfSpec(KdfType.PBKDF2)
ARGON_SMALL = KdfSpec(KdfType.ARGON2ID, time=4, memory_kib=1024, cpus=1)


@settings(max_examples=25, deadline=None)
@given(key=st.binary(min_size=16, max_size=64), hash_name=st.sampled_from(["sha1", "sha256", "sha512"]))
def test_af_round_trip(key: bytes, hash_name: str) -> None:
    material = af.split(key, 50, hash_name)
    assert len(material) == 50 * len(key)
    assert af.merge(material, len(key), 50, hash_name) == key


def _encrypt(tmp: Path, data: bytes, spec: LuksSpec, passphrase: bytes = b"pw") -> Path:
    (tmp / "plain").write_bytes(data)
    return encrypt_image(tmp / "plain", tmp / "disk.img", spec=spec, passphrase=passphrase, workers=1).path


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fmt_sector=st.sampled_from([("luks2", 4096), ("luks2", 512), ("luks2", 2048), ("luks1", 512)]),
    length=st.integers(0, 40_000),
    passphrase=st.binary(min_size=1, max_size=80),
    argon=st.booleans(),
)
def test_round_trip(
    fmt_sector: tuple[str, int],
    length: int,
    passphrase: bytes,
    argon: bool,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    tmp = tmp_path_factory.mktemp("rt")
    fmt, sector = fmt_sector
    kdf = ARGON_SMALL if argon and fmt == "luks2" else FAST
    data = os.urandom(length)
    img = _encrypt(tmp, data, LuksSpec(LuksFormat(fmt), sector, kdf), passphrase)
    header = read_header(img)
    assert (header.version, header.sector_size, header.keyslots[0].kdf) == (int(fmt[-1]), sector, kdf)
    decrypt_image(img, tmp / "out", passphrase=passphrase, workers=1)
    padded = data + bytes(-len(data) % sector)
    assert (tmp / "out").read_bytes() == padded
    assert oct((tmp / "out").stat().st_mode & 0o777) == "0o600"


def test_fresh_randomness_each_time(tmp_path: Path) -> None:
    data = bytes(8192)
    a = _encrypt(tmp_path, data, LuksSpec()).read_bytes()
    b = _encrypt(tmp_path, data, LuksSpec()).read_bytes()
    assert a[168:208] != b[168:208]  # UUID
    assert a[luks2.DATA_OFFSET :] != b[luks2.DATA_OFFSET :]  # volume key


def test_wrong_passphrase_leaves_nothing(tmp_path: Path) -> None:
    img = _encrypt(tmp_path, os.urandom(5000), LuksSpec())
    with pytest.raises(DiskError, match="no keyslot"):
        decrypt_image(img, tmp_path / "out", passphrase=b"nope")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.img", "plain"]


def test_krun_footer_round_trip(tmp_path: Path) -> None:
    cfg = json.dumps({"tee": "snp", "workload_id": "w", "cpus": 2, "ram_mib": 512}).encode()
    (tmp_path / "plain").write_bytes(os.urandom(3 * 4096))
    spec = LuksSpec(LuksFormat.LUKS1, 512)
    img = encrypt_image(
        tmp_path / "plain", tmp_path / "d.img", spec=spec, passphrase=b"p", krun_footer=cfg
    ).path
    raw = img.read_bytes()
    assert len(raw) % 4096 == 0
    assert raw[-12:-8] == b"KRUN"
    assert struct.unpack("<Q", raw[-8:])[0] == len(cfg)
    assert raw[-12 - len(cfg) : -12] == cfg
    assert footer.read(img) == cfg
    decrypt_image(img, tmp_path / "out", passphrase=b"p")
    assert (tmp_path / "out").read_bytes() == (tmp_path / "plain").read_bytes()


@pytest.mark.parametrize(("fmt", "sector"), [("luks1", 512), ("luks2", 4096)])
@pytest.mark.parametrize("size", [1, 511, 512, 4096 + 512, 4096 * 3 - 1, 4096 * 3, 4096 * 5 + 3584])
def test_krun_footer_payload_of_any_length_round_trips(
    fmt: str, sector: int, size: int, tmp_path: Path
) -> None:
    """The footer's zero padding is up to 4095 bytes and the payload ends on any sector boundary before it:
    decrypt finds that boundary (it used to round down to 4096 and lose the payload's last sectors)."""
    plain = os.urandom(size)
    (tmp_path / "plain").write_bytes(plain)
    cfg = json.dumps({"tee": "snp", "cpus": 1}).encode()
    spec = LuksSpec(LuksFormat(fmt), sector, FAST)
    img = encrypt_image(tmp_path / "plain", tmp_path / "d.img", spec=spec, passphrase=b"p", krun_footer=cfg)
    decrypt_image(img.path, tmp_path / "out", passphrase=b"p")
    assert (tmp_path / "out").read_bytes() == plain + bytes(-size % sector)  # the last sector zero-padded


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize(("fmt", "sector", "krun"), [("luks1", 512, True), ("luks2", 4096, False)])
def test_digest_is_the_files(
    workers: int, fmt: str, sector: int, krun: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """encrypt_image's sha256, computed while writing, is hashlib's over the file as it lands: header with
    its zero gaps, payload (its padded last sector too), krun footer."""
    monkeypatch.setattr(xts, "CHUNK", 64 * 1024)
    (tmp_path / "plain").write_bytes(os.urandom(300_001))
    cfg = json.dumps({"tee": "snp", "cpus": 1}).encode() if krun else None
    spec = LuksSpec(LuksFormat(fmt), sector, FAST)
    art = encrypt_image(
        tmp_path / "plain",
        tmp_path / "d.img",
        spec=spec,
        passphrase=b"p",
        krun_footer=cfg,
        workers=workers,
        digest=True,
    )
    raw = art.path.read_bytes()
    assert (art.size, art.sha256) == (len(raw), hashlib.sha256(raw).hexdigest())
    again = encrypt_image(tmp_path / "plain", tmp_path / "e.img", spec=spec, passphrase=b"p", workers=workers)
    assert again.sha256 is None  # not asked for: not computed


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_interrupted_encryption_leaves_nothing(
    stop: type[BaseException], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (or an exit) mid-payload: no temporary output, no worker process left."""
    monkeypatch.setattr(xts, "CHUNK", 64 * 1024)
    (tmp_path / "plain").write_bytes(os.urandom(1 << 20))
    children = Path(f"/proc/self/task/{threading.get_native_id()}/children")
    before = children.read_text()

    def progress(n: int) -> None:
        raise stop("stop")

    with pytest.raises(stop):
        encrypt_image(
            tmp_path / "plain",
            tmp_path / "d.img",
            spec=LuksSpec(kdf=FAST),
            passphrase=b"p",
            workers=2,
            progress=progress,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]
    assert children.read_text() == before


def test_footer_hostile_length(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(bytes(4096) + b"KRUN" + struct.pack("<Q", 1 << 62))
    with pytest.raises(FormatError):
        footer.read(p)
    p.write_bytes(b"{}" + b"KRUN" + struct.pack("<Q", 3))
    with pytest.raises(FormatError):
        footer.read(p)


# ------------------------------------------------------------------------------------------------ hostile


@pytest.fixture(scope="module")
def luks2_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    tmp = tmp_path_factory.mktemp("l2")
    return _encrypt(tmp, os.urandom(8192), LuksSpec()).read_bytes()


@pytest.fixture(scope="module")
def luks1_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    tmp = tmp_path_factory.mktemp("l1")
    return _encrypt(tmp, os.urandom(8192), LuksSpec(LuksFormat.LUKS1, 512)).read_bytes()


def _reseal(area: bytearray, doc: dict[str, object] | str, offset: int = 0) -> None:
    """Replace the JSON of the header copy at `offset` and fix its checksum, like a careful attacker."""
    size = luks2.DEFAULT_HDR_SIZE
    text = doc if isinstance(doc, str) else json.dumps(doc)
    raw = text.encode()
    body = bytearray(area[offset : offset + size])
    body[luks2.BIN_SIZE :] = raw + bytes(size - luks2.BIN_SIZE - len(raw))
    body[luks2.CSUM_OFFSET : luks2.CSUM_OFFSET + 64] = bytes(64)
    body[luks2.CSUM_OFFSET : luks2.CSUM_OFFSET + 32] = hashlib.sha256(body).digest()
    area[offset : offset + size] = body


def _both(image: bytes, mutate: object) -> bytearray:
    data = bytearray(image)
    doc = luks2.load_json(bytes(data[: luks2.DEFAULT_HDR_SIZE]))
    mutate(doc)  # type: ignore[operator]
    _reseal(data, doc, 0)
    _reseal(data, doc, luks2.DEFAULT_HDR_SIZE)
    return data


def _write(tmp: Path, data: bytes | bytearray) -> Path:
    p = tmp / "h.img"
    p.write_bytes(bytes(data))
    return p


@pytest.mark.parametrize("cut", [0, 5, 100, 4095, 4096, 16383, 20000, 40000])
def test_truncated_luks2(cut: int, luks2_image: bytes, tmp_path: Path) -> None:
    p = _write(tmp_path, luks2_image[:cut])
    with pytest.raises(CwbuildError):
        unlock(p, read_header(p), b"pw")


@pytest.mark.parametrize("cut", [0, 300, 591, 592, 4096, 100_000])
def test_truncated_luks1(cut: int, luks1_image: bytes, tmp_path: Path) -> None:
    p = _write(tmp_path, luks1_image[:cut])
    with pytest.raises(CwbuildError):
        unlock(p, read_header(p), b"pw")


def test_one_bad_checksum_falls_back_to_the_other(luks2_image: bytes, tmp_path: Path) -> None:
    for offset in (0, luks2.DEFAULT_HDR_SIZE):
        data = bytearray(luks2_image)
        data[offset + luks2.BIN_SIZE + 10] ^= 1  # corrupt one JSON byte of one copy
        p = _write(tmp_path, data)
        assert unlock(p, read_header(p), b"pw")


def test_both_checksums_bad(luks2_image: bytes, tmp_path: Path) -> None:
    data = bytearray(luks2_image)
    data[luks2.BIN_SIZE + 10] ^= 1
    data[luks2.DEFAULT_HDR_SIZE + luks2.BIN_SIZE + 10] ^= 1
    with pytest.raises(FormatError, match="no intact LUKS2 header"):
        read_header(_write(tmp_path, data))


def _set(path: str, value: object) -> object:
    def mutate(doc: dict[str, object]) -> None:
        *parents, last = path.split(".")
        node: object = doc
        for key in parents:
            node = node[key]  # type: ignore[index]
        node[last] = value  # type: ignore[index]

    return mutate


HOSTILE_JSON = {
    "area outside keyslots area": _set("keyslots.0.area.offset", "0"),
    "area huge": _set("keyslots.0.area.size", str(1 << 62)),
    "area too small": _set("keyslots.0.area.size", "4096"),
    "segment over keyslots": _set("segments.0.offset", "32768"),
    "segment beyond device": _set("segments.0.offset", str(1 << 40)),
    "sector size": _set("segments.0.sector_size", 3000),
    "cipher": _set("segments.0.encryption", "twofish-cbc-essiv:sha256"),
    "key size": _set("keyslots.0.key_size", 1 << 40),
    "stripes": _set("keyslots.0.af.stripes", 1 << 40),
    "salt not base64": _set("keyslots.0.kdf.salt", "!!!"),
    "salt huge": _set("keyslots.0.kdf.salt", base64.b64encode(bytes(5000)).decode()),
    "kdf type": _set("keyslots.0.kdf.type", "scrypt"),
    "iterations as float": _set("keyslots.0.kdf.iterations", 1e300),
    "iterations negative": _set("keyslots.0.kdf.iterations", -5),
    "offset number bomb": _set("segments.0.offset", "9" * 5000),
    "json_size": _set("config.json_size", "999"),
    "keyslots_size beyond": _set("config.keyslots_size", str(1 << 60)),
    "two segments": _set("segments.1", {"type": "crypt"}),
    "digest unbound": _set("digests.0.keyslots", ["5"]),
    "keyslots not object": _set("keyslots", []),
    "many keyslots": _set("keyslots", {str(i): {} for i in range(40)}),
    "argon2 memory below 8 KiB a lane": _set(
        "keyslots.0.kdf", {"type": "argon2id", "time": 4, "memory": 64, "cpus": 16, "salt": "AAAAAAAAAAA="}
    ),
    "mandatory requirement": _set("config.requirements", {"mandatory": ["online-reencrypt-v2"]}),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_JSON))
def test_hostile_luks2_json(name: str, luks2_image: bytes, tmp_path: Path) -> None:
    p = _write(tmp_path, _both(luks2_image, HOSTILE_JSON[name]))
    with pytest.raises(FormatError):
        unlock(p, read_header(p), b"pw")


def test_overlapping_keyslot_areas(luks2_image: bytes, tmp_path: Path) -> None:
    def mutate(doc: dict[str, object]) -> None:
        slots = doc["keyslots"]
        slots["1"] = json.loads(json.dumps(slots["0"]))  # type: ignore[index]
        slots["1"]["area"]["offset"] = str(32768 + 4096)  # type: ignore[index]
        doc["digests"]["0"]["keyslots"] = ["0", "1"]  # type: ignore[index]

    with pytest.raises(FormatError, match="overlap"):
        read_header(_write(tmp_path, _both(luks2_image, mutate)))


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"a":' * 3000 + "1" + "}" * 3000,
        "{" + '"k":1,' * 1500 + '"z":1}',
        "nul",
    ],
)
def test_json_bombs(text: str, luks2_image: bytes, tmp_path: Path) -> None:
    data = bytearray(luks2_image)
    # the metadata area holds 12 KiB of JSON: longer bombs are cut there (and so still malformed)
    size = luks2.DEFAULT_HDR_SIZE
    for off in (0, size):
        body = bytearray(data[off : off + size])
        raw = text.encode()[: size - luks2.BIN_SIZE - 1]
        body[luks2.BIN_SIZE :] = raw + bytes(size - luks2.BIN_SIZE - len(raw))
        body[luks2.CSUM_OFFSET : luks2.CSUM_OFFSET + 64] = bytes(64)
        body[luks2.CSUM_OFFSET : luks2.CSUM_OFFSET + 32] = hashlib.sha256(body).digest()
        data[off : off + size] = body
    with pytest.raises(FormatError):
        read_header(_write(tmp_path, data))


def test_absurd_kdf_costs_refused_before_running(luks2_image: bytes, tmp_path: Path) -> None:
    cases = [
        _set("keyslots.0.kdf", {"type": "argon2id", "time": 4, "memory": 1 << 31, "cpus": 4, "salt": "AAAA"}),
        _set(
            "keyslots.0.kdf", {"type": "argon2i", "time": 1 << 30, "memory": 1024, "cpus": 4, "salt": "AAAA"}
        ),
        _set(
            "keyslots.0.kdf", {"type": "argon2i", "time": 4, "memory": 1024, "cpus": 1 << 20, "salt": "AAAA"}
        ),
        _set("keyslots.0.kdf.iterations", 1 << 40),
        _set("digests.0.iterations", 1 << 40),
    ]
    for mutate in cases:
        p = _write(tmp_path, _both(luks2_image, mutate))
        start = time.monotonic()
        with pytest.raises(FormatError):
            unlock(p, read_header(p), b"pw")
        assert time.monotonic() - start < 1.0


def test_kdf_limit_is_configurable(tmp_path: Path) -> None:
    img = _encrypt(tmp_path, bytes(4096), LuksSpec(kdf=ARGON_SMALL))
    with pytest.raises(FormatError, match="argon2 cost"):
        unlock(img, read_header(img), b"pw", limits=KdfLimits(max_memory_kib=512))
    assert unlock(img, read_header(img), b"pw", limits=KdfLimits(max_memory_kib=1024))


def test_hostile_luks1_fields(luks1_image: bytes, tmp_path: Path) -> None:
    def patch(offset: int, fmt: str, value: object) -> bytearray:
        data = bytearray(luks1_image)
        struct.pack_into(fmt, data, offset, value)
        return data

    slot0 = 208
    cases = {
        "payload beyond": patch(104, ">I", 0xFFFFFFFF),
        "key bytes": patch(108, ">I", 1 << 30),
        "slot state": patch(slot0, ">I", 0x12345678),
        "stripes": patch(slot0 + 44, ">I", 0xFFFFFFFF),
        "material offset beyond payload": patch(slot0 + 40, ">I", 4095),
        "material overlaps header": patch(slot0 + 40, ">I", 0),
        "cipher": patch(8, ">32s", b"twofish"),
        "hash": patch(72, ">32s", b"whirlpool"),
        "uuid": patch(168, ">40s", b"not-a-uuid"),
    }
    for name, data in cases.items():
        with pytest.raises(FormatError):
            read_header(_write(tmp_path, data))
        del name
    data = patch(slot0 + 4, ">I", 0xFFFFFFFF)  # absurd iterations: refused before running
    p = _write(tmp_path, data)
    with pytest.raises(FormatError, match="iterations"):
        unlock(p, read_header(p), b"pw")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 40_000), st.integers(1, 255)), min_size=1, max_size=8))
def test_random_corruption_is_typed(
    flips: list[tuple[int, int]],
    luks1_image: bytes,
    luks2_image: bytes,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    tmp = tmp_path_factory.mktemp("fz")
    for image in (luks1_image, luks2_image):
        data = bytearray(image[:40_960])
        for pos, x in flips:
            data[pos] ^= x
        p = _write(tmp, data)
        try:
            header = read_header(p)
            unlock(p, header, b"pw", limits=KdfLimits(max_iterations=10_000, max_memory_kib=4096))
        except CwbuildError:
            pass


def test_luks1_layout_is_cryptsetups() -> None:
    offsets, payload = luks1.layout(64)
    assert offsets == [8, 512, 1016, 1520, 2024, 2528, 3032, 3536]  # cw-format.md §3.1
    assert payload == 4096  # cryptsetup's 1 MiB-aligned default (luksy: 4040)


def test_kdf_defaults_and_guest_memory_cap() -> None:
    from cwbuild.disk.kdf import default_kdf

    assert default_kdf(generated_passphrase=True) == KdfSpec(KdfType.PBKDF2, iterations=1000)
    user = default_kdf(generated_passphrase=False)
    assert (user.type, user.time, user.memory_kib, user.cpus) == (KdfType.ARGON2ID, 4, 65536, 2)
    assert default_kdf(generated_passphrase=False, guest_memory_mib=128).memory_kib == 32 * 1024
    user.check_guest_memory(256)
    with pytest.raises(DiskError, match="quarter"):
        user.check_guest_memory(255)
    with pytest.raises(DiskError):
        KdfSpec(KdfType.PBKDF2, iterations=999).check_writable()
