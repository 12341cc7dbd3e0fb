#!/usr/bin/env bash
# Start one flower-supernode (Flower 1.42) in the background; PID and log go into
# <run-dir>. Run one per organisation / shard.
#
#   scripts/deploy/start_supernode.sh --run-dir DIR --name org1 \
#       --superlink HOST:PORT --ca CERT_DIR/ca.crt --key CERT_DIR/supernode-1 \
#       --partition-id 0 --num-partitions 3 [--shard-dir /data/org1] [--port 9094]
#
# options:
#   --name NAME           name of this SuperNode in <run-dir> (pids/NAME.pid, logs/NAME.log)
#   --superlink HOST:PORT the SuperLink's address (default 127.0.0.1:8000)
#   --ca FILE             CA certificate that signed the SuperLink's certificate
#   --key FILE            this SuperNode's private key (OpenSSH ECDSA, from
#                         make_certs.sh --supernodes N); its .pub must be registered
#                         with `flwr supernode register` when the SuperLink uses node auth
#   --partition-id I --num-partitions N   which shard this node holds (node config)
#   --shard-dir DIR       passed on as node config shard-dir="DIR"
#   --node-config STR     extra node config, e.g. 'foo=1 bar="x"' (strings in quotes)
#   --port PORT           this SuperNode's local Runtime API port (default 9094); every
#                         SuperNode on one machine needs its own
#   --insecure            plain HTTP; refused unless --superlink is loopback
set -euo pipefail
. "$(dirname "$0")/common.sh"

run_dir="" name="" superlink="127.0.0.1:8000" ca="" key="" pid_="" nparts="" shard_dir="" extra="" port="9094" insecure=0
while [ $# -gt 0 ]; do
  case "$1" in
    --run-dir) run_dir="$2"; shift 2 ;;
    --name) name="$2"; shift 2 ;;
    --superlink) superlink="$2"; shift 2 ;;
    --ca) ca="$2"; shift 2 ;;
    --key) key="$2"; shift 2 ;;
    --partition-id) pid_="$2"; shift 2 ;;
    --num-partitions) nparts="$2"; shift 2 ;;
    --shard-dir) shard_dir="$2"; shift 2 ;;
    --node-config) extra="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --insecure) insecure=1; shift ;;
    -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[ -n "$run_dir" ] || die "--run-dir is required"
[ -n "$name" ] || die "--name is required"
[[ "$pid_" =~ ^[0-9]+$ && "$nparts" =~ ^[0-9]+$ ]] || die "--partition-id and --num-partitions are required integers"
[ "$pid_" -lt "$nparts" ] || die "--partition-id must be < --num-partitions"
run_dir="$(abspath "$run_dir")"
use_venv

# Node config: strings must be TOML-quoted, numbers bare.
node_config="partition-id=$pid_ num-partitions=$nparts"
if [ -n "$shard_dir" ]; then
  shard_dir="$(abspath "$shard_dir")"
  case "$shard_dir" in *\"*|*\\*) die "--shard-dir must not contain quotes or backslashes" ;; esac
  node_config="shard-dir=\"$shard_dir\" $node_config"
fi
[ -z "$extra" ] || node_config="$node_config $extra"

cmd=(flower-supernode --superlink "$superlink" --host 127.0.0.1 --port "$port"
     --node-config "$node_config")
if [ "$insecure" = 1 ]; then
  [ -z "$ca$key" ] || die "--insecure excludes --ca and --key"
  require_loopback_for_insecure "$superlink"
  cmd+=(--insecure)
else
  [ -n "$ca" ] || die "--ca FILE is required (or --insecure on loopback)"
  [ -f "$ca" ] || die "no CA certificate at $ca"
  cmd+=(--root-certificates "$(abspath "$ca")")
  if [ -n "$key" ]; then
    [ -f "$key" ] || die "no private key at $key"
    cmd+=(--auth-supernode-private-key "$(abspath "$key")")
  fi
fi

mkdir -p "$run_dir" && cd "$run_dir"
start_bg "$run_dir" "$name" "${cmd[@]}"
# "SuperNode ID: ..." is logged once the SuperLink has accepted (activated) the node.
wait_for_log "$run_dir" "$name" "SuperNode ID:" "${FEDVEC_SUPERNODE_TIMEOUT:-60}"
note "$name joined: $(grep -Eo 'SuperNode ID: [0-9]+' "$run_dir/logs/$name.log" | tail -n 1)"
