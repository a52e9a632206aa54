#!/bin/bash
# The main job on the embedded default: the example image, end to end.
# For now (until `cwbuild build` exists): build the example into Podman, inspect it through the Podman API,
# flatten it into a root filesystem, and show what the workload would run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
cw() { "$PY" -m cwbuild "$@"; }

image=$(bash examples/hello/build.sh)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== cwbuild inspect $image --json"
cw inspect "$image" --json | tee "$work/inspect.json"

echo "== cwbuild rootfs $image"
cw rootfs "$image" "$work/rootfs" --json > "$work/rootfs.json"

"$PY" - "$work" <<'PYEOF'
import json, os, sys
work = sys.argv[1]
doc = json.load(open(f"{work}/inspect.json"))
res = json.load(open(f"{work}/rootfs.json"))
cfg = doc["config"]
files = sum(len(f) for _, _, f in os.walk(f"{work}/rootfs"))
print(f"image     {doc['id'][:19]}  manifest {doc['manifest_digest'][:19]}  {doc['platform']}")
print(f"layers    {len(doc['layers'])}, {sum(l['size'] for l in doc['layers'])} bytes")
print(f"rootfs    {res['entries']} tar entries applied, {files} files, {res['bytes']} bytes of file data")
print(f"runs      {' '.join(cfg['Entrypoint'] + (cfg['Cmd'] or []))}  in {cfg['WorkingDir']}")
print(f"whiteout  /var/tmp/scratch.txt present: {os.path.exists(work + '/rootfs/var/tmp/scratch.txt')}")
if os.geteuid() == 0:  # as the guest agent will: exec with the image Env, in WorkingDir (made if missing, like crun)
    import subprocess
    env = dict(e.split("=", 1) for e in cfg["Env"] or [])
    argv = cfg["Entrypoint"] + (cfg["Cmd"] or [])
    out = subprocess.run(["chroot", f"{work}/rootfs", "/bin/sh", "-c", 'mkdir -p "$0" && cd "$0" && exec "$@"', cfg["WorkingDir"], *argv],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    print(f"output    {out}")
PYEOF
echo "demo: ok"
