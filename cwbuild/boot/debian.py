"""A Debian archive, verified the way apt verifies it.

The chain (Debian wiki "SecureApt"; apt's acquire-item.cc): the suite's `InRelease` carries an inline
OpenPGP signature checked by `gpgv` against debian-archive-keyring; only the signed text is parsed; its
`SHA256:` table gives the digest and size of `main/binary-amd64/Packages.*`; each Packages stanza gives the
`SHA256` and `Size` of its .deb. `Valid-Until` and `Date` are enforced like apt does
(Acquire::Check-Valid-Until); `allow_expired` is the equivalent of apt's `Check-Valid-Until=false`
for frozen mirrors.
"""

from __future__ import annotations

import email.utils
import functools
import gzip
import hashlib
import io
import lzma
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cwbuild import net
from cwbuild.errors import FormatError, KitError, ToolError
from cwbuild.run import run

DEFAULT_ARCHIVE = "http://deb.debian.org/debian"
DEFAULT_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
ARCH = "amd64"
COMPONENT = "main"
MAX_INRELEASE_BYTES = 4 * 1024 * 1024  # sid's InRelease is ~200 KiB
MAX_PACKAGES_BYTES = 256 * 1024 * 1024  # decompressed; sid's amd64 Packages is ~70 MiB
MAX_DEB_BYTES = 256 * 1024 * 1024  # the cloud kernel .deb is ~35 MiB
#: apt tolerates a Date this far in the future (clock skew) before "not valid yet".
CLOCK_SKEW = timedelta(minutes=10)
#: Packages index variants in the order we try them (apt prefers the smallest compressed file).
_INDEX_VARIANTS = (("Packages.xz", "xz"), ("Packages.gz", "gz"), ("Packages", ""))


@dataclass(frozen=True)
class Archive:
    """Where packages come from and what key material they are checked against."""

    url: str = DEFAULT_ARCHIVE
    keyring: Path = DEFAULT_KEYRING
    allow_expired: bool = False
    net_options: net.Options = field(default_factory=lambda: net.Options(timeout=60.0, retries=3))


@dataclass(frozen=True)
class Release:
    """The signed text of an InRelease, parsed."""

    fields: Mapping[str, str]
    sha256: Mapping[str, tuple[str, int]]  # path -> (hex digest, size)


@dataclass(frozen=True)
class Package:
    """One stanza of a Packages index (the fields a kit needs)."""

    name: str
    version: str
    architecture: str
    filename: str
    size: int
    sha256: str
    depends: tuple[tuple[str, ...], ...]  # Depends + Pre-Depends: a list of alternatives
    provides: tuple[str, ...]
    suite: str


@dataclass(frozen=True)
class Suite:
    """A verified suite: its release file and its package index."""

    name: str
    release: Release
    packages: Mapping[str, Package]
    provides: Mapping[str, tuple[str, ...]]
    inrelease_sha256: str = ""

    def get(self, name: str) -> Package:
        """The package called `name`, or the first real package providing it."""
        if name in self.packages:
            return self.packages[name]
        for provider in self.provides.get(name, ()):
            if provider in self.packages:
                return self.packages[provider]
        raise KitError(f"package {name!r} not found in {self.name}")


# --- InRelease -----------------------------------------------------------------------------------------


def verify_inrelease(raw: bytes, *, keyring: Path) -> bytes:
    """The signed text of an InRelease file, if `gpgv` finds a good signature by a key in `keyring`.

    Judged like apt's gpgv method: any BADSIG fails; at least one GOODSIG whose VALIDSIG names a strong
    digest is needed; a second signature by a key we do not hold (NO_PUBKEY, e.g. a newer archive key) is
    ignored, as apt does.
    """
    if not keyring.is_file():
        raise KitError(f"keyring {keyring} not found", hint="install debian-archive-keyring")
    with tempfile.TemporaryDirectory(prefix="cwbuild-gpgv-") as tmp:
        signed = Path(tmp) / "InRelease"
        out = Path(tmp) / "signed.txt"
        signed.write_bytes(raw)
        argv = ["gpgv", "--homedir", tmp, "--status-fd", "1", "--keyring", str(keyring)]
        try:
            proc = run([*argv, "--output", str(out), str(signed)], check=False, timeout=60)
        except ToolError as exc:
            raise KitError(f"cannot run gpgv: {exc.message}") from exc
        problem = signature_problem(proc.stdout.decode("utf-8", "replace"))
        if problem is not None or not out.is_file():
            last = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
            raise KitError(
                f"InRelease signature verification failed: {problem or 'no signed text'}",
                hint=f"gpgv said: {last[0]}" if last else None,
            )
        return out.read_bytes()


