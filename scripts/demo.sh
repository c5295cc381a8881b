#!/usr/bin/env bash
# Install gpulane and run the main job on the embedded default: a broker with a
# simulated GPU and two users queueing with `gpulane run`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_system_python
venv=$(choose_venv "$PWD")
make_venv "$venv" ".[hub]"
command -v configurable-http-proxy >/dev/null || ensure_proxy
exec "$venv/bin/gpulane" demo "$@"
