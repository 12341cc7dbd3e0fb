# Shared helpers for scripts/deploy/*.sh (sourced, not run).
# Every process we start is recorded as <run-dir>/pids/<name>.pid with its log in
# <run-dir>/logs/<name>.log; stop.sh stops exactly those PIDs (and their children).

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

die() { echo "error: $*" >&2; exit 1; }
note() { echo "[deploy] $*" >&2; }

# Use the project's venv (flower-superexec spawns flwr-serverapp / flwr-clientapp by
# name, so the venv's bin/ must be on PATH, and they must import fedvec).
use_venv() {
  local venv="${FEDVEC_VENV:-$REPO_ROOT/.venv}"
  if [ -x "$venv/bin/flower-superlink" ]; then
    export PATH="$venv/bin:$PATH"
  fi
  command -v flower-superlink >/dev/null || die "flower-superlink not on PATH; run scripts/setup.sh or set FEDVEC_VENV"
  # The venv already holds every dependency; never let Flower `uv sync` a fresh env
  # (it would download a multi-GB CUDA torch).
  export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
  export FLWR_DISABLE_UPDATE_CHECK=1
}

# Host part of HOST, HOST:PORT, [V6]:PORT.
host_of() {
  local a="$1"
  case "$a" in
    \[*\]*) a="${a#\[}"; echo "${a%%\]*}" ;;
    *:*:*) echo "$a" ;;            # bare IPv6, no port
    *:*) echo "${a%:*}" ;;
    *) echo "$a" ;;
  esac
}

is_loopback() {
  case "$(host_of "$1")" in
    localhost|::1|127.*) return 0 ;;
    *) return 1 ;;
  esac
}

# Refuse --insecure unless every address is loopback.
require_loopback_for_insecure() {
  local a
  for a in "$@"; do
    is_loopback "$a" || die "--insecure is allowed only on loopback (127.0.0.1, ::1, localhost), not '$a'.
Without TLS every message, model update and query travels in clear text and any
machine can join. Make certificates with scripts/make_certs.sh and drop --insecure."
  done
  note "WARNING: insecure mode (no TLS, no SuperNode authentication): loopback only, for local tests"
}

abspath() { python3 -c 'import os,sys; print(os.path.abspath(sys.argv[1]))' "$1"; }

# start_bg <run-dir> <name> <cmd...>: start a detached process, record its PID and log.
start_bg() {
  local run_dir="$1" name="$2"; shift 2
  mkdir -p "$run_dir/pids" "$run_dir/logs"
  local pidf="$run_dir/pids/$name.pid" log="$run_dir/logs/$name.log"
  if [ -f "$pidf" ] && kill -0 "$(cat "$pidf")" 2>/dev/null; then
    die "$name already runs (PID $(cat "$pidf")); stop it first: scripts/deploy/stop.sh $run_dir"
  fi
  printf '%q ' "$@" > "$run_dir/logs/$name.cmd"; echo >> "$run_dir/logs/$name.cmd"
  nohup "$@" > "$log" 2>&1 < /dev/null &
  echo $! > "$pidf"
  note "started $name (PID $!), log $log"
}

# wait_for_log <run-dir> <name> <regex> [timeout-s]: wait until the log shows regex.
wait_for_log() {
  local run_dir="$1" name="$2" re="$3" timeout="${4:-60}"
  local pid log="$run_dir/logs/$2.log" t=0
  pid="$(cat "$run_dir/pids/$name.pid")"
  while [ "$t" -lt $((timeout * 5)) ]; do
    grep -Eq "$re" "$log" 2>/dev/null && return 0
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "---- $log (tail)" >&2; tail -n 20 "$log" >&2
      die "$name (PID $pid) exited before it was ready"
    fi
    sleep 0.2; t=$((t + 1))
  done
  echo "---- $log (tail)" >&2; tail -n 20 "$log" >&2
  die "$name not ready after ${timeout}s"
}
