#!/usr/bin/env bash
# `flwr run` that exits non-zero when the run fails. Flower 1.42's `flwr run --stream`
# exits 0 even when the ServerApp raised; the run's status is only in `flwr ls`.
#
#   scripts/flwr-run.sh . [FEDERATION] [flwr run options ...]
#
# Streams the run, then asks the SuperLink for its status: exit 0 when it is
# finished:completed, 1 otherwise (with Flower's status details on stderr).
set -uo pipefail
app="${1:-.}"; shift || true
superlink=()
if [[ $# -gt 0 && "$1" != -* ]]; then superlink=("$1"); shift; fi
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
flwr run "$app" "${superlink[@]}" --stream "$@" 2>&1 | tee "$log"
run_id="$(grep -oE 'Successfully started run [0-9]+' "$log" | grep -oE '[0-9]+$' | head -1)"
if [[ -z "$run_id" ]]; then
  echo "flwr-run.sh: the run did not start (see above)" >&2
  exit 1
fi
status_json="$(flwr ls "${superlink[@]}" --run-id "$run_id" --format json)"
python3 - "$run_id" "$status_json" <<'PY'
import json, sys
run_id, raw = sys.argv[1], sys.argv[2]
runs = json.loads(raw).get("runs", [])
status = runs[0].get("status", "?") if runs else "unknown"
details = runs[0].get("status-details", "") if runs else raw
if status != "finished:completed":
    print(f"flwr-run.sh: run {run_id} ended {status}: {details}", file=sys.stderr)
    sys.exit(1)
print(f"flwr-run.sh: run {run_id} {status}")
PY
