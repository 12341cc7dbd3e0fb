#!/usr/bin/env bash
# One machine, several processes: a SuperLink with TLS + SuperNode authentication and N
# SuperNodes (one per shard), ready for `flwr run . <connection>`.
#
#   scripts/deploy/local_federation.sh up     --run-dir DIR [-n 3] [options]
#   scripts/deploy/local_federation.sh status --run-dir DIR
#   scripts/deploy/local_federation.sh down   --run-dir DIR
#
# up options:
#   -n N                 number of SuperNodes / shards (default 3)
#   --port PORT          SuperLink port (default 8000)
#   --connection NAME    connection written to $FLWR_HOME/config.toml (default fedvec-local)
#   --shard-root DIR     SuperNode i gets node config shard-dir="DIR/shard-i"
#   --no-node-auth       TLS only; any SuperNode with the CA may join
#   --insecure           no TLS, no node auth (loopback only; for quick local tests)
# Certificates and keys go to DIR/certs (scripts/make_certs.sh), PIDs to DIR/pids,
# logs to DIR/logs. `down` stops exactly the recorded PIDs.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/common.sh"

action="${1:-}"; shift || true
run_dir="" n=3 port=8000 conn="fedvec-local" shard_root="" node_auth=1 insecure=0
while [ $# -gt 0 ]; do
  case "$1" in
    --run-dir) run_dir="$2"; shift 2 ;;
    -n) n="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --connection) conn="$2"; shift 2 ;;
    --shard-root) shard_root="$2"; shift 2 ;;
    --no-node-auth) node_auth=0; shift ;;
    --insecure) insecure=1; node_auth=0; shift ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[ -n "$run_dir" ] || die "--run-dir is required"
run_dir="$(abspath "$run_dir")"
use_venv

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

case "$action" in
  up)
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "-n wants a positive number"
    mkdir -p "$run_dir"
    link="127.0.0.1:$port"
    if [ "$insecure" = 1 ]; then
      "$here/start_superlink.sh" --run-dir "$run_dir" --insecure --host 127.0.0.1 --port "$port"
      "$here/add_connection.sh" "$conn" "$link" --insecure
    else
      "$REPO_ROOT/scripts/make_certs.sh" "$run_dir/certs" --supernodes "$n" >&2
      auth=(); [ "$node_auth" = 1 ] || auth=(--no-node-auth)
      "$here/start_superlink.sh" --run-dir "$run_dir" --certs "$run_dir/certs" --host 127.0.0.1 --port "$port" "${auth[@]}"
      "$here/add_connection.sh" "$conn" "$link" --root-certificates "$run_dir/certs/ca.crt"
      if [ "$node_auth" = 1 ]; then
        for i in $(seq 1 "$n"); do
          # Registration lives in the SuperLink's database: a restart keeps it.
          out="$(flwr supernode register "$run_dir/certs/supernode-$i.pub" "$conn" --name "org$i" 2>&1)" \
            || { echo "$out" | grep -qi "already in use" || die "registering supernode-$i failed: $out"; }
          if echo "$out" | grep -qi "already in use"; then note "supernode-$i.pub is already registered"
          else note "registered supernode-$i.pub as $(echo "$out" | grep -Eo 'SuperNode [0-9]+' | head -n 1)"; fi
        done
      fi
    fi
    for i in $(seq 1 "$n"); do
      args=(--run-dir "$run_dir" --name "supernode-$i" --superlink "$link" --port "$(free_port)"
            --partition-id $((i - 1)) --num-partitions "$n")
      [ -z "$shard_root" ] || args+=(--shard-dir "$shard_root/shard-$i")
      if [ "$insecure" = 1 ]; then
        args+=(--insecure)
      else
        args+=(--ca "$run_dir/certs/ca.crt")
        [ "$node_auth" = 0 ] || args+=(--key "$run_dir/certs/supernode-$i")
      fi
      "$here/start_supernode.sh" "${args[@]}"
    done
    cat >&2 <<MSG

Federation '$conn' is up: SuperLink $link, $n SuperNodes (run dir $run_dir).
  flwr supernode list $conn
  flwr run . $conn --stream --run-config 'overrides="num_clients=$n"'
  scripts/deploy/local_federation.sh down --run-dir $run_dir
(FLWR_HOME=${FLWR_HOME:-~/.flwr}; num_clients must equal the number of SuperNodes.)
MSG
    ;;
  status)
    for f in "$run_dir"/pids/*.pid; do
      [ -e "$f" ] || continue
      p="$(cat "$f")"
      if kill -0 "$p" 2>/dev/null; then s=running; else s=stopped; fi
      printf '%-14s PID %-8s %s\n' "$(basename "$f" .pid)" "$p" "$s"
    done
    flwr supernode list "$conn" || true
    ;;
  down)
    "$here/stop.sh" "$run_dir"
    ;;
  *) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
