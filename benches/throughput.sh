#!/usr/bin/env bash
# The overlay, measured: iperf3 between two workloads on two hosts through meshd (an AES-GCM
# network) — TCP with 1 and 4 streams, UDP unbounded and at fixed offered rates (UDP_RATES, in
# Gbit/s; default 0.25 0.5 1 2) — and the same TCP over a WireGuard network ("mesh wireguard"),
# with meshd's CPU seconds per gigabit, and ping
# latency; beside the plain underlay between the same hosts, and Nebula and boringtun measured in
# the same run by the peers script. Prints a table and writes JSON (OUT, default
# target/bench-overlay.json).
#
#   sudo benches/throughput.sh [seconds]    (default 10 s per measurement)
#
# Needs root. Builds the release binaries (NO_BUILD=1: measures those already in
# target/release, e.g. to compare two builds back to back); installs iperf3 (apt) if missing.
# Peers come from PEERS (default ../shared/bench/peers.sh); without it they are left out.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
[ "$(id -u)" = 0 ] || { echo "throughput.sh: needs root (network namespaces)" >&2; exit 1; }
command -v iperf3 >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iperf3 >/dev/null; }
[ -n "${NO_BUILD:-}" ] || cargo build --release --locked -q -p control -p meshctl -p meshd
bin=$(realpath -m "${CARGO_TARGET_DIR:-target}")/release  # where cargo put them
peers=${PEERS:-../shared/bench/peers.sh}
out=${OUT:-$PWD/target/bench-overlay.json}

p="tp$$"
# shellcheck source=benches/lab-lib.sh
. "$PWD/benches/lab-lib.sh"

cpu() { # total CPU seconds (user+system) of both meshd
  local t=0
  for i in 2 3; do read -r -a f <"/proc/$(meshd_pid "$i")/stat"; t=$((t + f[13] + f[14])); done
  echo "$t"
}
tick=$(getconf CLK_TCK)
iperf() { # name, client namespace, server namespace, server address, iperf3 client args... -> JSON line
  local name=$1 cns=$2 sns=$3 to=$4; shift 4
  ip netns exec "$sns" iperf3 -s -1 -p 5201 >/dev/null 2>&1 &
  local server=$!
  sleep 0.5
  local c0 c1 json
  c0=$(cpu)
  json=$(ip netns exec "$cns" iperf3 -c "$to" -p 5201 -t "$secs" -J "$@")
  c1=$(cpu)
  wait "$server" || true
  python3 - "$name" "$json" "$(( c1 - c0 ))" "$tick" <<'PY'
import json, sys
name, d, ticks, tick = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
end = d["end"]
s = end.get("sum_received") or end["sum"]
gbit = s["bytes"] * 8 / 1e9
row = {"name": name, "gbps": round(s["bits_per_second"] / 1e9, 3)}
if name.startswith("mesh"):
    row["meshd_cpu_s_per_gbit"] = round(ticks / tick / gbit, 2) if gbit else None
if "lost_percent" in s:
    row["lost_percent"] = round(s["lost_percent"], 2)
print(json.dumps(row))
PY
}
ping_ms() { # namespace, address -> average round trip in ms over 200 pings
  ip netns exec "$1" ping -q -c 200 -i 0.005 "$2" | awk -F/ '/^rtt/ { print $5 }'
}
rows=()
rows+=("$(iperf "mesh TCP, 1 stream" "$cli_ns" "$srv_ns" "$srv_ip")")
rows+=("$(iperf "mesh TCP, 4 streams" "$cli_ns" "$srv_ns" "$srv_ip" -P 4)")
rows+=("$(iperf "mesh UDP" "$cli_ns" "$srv_ns" "$srv_ip" -u -b 0 -l 1300)")
# Inner UDP at fixed offered rates (UDP_RATES, Gbit/s): throughput and loss at each.
for rate in ${UDP_RATES:-0.25 0.5 1 2}; do
  rows+=("$(iperf "mesh UDP at $rate Gbit/s" "$cli_ns" "$srv_ns" "$srv_ip" -u -b "${rate}G" -l 1300)")
done
rows+=("$(iperf "mesh wireguard TCP, 1 stream" "$cli_ns" "$srv_ns" "$srv_wg_ip")")
rows+=("$(iperf "mesh wireguard TCP, 4 streams" "$cli_ns" "$srv_ns" "$srv_wg_ip" -P 4)")
rows+=("$(iperf "underlay TCP, 1 stream" "$(host 2)" "$(host 3)" "$(addr 3)")")
mesh_ping=$(ping_ms "$cli_ns" "$srv_ip"); wg_ping=$(ping_ms "$cli_ns" "$srv_wg_ip"); plain_ping=$(ping_ms "$(host 2)" "$(addr 3)")
for i in 2 3; do ip netns exec "$(host "$i")" "$bin/meshd" status --state-dir "$(node_dir "$i")" | grep '^packets' | sed "s/^/  h$i /" >&2; done
peer_lines=""
if [ -x "$peers" ]; then
  peer_lines=$("$peers" "$secs" || true)
else
  echo "(peers script $peers not found: set PEERS=path/to/peers.sh to measure plain veth, Nebula and boringtun)" >&2
fi
python3 - "$out" "$secs" "$mesh_ping" "$plain_ping" "$peer_lines" "$wg_ping" "${rows[@]}" <<'PY'
import json, sys
out, secs, mesh_ping, plain_ping, peer_lines, wg_ping, rows = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7:]
rows = [json.loads(r) for r in rows]
for line in peer_lines.splitlines():
    parts = line.split()
    if len(parts) >= 2:
        rows.append({"name": f"peer {parts[0]} TCP, 1 stream", "gbps": float(parts[1])})
underlay = next((r["gbps"] for r in rows if r["name"] == "underlay TCP, 1 stream"), None)
for r in rows:
    if underlay and not r["name"].startswith("underlay"):
        r["ratio_to_underlay"] = round(r["gbps"] / underlay, 3)
data = {"seconds": secs, "throughput": rows,
        "ping_ms": {"mesh": float(mesh_ping), "mesh wireguard": float(wg_ping), "underlay": float(plain_ping)}}
boringtun = next((r["gbps"] for r in rows if r["name"] == "peer boringtun TCP, 1 stream"), None)
wireguard = next((r["gbps"] for r in rows if r["name"] == "mesh wireguard TCP, 1 stream"), None)
if boringtun and wireguard:
    data["wireguard_vs_boringtun"] = round(wireguard / boringtun, 2)
json.dump(data, open(out, "w"), indent=2)
print(f"{'path':<28} {'Gbit/s':>7} {'x underlay':>10} {'meshd CPU s/Gbit':>17} {'UDP loss':>9}")
for r in rows:
    cpu = r.get("meshd_cpu_s_per_gbit")
    loss = r.get("lost_percent")
    ratio = r.get("ratio_to_underlay")
    print(f"{r['name']:<28} {r['gbps']:>7.2f} {'' if ratio is None else f'{ratio:.3f}':>10} {'' if cpu is None else cpu:>17} {'' if loss is None else str(loss) + ' %':>9}")
print(f"ping (avg of 200): mesh {data['ping_ms']['mesh']:.3f} ms, mesh wireguard {data['ping_ms']['mesh wireguard']:.3f} ms, underlay {data['ping_ms']['underlay']:.3f} ms")
if "wireguard_vs_boringtun" in data:
    print(f"mesh wireguard / boringtun-cli, TCP 1 stream: {data['wireguard_vs_boringtun']}x")
print(f"JSON: {out}")
PY
