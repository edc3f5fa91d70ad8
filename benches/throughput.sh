#!/usr/bin/env bash
# Overlay throughput: iperf3 TCP between two workloads on two hosts through meshd (encrypted
# network), beside plain veth, Nebula and boringtun measured in the same run by the peers script.
# Prints a table (Gbit/s, and meshd CPU seconds per gigabit) and writes JSON.
#
#   sudo benches/throughput.sh [seconds] [streams]    (defaults: 10 s, 1 stream)
#
# Needs root. Builds the release binaries; installs iperf3 (apt) if missing. Peers come from
# PEERS (default ../shared/bench/peers.sh); without it only plain veth and the mesh are measured.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}; streams=${2:-1}
[ "$(id -u)" = 0 ] || { echo "throughput.sh: needs root (network namespaces)" >&2; exit 1; }
command -v iperf3 >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iperf3 >/dev/null; }
cargo build --release --locked -q -p control -p meshd
bin=$PWD/target/release
peers=${PEERS:-../shared/bench/peers.sh}

p="tp$$"
# shellcheck source=benches/lab-lib.sh
. "$PWD/benches/lab-lib.sh"

cpu() { # total CPU seconds (user+system) of both meshd
  local t=0
  for i in 2 3; do read -r -a f <"/proc/$(cat "$work/meshd-$i.pid")/stat"; t=$((t + f[13] + f[14])); done
  echo "$t"
}
ip netns exec "$srv_ns" iperf3 -s -1 -p 5201 >/dev/null 2>&1 &
sleep 0.5
c0=$(cpu)
json=$(ip netns exec "$cli_ns" iperf3 -c "$srv_ip" -p 5201 -t "$secs" -P "$streams" -J)
c1=$(cpu)
tick=$(getconf CLK_TCK)
mesh=$(python3 -c "
import json,sys
d=json.loads(sys.argv[1]); bps=d['end']['sum_received']['bits_per_second']; gbit=d['end']['sum_received']['bytes']*8/1e9
cpu=($c1-$c0)/$tick
print(f'{bps/1e9:.2f} {cpu/gbit:.2f}')" "$json")
for i in 2 3; do ip netns exec "$(host "$i")" "$bin/meshd" status --state-dir "$work/h$i" | grep '^packets' | sed "s/^/  h$i /" >&2; done
echo "mesh        $mesh" | awk '{printf "%-10s %6s Gbit/s  %s CPU s per Gbit (both meshd)\n", $1, $2, $3}'
echo "{\"mesh_gbps\": ${mesh% *}, \"mesh_cpu_s_per_gbit\": ${mesh#* }, \"seconds\": $secs, \"streams\": $streams}" >"${OUT:-$work/../mesh-throughput.json}"
if [ -x "$peers" ]; then
  "$peers" "$secs"
else
  echo "(peers script $peers not found: set PEERS=path/to/peers.sh to measure plain veth, Nebula and boringtun)"
fi
