#!/usr/bin/env bash
# Layer-7 requests through the mesh, beside the same requests direct and through HAProxy, in one
# run. wrk (keep-alive, small responses) from host 2 to an HTTP server on host 3:
#
#   direct   wrk -> server                                   (plain TCP over the underlay veth)
#   haproxy  wrk -> HAProxy (h2) -> mTLS -> HAProxy (h3) -> server      (HTTP mode both hops)
#   mesh     wrk in the client workload -> meshd (h2) -> mTLS, HTTP/2 CONNECT -> meshd (h3),
#            policy per request -> server workload
#
# Runs ROUNDS rounds (default 3) of the three in turn and reports each path's median round. Prints
# a table (requests/s, p50 and p99 latency) and writes JSON (OUT, default target/bench-l7.json).
#
#   sudo benches/l7.sh [seconds] [connections]     (defaults: 10 s, 32 connections)
#
# Needs root. Builds the release binaries; installs wrk, haproxy and openssl (apt) if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}; conns=${2:-32}
[ "$(id -u)" = 0 ] || { echo "l7.sh: needs root (network namespaces)" >&2; exit 1; }
need=()
for pair in wrk:wrk haproxy:haproxy openssl:openssl nft:nftables; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
[ ${#need[@]} -eq 0 ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; }
cargo build --release --locked -q -p control -p meshctl -p meshd
cargo build --release --locked -q -p mesh-tests --bin mesh-echo
bin=$(realpath -m "${CARGO_TARGET_DIR:-target}")/release  # where cargo put them
out=${OUT:-$PWD/target/bench-l7.json}

p="l7$$"
SERVER_COMMAND="exec $bin/mesh-echo http 8080 server"
# shellcheck source=benches/lab-lib.sh
. "$PWD/benches/lab-lib.sh"
h2ns=$(host 2); h3ns=$(host 3)

# The same server for the baselines, in host 3's own namespace.
ip netns exec "$h3ns" "$bin/mesh-echo" http 8081 server &
# HAProxy's mTLS: a CA, a server and a client certificate (P-256, as the mesh uses).
pki="$work/pki"; mkdir -p "$pki"
ossl() { openssl "$@" >/dev/null 2>&1; }
ossl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=bench-ca \
  -keyout "$pki/ca.key" -out "$pki/ca.crt"
for who in server client; do
  ossl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$who" -keyout "$pki/$who.key" -out "$pki/$who.csr"
  ossl x509 -req -in "$pki/$who.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial -days 1 -out "$pki/$who.crt"
  cat "$pki/$who.crt" "$pki/$who.key" >"$pki/$who.pem"
done
cat >"$work/haproxy-a.cfg" <<EOF
global
  maxconn 4096
defaults
  mode http
  timeout connect 3s
  timeout client 30s
  timeout server 30s
frontend local
  bind 127.0.0.1:9001
  default_backend remote
backend remote
  http-reuse always
  server b $(addr 3):9443 ssl verify required ca-file $pki/ca.crt crt $pki/client.pem sni str(server) alpn http/1.1
EOF
cat >"$work/haproxy-b.cfg" <<EOF
global
  maxconn 4096
defaults
  mode http
  timeout connect 3s
  timeout client 30s
  timeout server 30s
frontend mtls
  bind $(addr 3):9443 ssl crt $pki/server.pem ca-file $pki/ca.crt verify required ssl-min-ver TLSv1.3 alpn http/1.1
  default_backend app
backend app
  http-reuse always
  server app 127.0.0.1:8081
EOF
ip netns exec "$h2ns" haproxy -q -f "$work/haproxy-a.cfg" &
ip netns exec "$h3ns" haproxy -q -f "$work/haproxy-b.cfg" &

vip=$(meshctl service inspect server | python3 -c "import json,sys; print(json.load(sys.stdin)['vips']['bench'])")
ready() { ip netns exec "$1" curl -sf -m 2 -o /dev/null "$2"; }
for _ in $(seq 100); do
  ready "$h2ns" "http://$(addr 3):8081/" && ready "$h2ns" http://127.0.0.1:9001/ && ready "$cli_ns" "http://$vip:8080/" && break
  sleep 0.2
done
for target in "$h2ns http://$(addr 3):8081/" "$h2ns http://127.0.0.1:9001/" "$cli_ns http://$vip:8080/"; do
  # shellcheck disable=SC2086
  ready $target || { echo "l7.sh: $target does not answer" >&2; exit 1; }
done

run() { # name, namespace, url -> "name rps p50_ms p99_ms"
  local text
  text=$(ip netns exec "$2" wrk -t2 -c"$conns" -d"${secs}s" --latency "$3")
  python3 - "$1" "$text" <<'PY'
import re, sys
name, text = sys.argv[1], sys.argv[2]
def ms(v):
    n, unit = float(re.match(r"[\d.]+", v).group()), re.sub(r"[\d.]+", "", v)
    return n * {"us": 0.001, "ms": 1, "s": 1000}[unit]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
p50 = ms(re.search(r"^\s+50%\s+(\S+)", text, re.M).group(1))
p99 = ms(re.search(r"^\s+99%\s+(\S+)", text, re.M).group(1))
errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
if errors:
    sys.exit(f"{name}: {errors.group(1)} failed responses")
print(f"{name} {rps:.0f} {p50:.3f} {p99:.3f}")
PY
}
# ROUNDS rounds, the paths taken in turn within each, so that a slow spell of the machine falls on
# all of them; each path's round with the median requests/s is the one reported.
rounds=${ROUNDS:-3}
all=()
for round in $(seq "$rounds"); do
  echo "round $round/$rounds" >&2
  all+=("$(run direct "$h2ns" "http://$(addr 3):8081/")")
  all+=("$(run haproxy "$h2ns" http://127.0.0.1:9001/)")
  all+=("$(run mesh "$cli_ns" "http://$vip:8080/")")
done
mapfile -t results < <(printf '%s\n' "${all[@]}" | python3 -c '
import sys
rows = [l.split() for l in sys.stdin if l.strip()]
for name in ("direct", "haproxy", "mesh"):
    mine = sorted((r for r in rows if r[0] == name), key=lambda r: float(r[1]))
    print(" ".join(mine[len(mine) // 2]))
print("all " + " ".join(r[0] + ":" + r[1] for r in rows), file=sys.stderr)
')
printf '%-8s %10s %9s %9s\n' path "req/s" "p50 ms" "p99 ms"
for r in "${results[@]}"; do read -r n rps p50 p99 <<<"$r"; printf '%-8s %10s %9s %9s\n' "$n" "$rps" "$p50" "$p99"; done
python3 - "$out" "$secs" "$conns" "${results[@]}" <<'PY'
import json, sys
out, secs, conns, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
data = {"seconds": secs, "connections": conns, "results": {}}
for r in rows:
    n, rps, p50, p99 = r.split()
    data["results"][n] = {"requests_per_second": float(rps), "p50_ms": float(p50), "p99_ms": float(p99)}
data["mesh_vs_haproxy"] = round(data["results"]["mesh"]["requests_per_second"] / data["results"]["haproxy"]["requests_per_second"], 2)
json.dump(data, open(out, "w"), indent=2)
print(f"mesh / haproxy requests/s: {data['mesh_vs_haproxy']}  (JSON: {out})")
PY
