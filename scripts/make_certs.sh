#!/usr/bin/env bash
# Make a private CA, a TLS server certificate for the SuperLink, and (optionally)
# SuperNode authentication key pairs.
#
#   scripts/make_certs.sh <out-dir> [--supernodes N] [extra SAN hostname or IP ...]
#
# Writes into <out-dir>:
#   ca.key ca.crt                CA, ECDSA P-384 (keep ca.key offline; ship ca.crt to every SuperNode
#                                and to every machine that runs `flwr`)
#   server.key server.crt        SuperLink certificate, SANs: IP:127.0.0.1, IP:::1,
#                                DNS:localhost, plus every extra name/IP given
#   supernode-<i> supernode-<i>.pub   (i = 1..N, only with --supernodes N)
#                                ECDSA P-384 key pairs in OpenSSH format, as Flower
#                                wants them: the private key goes to
#                                `flower-supernode --auth-supernode-private-key`, the
#                                .pub to `flwr supernode register`.
# Existing files are never overwritten (delete the directory to start over).
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
[ $# -ge 1 ] || usage
case "$1" in -h|--help) usage 0 ;; esac
out="$1"; shift
supernodes=0
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --supernodes) supernodes="${2:?--supernodes needs a number}"; shift 2 ;;
    --supernodes=*) supernodes="${1#*=}"; shift ;;
    -h|--help) usage 0 ;;
    *) extra+=("$1"); shift ;;
  esac
done
[[ "$supernodes" =~ ^[0-9]+$ ]] || { echo "--supernodes wants a number, got '$supernodes'" >&2; exit 2; }
command -v openssl >/dev/null || { echo "openssl not found (apt-get install openssl)" >&2; exit 1; }

mkdir -p "$out"
cd "$out"
umask 077

ip_re='^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$'
san="IP:127.0.0.1,IP:::1,DNS:localhost"
for name in "${extra[@]}"; do
  if [[ "$name" =~ $ip_re || "$name" == *:* ]]; then san+=",IP:$name"; else san+=",DNS:$name"; fi
done

if [ ! -f ca.key ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -sha384 -days 3650 -nodes \
    -keyout ca.key -out ca.crt -subj "/CN=fedvec federation CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  echo "CA:          $out/ca.crt"
fi

if [ ! -f server.key ]; then
  cat > server.ext <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san
EXT
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-384 -sha384 -nodes -keyout server.key -out server.csr \
    -subj "/CN=fedvec superlink" 2>/dev/null
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
    -out server.crt -days 825 -sha384 -extfile server.ext 2>/dev/null
  rm -f server.csr server.ext
  openssl verify -CAfile ca.crt server.crt >/dev/null
  echo "SuperLink:   $out/server.crt ($san)"
fi

for i in $(seq 1 "$supernodes"); do
  key="supernode-$i"
  [ -f "$key" ] && continue
  if command -v ssh-keygen >/dev/null; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "$key" -f "$key"
  else  # Flower depends on `cryptography`, so this works in the project's venv
    python - "$key" <<'PY'
import sys
from pathlib import Path
from cryptography.hazmat.primitives import serialization as s
from cryptography.hazmat.primitives.asymmetric import ec
k = ec.generate_private_key(ec.SECP384R1())
p = Path(sys.argv[1])
p.write_bytes(k.private_bytes(s.Encoding.PEM, s.PrivateFormat.OpenSSH, s.NoEncryption()))
p.chmod(0o600)
Path(f"{p}.pub").write_bytes(k.public_key().public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH) + f" {p.name}\n".encode())
PY
  fi
  echo "SuperNode:   $out/$key (+ .pub)"
done
chmod 644 ca.crt server.crt 2>/dev/null || true
for i in $(seq 1 "$supernodes"); do chmod 644 "supernode-$i.pub"; done
