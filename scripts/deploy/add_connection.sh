#!/usr/bin/env bash
# Add (or replace) a SuperLink connection in $FLWR_HOME/config.toml (default ~/.flwr),
# so that `flwr run . <name>` and `flwr supernode register ... <name>` reach it.
#
#   scripts/deploy/add_connection.sh <name> <host:port> --root-certificates CERT_DIR/ca.crt [--default]
#   scripts/deploy/add_connection.sh <name> 127.0.0.1:8000 --insecure      # loopback only
#
# Result (Flower 1.42 format):
#   [superlink.<name>]
#   address = "<host:port>"
#   root-certificates = "/abs/path/ca.crt"     # or: insecure = true
set -euo pipefail
. "$(dirname "$0")/common.sh"

[ $# -ge 2 ] || { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
name="$1" address="$2"; shift 2
ca="" insecure=0 make_default=0
while [ $# -gt 0 ]; do
  case "$1" in
    --root-certificates) ca="$2"; shift 2 ;;
    --insecure) insecure=1; shift ;;
    --default) make_default=1; shift ;;
    *) die "unknown argument '$1'" ;;
  esac
done
use_venv
if [ "$insecure" = 1 ]; then
  [ -z "$ca" ] || die "--insecure excludes --root-certificates"
  require_loopback_for_insecure "$address"
else
  [ -n "$ca" ] && [ -f "$ca" ] || die "--root-certificates CA_FILE is required (or --insecure on loopback)"
  ca="$(abspath "$ca")"
fi

python - "$name" "$address" "$ca" "$insecure" "$make_default" <<'PY'
import os, sys
from pathlib import Path
import tomli, tomli_w  # both are Flower dependencies

name, address, ca, insecure, make_default = sys.argv[1:]
home = Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser()
home.mkdir(parents=True, exist_ok=True)
path = home / "config.toml"
if path.exists():
    cfg = tomli.loads(path.read_text())
else:  # Flower's own default file, so `flwr run .` (local simulation) keeps working
    from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML
    cfg = tomli.loads(DEFAULT_FLOWER_CONFIG_TOML)
links = cfg.setdefault("superlink", {})
entry = {"address": address}
if insecure == "1":
    entry["insecure"] = True
else:
    entry["root-certificates"] = ca
links[name] = entry
if make_default == "1":
    links["default"] = name
path.write_text(tomli_w.dumps(cfg))
print(f"[deploy] connection '{name}' -> {address} written to {path}", file=sys.stderr)
PY
