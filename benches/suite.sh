#!/usr/bin/env bash
# The benchmark suite in one command: the overlay (TCP 1 and 4 streams, UDP, CPU per gigabit,
# ping) beside the plain underlay, Nebula and boringtun; layer 7 (wrk) through the mesh beside
# direct and HAProxy. Writes target/bench/{overlay,l7,results}.json, results.md (the table) and
# chart.svg.
#
#   sudo benches/suite.sh [seconds]      (default 10 s per measurement)
#
# Needs root; installs what the harnesses use. PEERS as for throughput.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
dir=$PWD/target/bench; mkdir -p "$dir"
echo "==> overlay (benches/throughput.sh $secs)"
OUT=$dir/overlay.json benches/throughput.sh "$secs"
echo "==> layer 7 (benches/l7.sh $secs 32)"
OUT=$dir/l7.json benches/l7.sh "$secs" 32
echo "==> report"
python3 benches/report.py "$dir"
