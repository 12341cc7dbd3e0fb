#!/usr/bin/env bash
# Creates .venv with everything fedvec needs. The constraints file pins torch to the
# CPU wheel (a looser pin would pull gigabytes of CUDA packages).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test,connectors]"
echo "fedvec installed in $(pwd)/.venv"