#: OpenPGP hash algorithm ids apt refuses as weak (RFC 4880 §9.4: 1 MD5, 2 SHA-1, 3 RIPEMD-160).
WEAK_DIGESTS = frozenset({"1", "2", "3"})


def signature_problem(status: str) -> str | None:
    """Why gpgv's --status-fd output does not prove a good signature (None if it does).

    Status lines per GnuPG's doc/DETAILS; each signature starts with NEWSIG. VALIDSIG's 8th field is the
    hash algorithm. An ERRSIG is excused only by a NO_PUBKEY for the same key (a key we do not hold).
    """
    blocks: list[list[list[str]]] = []
    for line in status.splitlines():
        words = line.split()[1:] if line.startswith("[GNUPG:] ") else []
        if not words:
            continue
        if words[0] == "NEWSIG" or not blocks:
            blocks.append([])
        blocks[-1].append(words)
    good = 0
    for block in blocks:
        kinds = {w[0]: w for w in block}
        if "BADSIG" in kinds:
            return "bad signature"
        if "ERRSIG" in kinds and "NO_PUBKEY" not in kinds:
            return "signature could not be checked"
        valid = kinds.get("VALIDSIG", [])
        if "GOODSIG" in kinds and len(valid) >= 9 and valid[8] not in WEAK_DIGESTS:
            good += 1
    return None if good else "no good signature by a key in the keyring"


def parse_release(text: bytes) -> Release:
    """Fields and the SHA256 table of a (verified) Release text (deb822, Debian policy §5.1)."""
    fields: dict[str, str] = {}
    sha256: dict[str, tuple[str, int]] = {}
    current = ""
    for line in text.decode("utf-8", "strict").splitlines():
        if line.startswith((" ", "\t")):
            if current == "SHA256":
                parts = line.split()
                if len(parts) != 3 or not re.fullmatch(r"[0-9a-f]{64}", parts[0]) or not parts[1].isdigit():
                    raise FormatError(f"InRelease: malformed SHA256 line {line.strip()!r}")
                sha256[parts[2]] = (parts[0], int(parts[1]))
            continue
        key, sep, value = line.partition(":")
        if not sep:
            continue
        current = key
        fields[key] = value.strip()
    if not sha256:
        raise FormatError("InRelease: no SHA256 table")
    return Release(fields, sha256)


def check_release(release: Release, *, suite: str, now: datetime, allow_expired: bool) -> None:
    """The checks apt makes on a verified release: right suite, not expired, not from the future."""
    names = {release.fields.get("Codename"), release.fields.get("Suite")}
    if suite not in names:
        raise KitError(f"InRelease is for {sorted(n for n in names if n)}, not {suite!r}")
    date = _date(release.fields.get("Date"), "Date")
    if date is not None and date > now + CLOCK_SKEW:
        raise KitError(f"InRelease of {suite} is not valid yet (Date {date.isoformat()})")
    until = _date(release.fields.get("Valid-Until"), "Valid-Until")
    if until is not None and until < now and not allow_expired:
        raise KitError(
            f"InRelease of {suite} expired on {until.isoformat()}",
            hint="the mirror is stale; --allow-expired accepts it (like apt's Check-Valid-Until=false)",
        )


def _date(value: str | None, name: str) -> datetime | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError) as exc:
        raise FormatError(f"InRelease: bad {name} {value!r}") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# --- Packages index ------------------------------------------------------------------------------------


def index_path(variant: str) -> str:
    """The Packages index path inside dists/SUITE/ for our component and architecture."""
    return f"{COMPONENT}/binary-{ARCH}/{variant}"


def verify_index(release: Release, variant: str, blob: bytes) -> bytes:
    """The decompressed Packages text, if `blob` matches the release's SHA256 and size for `variant`."""
    path = index_path(variant)
    if path not in release.sha256:
        raise KitError(f"InRelease lists no {path}")
    digest, size = release.sha256[path]
    if len(blob) != size or hashlib.sha256(blob).hexdigest() != digest:
        raise KitError(f"{path}: sha256 does not match InRelease", hint="the mirror may be mid-update")
    compression = dict(_INDEX_VARIANTS)[variant]
    try:
        if compression == "xz":
            dec = lzma.LZMADecompressor()
            text = dec.decompress(blob, max_length=MAX_PACKAGES_BYTES)
            if not dec.eof:
                raise FormatError(f"{path}: truncated or larger than {MAX_PACKAGES_BYTES} bytes")
            return text
        if compression == "gz":
            with gzip.GzipFile(fileobj=io.BytesIO(blob)) as fh:
                text = fh.read(MAX_PACKAGES_BYTES + 1)
            if len(text) > MAX_PACKAGES_BYTES:
                raise FormatError(f"{path}: larger than {MAX_PACKAGES_BYTES} bytes")
            return text
    except (lzma.LZMAError, OSError, EOFError) as exc:
        raise FormatError(f"{path}: corrupt: {exc}") from exc
    return blob


