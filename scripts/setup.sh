#!/bin/bash
# Installs everything cwbuild and its tests need on a fresh Debian 12 machine (idempotent, run as root).
#   - Debian packages (bookworm): podman, e2fsprogs, cryptsetup, QEMU, busybox, debootstrap, ...
#   - test peers from Debian's archive: luksy, ovmf-amdsev/ovmf-inteltdx (sid) and a Debian cloud kernel,
#     unpacked under $CWBUILD_ASSETS (default /var/cache/cwbuild-test-assets)
#   - a venv (.venv) with cwbuild and its dev extra (sev-snp-measure, signify, pytest, ...)
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS=${CWBUILD_ASSETS:-/var/cache/cwbuild-test-assets}
export DEBIAN_FRONTEND=noninteractive

APT_PACKAGES=(
  podman uidmap fuse-overlayfs skopeo umoci
  e2fsprogs cryptsetup-bin
  qemu-system-x86 qemu-utils ovmf
  busybox-static cpio zstd xz-utils debootstrap kmod binutils
  openssl curl gnupg gpgv debian-archive-keyring
  sbsigntool osslsigncode libxml2-utils gcc libc6-dev
  # python3-dev: Python.h, for the cffi extension that `pip install` compiles (cwbuild/disk/_xts_build.py)
  python3-venv python3-dev
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Test peers from Debian's archive, outside the host's package database.
mkdir -p "$ASSETS"
T=$ASSETS/aptsid
if [ ! -f "$T/.updated" ] || [ -n "$(find "$T/.updated" -mmin +1440 2>/dev/null)" ]; then
  mkdir -p "$T/etc/apt/sources.list.d" "$T/lists/partial" "$T/archives/partial"
  cat > "$T/etc/apt/sources.list.d/sid.sources" <<EOS
Types: deb
URIs: http://deb.debian.org/debian
Suites: sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOS
  sid_apt() { apt-get -o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts="$T/etc/apt/sources.list.d" \
    -o Dir::State::Lists="$T/lists" -o Dir::Cache::Archives="$T/archives" -o Dir::State::status=/dev/null "$@"; }
  sid_apt update -q
  (cd "$ASSETS" && for p in luksy ovmf-amdsev ovmf-inteltdx; do
     ls ${p}_*.deb >/dev/null 2>&1 || sid_apt download "$p"; done)
  touch "$T/.updated"
fi
for deb in "$ASSETS"/luksy_*.deb "$ASSETS"/ovmf-*.deb; do
  [ -f "$deb.unpacked" ] || { dpkg -x "$deb" "$ASSETS/x"; touch "$deb.unpacked"; }
done
# sid's libvirt schemas and QEMU for the launch-config tests (bookworm's libvirt 9.0 and QEMU 7.2 know neither
# SEV-SNP nor TDX): libvirt-common's domain.rng, and qemu-system-x86 plus its library closure, run through the
# unpacked dynamic loader (no chroot needed).
sid_opts=(-o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts="$T/etc/apt/sources.list.d"
  -o Dir::State::Lists="$T/lists" -o Dir::Cache::Archives="$T/archives" -o Dir::State::status=/dev/null)
if [ ! -f "$ASSETS/sid-libvirt/usr/share/libvirt/schemas/domain.rng" ]; then
  (cd "$ASSETS" && { ls libvirt-common_*.deb >/dev/null 2>&1 || apt-get "${sid_opts[@]}" download libvirt-common; })
  dpkg -x "$(ls "$ASSETS"/libvirt-common_*.deb | tail -1)" "$ASSETS/sid-libvirt"
fi
Q=$ASSETS/sid-qemu
if [ ! -x "$Q/usr/bin/qemu-system-x86_64" ]; then
  rm -rf "$Q.debs" "$Q.tmp"; mkdir -p "$Q.debs"
  libs=$(apt-cache "${sid_opts[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
    --no-replaces --no-enhances qemu-system-x86 | grep -E '^(lib|zlib1g)' | sort -u)
  # shellcheck disable=SC2086 # one package name per word
  (cd "$Q.debs" && apt-get "${sid_opts[@]}" download -q qemu-system-x86 $libs)
  for deb in "$Q.debs"/*.deb; do dpkg -x "$deb" "$Q.tmp"; done
  rm -rf "$Q.debs"; mv "$Q.tmp" "$Q"
fi
if ! ls "$ASSETS"/linux-image-*cloud*.deb >/dev/null 2>&1; then
  [ -n "$(apt-cache depends linux-image-cloud-amd64 2>/dev/null)" ] || apt-get update -q
  kpkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends/{print $2; exit}')
  (cd "$ASSETS" && apt-get download "$kpkg")
fi
[ -d "$ASSETS/kernel" ] || dpkg -x "$ASSETS"/linux-image-*cloud*.deb "$ASSETS/kernel"

# Python: a venv with the package (editable) and the dev extra.
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[dev]'
echo "setup done: .venv, assets in $ASSETS"
