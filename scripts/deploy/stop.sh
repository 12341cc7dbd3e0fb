#!/usr/bin/env bash
# Stop exactly the processes recorded in <run-dir>/pids (SuperNodes first, SuperLink
# last) and their child processes (SuperExec, flwr-serverapp / flwr-clientapp):
# SIGTERM, then SIGKILL after a grace period. Nothing else is touched.
#
#   scripts/deploy/stop.sh <run-dir> [name ...]     # default: every recorded process
set -euo pipefail
. "$(dirname "$0")/common.sh"

[ $# -ge 1 ] || { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
run_dir="$1"; shift
[ -d "$run_dir/pids" ] || { note "nothing recorded in $run_dir/pids"; exit 0; }
grace="${FEDVEC_STOP_GRACE:-10}"

descendants() {  # all live descendants of PID, children first
  local c
  for c in $(pgrep -P "$1" 2>/dev/null || true); do echo "$c"; descendants "$c"; done
}

ours() {  # is PID still the Flower process we started (PIDs get reused)?
  local args; args="$(ps -o args= -p "$1" 2>/dev/null || true)"
  [[ "$args" == *flower-super* ]]
}

wait_gone() {  # wait_gone SECONDS PID...: 0 when all exited
  local t=0 p alive
  while [ "$t" -lt $(($1 * 10)) ]; do
    alive=0
    for p in "${@:2}"; do
      if kill -0 "$p" 2>/dev/null && [ "$(ps -o stat= -p "$p" | cut -c1)" != Z ]; then alive=1; fi
    done
    [ "$alive" = 0 ] && return 0
    sleep 0.1; t=$((t + 1))
  done
  return 1
}

stop_one() {
  local name="$1" pidf="$run_dir/pids/$1.pid" pid kids
  [ -f "$pidf" ] || { note "$name: no PID file"; return 0; }
  pid="$(cat "$pidf")"
  if ! kill -0 "$pid" 2>/dev/null || ! ours "$pid"; then
    note "$name (PID $pid) is not running"; rm -f "$pidf"; return 0
  fi
  kids="$(descendants "$pid" | tr '\n' ' ')"
  kill -TERM "$pid" 2>/dev/null || true
  if ! wait_gone "$grace" "$pid"; then
    note "$name (PID $pid) ignored SIGTERM for ${grace}s: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true
  fi
  # SuperExec children watch their parent and exit by themselves; give them a moment.
  if [ -n "$kids" ] && ! wait_gone 15 $kids; then
    for k in $kids; do
      if kill -0 "$k" 2>/dev/null; then note "$name: child PID $k still alive: SIGKILL"; kill -KILL "$k" 2>/dev/null || true; fi
    done
  fi
  rm -f "$pidf"
  note "stopped $name (PID $pid${kids:+, children $kids})"
}

if [ $# -gt 0 ]; then
  names=("$@")
else
  names=()
  for f in "$run_dir"/pids/*.pid; do
    [ -e "$f" ] || continue
    n="$(basename "$f" .pid)"; [ "$n" = superlink ] || names+=("$n")
  done
  [ -f "$run_dir/pids/superlink.pid" ] && names+=(superlink)
fi
for n in "${names[@]}"; do stop_one "$n"; done
