#!/bin/bash
# The main job on the embedded default: the example image, end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "demo: not yet wired" >&2
