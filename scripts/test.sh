#!/usr/bin/env bash
# Install everything the tests need, then run every test: lint, types, unit, integration.
#   bash scripts/test.sh            # the whole suite
#   bash scripts/test.sh -k broker  # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
source scripts/lib.sh

ensure_system_python
command -v configurable-http-proxy >/dev/null || ensure_proxy  # JupyterHub's proxy, for the hub tests
if [ "$(id -u)" = 0 ] && ! command -v chromium >/dev/null; then
    # The browser tests drive Debian's Chromium with Playwright (its own browser download is not used).
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
if [ "$(id -u)" = 0 ] && ! command -v setfacl >/dev/null; then
    # The device-access tests (and a root broker that enforces it) set ACLs with setfacl.
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq acl >/dev/null
fi
venv=$(choose_venv "$repo")
make_venv "$venv" ".[test]"
# PyTorch paths of %%gpu run on the CPU here: this machine kind has the CPU build of
# torch 2.13.0 on disk, which `pip install torch==2.13.0` takes (no download).
"$venv/bin/python" -c "import torch" 2>/dev/null || "$venv/bin/python" -m pip install -q torch==2.13.0

echo "== lint and types"
"$venv/bin/ruff" check src tests benchmarks tools
"$venv/bin/ruff" format --check src tests benchmarks tools
"$venv/bin/mypy"

echo "== tests"
# The CUDA tests (tests/integration/test_cuda.py) need an NVIDIA GPU: selected only
# where nvidia-smi sees one, so a machine without a GPU (CI) runs everything else.
select=()
if ! nvidia-smi -L >/dev/null 2>&1; then
    select=(-m "not cuda")
fi
# Tests import the installed package (not src/), as other Unix users will.
exec "$venv/bin/python" -m pytest -p no:cacheprovider "${select[@]}" "$@"
