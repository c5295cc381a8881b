#!/usr/bin/env bash
# Benchmark gpulane (and, as root, plain Slurm beside it); not a test.
#   bash scripts/bench.sh                         # both benchmarks: broker, then %%gpu cells
#   bash scripts/bench.sh --n 10 --no-slurm       # both; --n and --[no-]slurm go to each
#   bash scripts/bench.sh broker --handoff-n 5    # only benchmarks/broker_bench.py, with its options
#   bash scripts/bench.sh cell --warmup 1         # only benchmarks/cell_bench.py, with its options
#   bash scripts/bench.sh load --samples 200      # only benchmarks/load_bench.py (root): the broker under load
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
source scripts/lib.sh

which=both
case "${1:-}" in
    broker | cell | load) which=$1; shift ;;
esac

ensure_system_python
venv=$(choose_venv "$repo")
make_venv "$venv" "."
if [ "$which" = load ]; then
    echo "== benchmark: broker under load (benchmarks/load_bench.py)"
    exec "$venv/bin/python" benchmarks/load_bench.py "$@"
fi
if [ "$which" != broker ] && ! "$venv/bin/python" -c "import ipykernel, jupyter_client" 2>/dev/null; then
    echo "== installing ipykernel and jupyter_client into $venv (the cell benchmark drives a kernel)"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "ipykernel>=6.25" "jupyter_client>=8.3"
    chmod -R a+rX "$venv"
fi

if [ "$which" != cell ]; then
    echo "== benchmark: broker (benchmarks/broker_bench.py)"
    "$venv/bin/python" benchmarks/broker_bench.py "$@"
fi
if [ "$which" != broker ]; then
    echo
    echo "== benchmark: %%gpu cell start (benchmarks/cell_bench.py)"
    "$venv/bin/python" benchmarks/cell_bench.py "$@"
fi