def _relations(value: str) -> list[tuple[str, ...]]:
    out = []
    for group in value.split(","):
        alts = []
        for alt in group.split("|"):
            name = alt.strip().split(" ", 1)[0].split("(", 1)[0].split(":", 1)[0].strip()
            if name:
                alts.append(name)
        if alts:
            out.append(tuple(alts))
    return out


def _stanza_fields(stanza: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    key = ""
    for line in stanza.split("\n"):
        if line.startswith((" ", "\t")):
            if key:
                fields[key] += "\n" + line
            continue
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _parse_stanza(stanza: bytes, suite: str) -> Package:
    f = _stanza_fields(stanza.decode("utf-8", "replace").strip("\n"))
    try:
        deps = _relations(f.get("Pre-Depends", "")) + _relations(f.get("Depends", ""))
        pkg = Package(
            name=f["Package"],
            version=f["Version"],
            architecture=f["Architecture"],
            filename=f["Filename"],
            size=int(f["Size"]),
            sha256=f["SHA256"].lower(),
            depends=tuple(deps),
            provides=tuple(n for (n, *_) in _relations(f.get("Provides", ""))),
            suite=suite,
        )
    except (KeyError, ValueError) as exc:
        raise FormatError(f"Packages index of {suite}: malformed stanza ({exc})") from exc
    if not re.fullmatch(r"[0-9a-f]{64}", pkg.sha256) or ".." in pkg.filename.split("/") or pkg.size < 0:
        raise FormatError(f"Packages index of {suite}: bad SHA256, Size or Filename for {pkg.name}")
    return pkg


def _by_version(a: Package, b: Package) -> int:
    return compare_versions(a.version, b.version)


class PackageIndex(Mapping[str, Package]):
    """A Packages index by package name; a stanza is parsed when first used, the highest version wins.

    Only a few dozen of the ~70000 stanzas are ever needed, so they are kept as bytes until then.
    """

    def __init__(self, text: bytes, *, suite: str) -> None:
        self.suite = suite
        self._raw: dict[str, list[bytes]] = {}
        self._parsed: dict[str, Package] = {}
        provides: dict[str, set[str]] = {}
        for chunk in text.split(b"\n\n"):
            stanza = chunk.strip(b"\n")
            if not stanza:
                continue
            if not stanza.startswith(b"Package:"):
                raise FormatError(f"Packages index of {suite}: a stanza does not start with Package:")
            name = (
                stanza[8 : stanza.find(b"\n") if b"\n" in stanza else None].strip().decode("utf-8", "replace")
            )
            self._raw.setdefault(name, []).append(stanza)
            if b"\nProvides:" in stanza:
                for virtual in _parse_stanza(stanza, suite).provides:
                    provides.setdefault(virtual, set()).add(name)
        self.provides = {k: tuple(sorted(v)) for k, v in provides.items()}

    def __getitem__(self, name: str) -> Package:
        if name not in self._parsed:
            candidates = [_parse_stanza(s, self.suite) for s in self._raw[name]]
            self._parsed[name] = max(candidates, key=functools.cmp_to_key(_by_version))
        return self._parsed[name]

    def __contains__(self, name: object) -> bool:
        return name in self._raw

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)


def parse_packages(text: bytes, *, suite: str) -> tuple[PackageIndex, Mapping[str, tuple[str, ...]]]:
    """Packages by name (highest version wins) and the virtual-package map (deb822, Debian policy §5.3)."""
    index = PackageIndex(text, suite=suite)
    return index, index.provides


def closure(suite: Suite, roots: Iterable[str], *, skip: frozenset[str] = frozenset()) -> list[Package]:
    """Every package `roots` need (Depends + Pre-Depends, first satisfiable alternative), sorted by name."""
    seen: dict[str, Package] = {}
    todo = [suite.get(r) for r in roots]
    while todo:
        pkg = todo.pop()
        if pkg.name in seen:
            continue
        seen[pkg.name] = pkg
        for alts in pkg.depends:
            choice = next((a for a in alts if a in suite.packages or a in suite.provides), None)
            if choice is None:
                raise KitError(f"{pkg.name}: no installable candidate for {' | '.join(alts)}")
            if choice not in skip:
                todo.append(suite.get(choice))
    return sorted(seen.values(), key=lambda p: p.name)


