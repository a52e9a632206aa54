#!/bin/bash
# Build the example into the local Podman store as localhost/cwbuild-hello:latest, offline.
# Needs podman and Debian's busybox-static (/bin/busybox, statically linked).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tag=${1:-localhost/cwbuild-hello:latest}
busybox=${BUSYBOX:-/bin/busybox}
if ! [ -x "$busybox" ] || ldd "$busybox" >/dev/null 2>&1; then
  echo "build.sh: $busybox is not a static busybox; apt-get install busybox-static" >&2
  exit 1
fi
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$here/Containerfile" "$here/hello.sh" "$here/motd" "$here/scratch.txt" "$ctx/"
cp "$busybox" "$ctx/busybox"
podman build --quiet --isolation chroot --pull=never -f "$ctx/Containerfile" -t "$tag" "$ctx" >/dev/null
echo "$tag"
