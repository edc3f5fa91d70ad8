#!/usr/bin/env bash
# DNS: dnsperf against one workload's server (127.0.0.11 inside its namespace), asking the mesh's
# own names (service, service.network, tasks.service). Prints queries/s and latency.
#
#   sudo benches/dns.sh [seconds] [clients]     (defaults: 10 s, 4 clients)
#
# Needs root. Builds the release binaries; installs dnsperf (apt) if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}; clients=${2:-4}
[ "$(id -u)" = 0 ] || { echo "dns.sh: needs root (network namespaces)" >&2; exit 1; }
command -v dnsperf >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dnsperf >/dev/null; }
cargo build --release --locked -q -p control -p meshctl -p meshd
bin=$(realpath -m "${CARGO_TARGET_DIR:-target}")/release  # where cargo put them
p="dn$$"
# shellcheck source=benches/lab-lib.sh
. "$PWD/benches/lab-lib.sh"
queries="$work/queries"
printf 'server A\nserver.bench A\ntasks.server A\nclient A\nserver SRV\n' >"$queries"
# -v prints every answer with its latency (last field, seconds): the percentiles come from those.
ip netns exec "$cli_ns" dnsperf -v -s 127.0.0.11 -d "$queries" -l "$secs" -c "$clients" -Q 1000000 >"$work/dnsperf.out" 2>&1 || true
grep -E "Queries sent|Queries completed|Queries lost|Queries per second|Average Latency|Response codes" "$work/dnsperf.out"
python3 - "$work/dnsperf.out" <<'PY'
import sys
lat = []
for line in open(sys.argv[1]):
    parts = line.split()
    if line.startswith(">") and len(parts) >= 2:
        try:
            lat.append(float(parts[-1]))
        except ValueError:
            pass
lat.sort()
if lat:
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e6
    print(f"  latency p50 {p(0.50):.0f} us, p99 {p(0.99):.0f} us, max {lat[-1]*1e6:.0f} us over {len(lat)} answers")
PY