# --- version comparison (deb-version(5): epoch, upstream, revision; '~' sorts before everything) --------


def _order(ch: str) -> int:
    if ch == "~":
        return -1
    if ch.isalpha():
        return ord(ch)
    return ord(ch) + 256


def _compare_part(a: str, b: str) -> int:
    while a or b:
        na = re.match(r"\D*", a).group()  # type: ignore[union-attr]  # \D* always matches
        nb = re.match(r"\D*", b).group()  # type: ignore[union-attr]  # \D* always matches
        for i in range(max(len(na), len(nb))):
            ca = _order(na[i]) if i < len(na) else 0
            cb = _order(nb[i]) if i < len(nb) else 0
            if ca != cb:
                return -1 if ca < cb else 1
        a, b = a[len(na) :], b[len(nb) :]
        da = re.match(r"\d*", a).group()  # type: ignore[union-attr]  # \d* always matches
        db = re.match(r"\d*", b).group()  # type: ignore[union-attr]  # \d* always matches
        if int(da or 0) != int(db or 0):
            return -1 if int(da or 0) < int(db or 0) else 1
        a, b = a[len(da) :], b[len(db) :]
    return 0


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as Debian version `a` sorts before, equal to or after `b`."""

    def split(v: str) -> tuple[int, str, str]:
        epoch, _, rest = v.rpartition(":") if ":" in v else ("0", "", v)
        upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "0")
        return int(epoch or 0), upstream, revision

    ea, ua, ra = split(a)
    eb, ub, rb = split(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _compare_part(ua, ub) or _compare_part(ra, rb)


# --- fetching ------------------------------------------------------------------------------------------


def fetch_suite(archive: Archive, name: str, *, now: datetime | None = None) -> Suite:
    """Download and verify InRelease and the Packages index of suite `name`."""
    base = f"{archive.url.rstrip('/')}/dists/{name}"
    raw = net.fetch(f"{base}/InRelease", options=_opts(archive, MAX_INRELEASE_BYTES))
    release = parse_release(verify_inrelease(raw, keyring=archive.keyring))
    check_release(release, suite=name, now=now or datetime.now(UTC), allow_expired=archive.allow_expired)
    for variant, _ in _INDEX_VARIANTS:
        path = index_path(variant)
        if path not in release.sha256:
            continue
        digest, size = release.sha256[path]
        blob = _fetch_index(archive, base, path, digest, size)
        packages, provides = parse_packages(verify_index(release, variant, blob), suite=name)
        return Suite(name, release, packages, provides, hashlib.sha256(raw).hexdigest())
    raise KitError(f"InRelease of {name} lists no {index_path('Packages*')}")


def _fetch_index(archive: Archive, base: str, path: str, digest: str, size: int) -> bytes:
    """The index by its hash (Acquire-By-Hash, immune to mirror updates), else by its name."""
    opts = _opts(archive, size)
    by_hash = f"{base}/{path.rsplit('/', 1)[0]}/by-hash/SHA256/{digest}"
    resp = net.request("GET", by_hash, options=opts)
    if resp.status == 200 and hashlib.sha256(resp.body).hexdigest() == digest:
        return resp.body
    return net.fetch(f"{base}/{path}", options=opts)


def fetch_deb(archive: Archive, pkg: Package) -> bytes:
    """The .deb of `pkg`, checked against the Size and SHA256 of its (verified) Packages stanza."""
    blob = net.fetch(f"{archive.url.rstrip('/')}/{pkg.filename}", options=_opts(archive, pkg.size))
    verify_deb(pkg, blob)
    return blob


def verify_deb(pkg: Package, blob: bytes) -> None:
    """Refuse a .deb whose size or sha256 differs from its Packages stanza."""
    if len(blob) != pkg.size or hashlib.sha256(blob).hexdigest() != pkg.sha256:
        raise KitError(f"{pkg.name} {pkg.version}: .deb sha256 does not match the Packages index")


def _opts(archive: Archive, max_bytes: int) -> net.Options:
    o = archive.net_options
    return net.Options(
        ca_file=o.ca_file, timeout=o.timeout, retries=o.retries, backoff=o.backoff, max_bytes=max_bytes
    )
