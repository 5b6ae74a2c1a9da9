#!/bin/sh
# Container entrypoint for both roles: the first argument picks the program.
#   encode-server ... | language-server ... | deepsplit ... (tiny-model, up, bench) | any other command
# Unless given, each role's transfer address defaults to this container's own IP (what peers on the
# same Docker network or pod network reach); Kubernetes manifests pass it explicitly (--transfer-host).
set -eu
# This host's address as peers see it: what its name resolves to, unless that is loopback (then the
# source address of the default route; connecting a UDP socket sends nothing).
own_ip() {
  python - <<'PY'
import socket
try:
    ip = socket.gethostbyname(socket.gethostname())
except OSError:
    ip = "127.0.0.1"
if ip.startswith("127."):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            ip = s.getsockname()[0]
        except OSError:
            pass
print(ip)
PY
}
case "${1:-}" in
  encode-server | language-server)
    ip="$(own_ip)"
    export DEEPSPLIT_ENCODE_TRANSFER_HOST="${DEEPSPLIT_ENCODE_TRANSFER_HOST:-$ip}"
    export DEEPSPLIT_LANGUAGE_TRANSFER_HOST="${DEEPSPLIT_LANGUAGE_TRANSFER_HOST:-$ip}"
    exec "$@"
    ;;
  "")
    echo "usage: <image> encode-server|language-server|deepsplit [ARGS...]" >&2
    exit 2
    ;;
  *)
    exec "$@"
    ;;
esac
