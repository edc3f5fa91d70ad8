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
cargo build --release --locked -q -p control -p meshd
bin=$PWD/target/release
p="dn$$"
# shellcheck source=benches/lab-lib.sh
. "$PWD/benches/lab-lib.sh"
queries="$work/queries"
printf 'server A\nserver.bench A\ntasks.server A\nclient A\nserver SRV\n' >"$queries"
ip netns exec "$cli_ns" dnsperf -s 127.0.0.11 -d "$queries" -l "$secs" -c "$clients" -Q 1000000 2>&1 \
  | grep -E "Queries sent|Queries completed|Queries lost|Queries per second|Average Latency|Latency StdDev|RCODE"
