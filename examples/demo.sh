#!/bin/bash
# The main job, end to end, on this machine (no TEE hardware needed: the simulated TEE, development only):
#   1. build the example image into Podman (examples/hello, offline);
#   2. start a local attestation endpoint over TLS (a throwaway CA made here with openssl) that trusts the
#      simulated TEE's signing key;
#   3. `cwbuild build --tee sim`: encrypted disk, kernel + measured initrd with the guest agent, the endpoint's
#      CA and URL, measurements, launch configs; registered with the endpoint (key + reference measurement);
#   4. `cwbuild inspect` and `cwbuild measure --bundle` on the bundle;
#   5. `cwbuild run --tee sim`: QEMU (TCG) boots it, the agent attests to the endpoint (10.0.2.2 is the host
#      from inside the guest), gets the key, dm-crypt opens the disk and the image's entrypoint runs.
# Needs: podman, qemu-system-x86_64, openssl (scripts/setup.sh); the kit is fetched (or CWBUILD_KIT_CACHE reused).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
cw() { "$PY" -m cwbuild "$@"; }
KIT_CACHE=${CWBUILD_KIT_CACHE:-}
kit_flags=()
[ -n "$KIT_CACHE" ] && kit_flags=(--kit-cache "$KIT_CACHE")

echo "== cwbuild kit fetch (Debian trixie cloud kernel + userland, sid OVMF; signatures checked as apt does)"
# --allow-expired: this workplace's Debian mirror serves a sid InRelease past its Valid-Until; the signature,
# index and package hashes are still checked. A cached kit of the same packages is reused (same id).
cw kit fetch --allow-expired "${kit_flags[@]/--kit-cache/--cache}"

image=$(bash examples/hello/build.sh)
work=$(mktemp -d)
server_pid=
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
umask 077

echo "== a throwaway CA and endpoint certificate (127.0.0.1 for the build, 10.0.2.2 for the guest)"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=cwbuild demo CA" \
  -keyout "$work/ca.key" -out "$work/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=cwbuild demo endpoint" \
  -keyout "$work/server.key" -out "$work/server.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,IP:10.0.2.2\nextendedKeyUsage=serverAuth\n' > "$work/ext.cnf"
openssl x509 -req -in "$work/server.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" -CAcreateserial -days 2 \
  -extfile "$work/ext.cnf" -out "$work/server.pem" 2>/dev/null
openssl rand -hex 32 > "$work/master.key"
openssl rand -hex 24 > "$work/token"
openssl ecparam -name secp384r1 -genkey -noout 2>/dev/null | openssl pkcs8 -topk8 -nocrypt -out "$work/sim.key"
openssl pkey -in "$work/sim.key" -pubout -out "$work/sim.pub"

echo "== cwbuild serve (TLS, trusting the simulated TEE)"
cw serve --listen 127.0.0.1:0 --db "$work/attest.db" --admin-token-file "$work/token" \
  --master-key-file "$work/master.key" --tls-cert "$work/server.pem" --tls-key "$work/server.key" \
  --insecure-sim-trust "$work/sim.pub" --offline --audit-log "$work/audit.log" 2> "$work/serve.log" &
server_pid=$!
for _ in $(seq 100); do
  url=$(sed -n 's/^cwbuild serve: listening on \(https:\/\/[^ ]*\).*/\1/p' "$work/serve.log")
  [ -n "$url" ] && break
  sleep 0.1
done
[ -n "$url" ] || { cat "$work/serve.log" >&2; exit 1; }
port=${url##*:}
echo "endpoint $url"

echo "== cwbuild build $image --tee sim"
cw build "$image" -o "$work/bundle" --tee sim --memory 512 "${kit_flags[@]}" \
  --attestation-url "https://10.0.2.2:$port" --attestation-ca "$work/ca.pem" \
  --register-url "https://127.0.0.1:$port" --register-token-file "$work/token"

echo "== cwbuild inspect"
cw inspect "$work/bundle"
echo "== cwbuild measure --bundle"
cw measure --bundle "$work/bundle"

echo "== cwbuild run --tee sim (QEMU TCG; the guest attests, unlocks its disk and runs the entrypoint)"
cw run "$work/bundle" --tee sim --sim-key "$work/sim.key" --accel tcg --timeout 600 | tee "$work/console.log"
grep -q "hello from a confidential workload" "$work/console.log"
echo "== the endpoint's audit log"
grep -o '"event": *"[a-z_.]*"' "$work/audit.log" | sort | uniq -c || true
echo "demo: ok"
