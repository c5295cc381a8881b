#!/usr/bin/env bash
# Install everything the tests need, then run every test: lint, types, unit, integration.
#   bash scripts/test.sh            # the whole suite
#   bash scripts/test.sh -k broker  # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
source scripts/lib.sh

ensure_system_python
venv=$(choose_venv "$repo")
make_venv "$venv" ".[test]"

echo "== lint and types"
"$venv/bin/ruff" check src tests benchmarks tools
"$venv/bin/ruff" format --check src tests benchmarks tools
"$venv/bin/mypy"

echo "== tests"
# Tests import the installed package (not src/), as other Unix users will.
exec "$venv/bin/python" -m pytest -p no:cacheprovider "$@"
