#!/usr/bin/env bash
# Start one flower-superlink (Flower 1.42) in the background, with TLS and SuperNode
# authentication unless told otherwise. PID and log go into <run-dir>.
#
#   scripts/deploy/start_superlink.sh --run-dir DIR --certs CERT_DIR [options]
#   scripts/deploy/start_superlink.sh --run-dir DIR --insecure          # loopback only
#
# options:
#   --certs DIR       holds ca.crt, server.crt, server.key (scripts/make_certs.sh DIR)
#   --host HOST       bind address (default 127.0.0.1; 0.0.0.0 for other machines)
#   --port PORT       the SuperLink's one HTTP(S) port (default 8000). In Flower 1.42
#                     Fleet API (SuperNodes), Control API (flwr CLI) and Runtime API
#                     (ServerApp) all share it; 9091/9092/9093 are no longer used.
#   --no-node-auth    accept any SuperNode that has the CA (default: only SuperNodes
#                     registered with `flwr supernode register <key.pub>`)
#   --database PATH   SQLite state (default <run-dir>/superlink.db; registrations persist)
#   --insecure        plain HTTP, no node auth; refused unless --host is loopback
set -euo pipefail
. "$(dirname "$0")/common.sh"

run_dir="" certs="" host="127.0.0.1" port="8000" node_auth=1 insecure=0 database=""
while [ $# -gt 0 ]; do
  case "$1" in
    --run-dir) run_dir="$2"; shift 2 ;;
    --certs) certs="$2"; shift 2 ;;
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --database) database="$2"; shift 2 ;;
    --no-node-auth) node_auth=0; shift ;;
    --insecure) insecure=1; shift ;;
    -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[ -n "$run_dir" ] || die "--run-dir is required"
run_dir="$(abspath "$run_dir")"
use_venv
database="${database:-$run_dir/superlink.db}"
mkdir -p "$run_dir"

cmd=(flower-superlink --host "$host" --port "$port" --database "$database"
     --disable-runtime-dependency-installation)
if [ "$insecure" = 1 ]; then
  [ -z "$certs" ] || die "--insecure and --certs exclude each other"
  require_loopback_for_insecure "$host"
  cmd+=(--insecure)
else
  [ -n "$certs" ] || die "--certs DIR is required (or --insecure on loopback)"
  certs="$(abspath "$certs")"
  for f in ca.crt server.crt server.key; do [ -f "$certs/$f" ] || die "missing $certs/$f (run scripts/make_certs.sh $certs)"; done
  cmd+=(--ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.crt" --ssl-keyfile "$certs/server.key")
  [ "$node_auth" = 1 ] && cmd+=(--enable-supernode-auth)
fi

# The ServerApp inherits this working directory: a relative output-dir run config
# ("outputs" by default) lands in <run-dir>/outputs.
cd "$run_dir"
start_bg "$run_dir" superlink "${cmd[@]}"
wait_for_log "$run_dir" superlink "Uvicorn running on" 60
scheme=https; [ "$insecure" = 1 ] && scheme=http
echo "$scheme://$host:$port" > "$run_dir/superlink.url"
note "SuperLink ready on $scheme://$host:$port (node auth: $([ "$insecure" = 0 ] && [ "$node_auth" = 1 ] && echo on || echo off))"
