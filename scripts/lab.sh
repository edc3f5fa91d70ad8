#!/usr/bin/env bash
# The main job: a local cluster in network namespaces. Hosts are namespaces joined by veth pairs
# to a bridge that lives in a namespace of its own; mesh-control runs in the first host, meshd in
# every other, joined: built by the lab library, as the tests and benchmarks build theirs
# (`meshctl lab up --bare`). The script then exercises the cluster the way an operator and an
# attacker would (identity, networks and services, the encrypted overlay, DNS, policy, the mTLS
# mesh enforcing it per request, node removal) and prints a summary. That tour's namespaces are
# removed on exit (unless --keep). Then it brings up the lab that stays: `meshctl lab up` with the
# example spec (examples/lab.toml), checked, left running for `meshctl lab exec|status|down`
# (unless --no-lab).
#
#   sudo ./scripts/lab.sh [--hosts N] [--keep] [--no-lab]
#
# Needs root. Installs what it uses (iproute2, iputils, util-linux, python3, dig, curl, nftables:
# apt) if missing and builds the binaries (cargo, release).
set -euo pipefail
cd "$(dirname "$0")/.."

hosts=4; keep=0; stay=1
while [ $# -gt 0 ]; do
  case "$1" in
    --hosts) hosts=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --no-lab) stay=0; shift ;;
    -h|--help) awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; exit 0 ;;
    *) echo "lab.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "lab.sh: needs root (network namespaces); run it with sudo" >&2; exit 1; }
[[ "$hosts" =~ ^[0-9]+$ ]] && [ "$hosts" -ge 3 ] && [ "$hosts" -le 50 ] \
  || { echo "lab.sh: --hosts must be between 3 and 50" >&2; exit 2; }
need_apt=()
for pair in ip:iproute2 ping:iputils-ping nsenter:util-linux python3:python3 dig:bind9-dnsutils curl:curl nft:nftables; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need_apt+=("${pair#*:}")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "lab.sh: installing ${need_apt[*]}" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
pass=0; fail=0
check() { # description, then a command that must succeed
  local what=$1; shift
  if "$@" >/dev/null 2>&1; then echo "  ok    $what"; pass=$((pass+1)); else echo "  FAIL  $what"; fail=$((fail+1)); fi
}
refused() { ! "$@"; }

step "Building mesh-control, meshctl and meshd (release)"
cargo build --release --locked -q -p control -p meshctl -p meshd
# shellcheck disable=SC2317
lab_up() {
  step "The lab that stays: meshctl lab up (examples/lab.toml)"
  if [ -f /var/lib/mesh-lab/lab.json ]; then
    echo "  an earlier lab is up: taking it down first"; "$bin/meshctl" lab down | sed 's/^/  /'
  fi
  "$bin/meshctl" lab up --hosts "$hosts" --spec examples/lab.toml | sed 's/^/  /'
  echo "  (run meshctl as $bin/meshctl)"
}
# Where cargo put the binaries (CARGO_TARGET_DIR when set).
bin=$(realpath -m "${CARGO_TARGET_DIR:-target}")/release

# The tour's own files in $work; the lab's (state directories, logs, lab.json, lab.env) in $lab.
p="mlab$$"; work=$(mktemp -d /tmp/mesh-lab.XXXXXX); lab="$work/lab"
cleanup() {
  "$bin/meshctl" lab down --dir "$lab" >/dev/null 2>&1 || true
  rm -rf "$work"
}
if [ "$keep" = 0 ]; then trap cleanup EXIT; fi

# The hosts, mesh-control on the first, meshd joined on the others; its steps shown as the tour's.
"$bin/meshctl" lab up --bare --hosts "$hosts" --managers 1 --meshd workers --prefix "$p" \
  --subnet 10.76.0.0/24 --dir "$lab" | sed -e 's/^==> \(.*\)/\x1b[1m==> \1\x1b[0m/'
# shellcheck source=/dev/null
. "$lab/lab.env"   # LAB_HOST, LAB_ADDR, LAB_NODE_DIR, LAB_NODE_ID (by host number), MESHCTL_ADMIN, ...
host() { echo "${LAB_HOST[$1]}"; }
node_dir() { echo "${LAB_NODE_DIR[$1]}"; }
node_id() { echo "${LAB_NODE_ID[$1]}"; }
in_host() { local i=$1; shift; ip netns exec "$(host "$i")" "$@"; }
control=$LAB_CONTROL
meshctl() { in_host 1 "$bin/meshctl" "$@"; }
token=$(meshctl join-token worker -q)
meshctl node ls | sed 's/^/  /'

step "Checks"
last=$hosts
check "every host is listed" test "$(meshctl node ls --format json | grep -c '"id"')" -eq "$hosts"
check "node keys are private (0600)" test "$(stat -c %a "$(node_dir 2)/node.key")" = 600
check "a node renews its certificate (same ID, new key)" in_host 2 "$bin/meshd" renew --state-dir "$(node_dir 2)"
bad="${token%?}$( [ "${token: -1}" = 0 ] && echo 1 || echo 0 )"
check "a wrong token is refused" refused in_host "$last" "$bin/meshd" join --control "$control" --token "$bad" --state-dir "$work/bad1"
check "a node joined with the worker token is a worker" \
  sh -c "ip netns exec $(host 1) $bin/meshctl node inspect $(node_id 2) | grep -q '\"role\": \"worker\"'"
meshctl join-token worker --rotate -q >"$work/new-token"
check "a rotated token is refused at once" refused in_host "$last" "$bin/meshd" join --control "$control" --token "$token" --state-dir "$work/bad2"
check "the new token works" in_host "$last" "$bin/meshd" join --control "$control" --token "$(cat "$work/new-token")" --state-dir "$work/extra"
check "joined nodes are unaffected by the rotation" in_host 3 "$bin/meshd" renew --state-dir "$(node_dir 3)"
check "a node certificate cannot call the admin API" refused env MESHCTL_ADMIN="$work/fake-admin" sh -c "
  mkdir -p $work/fake-admin && cp $(node_dir 3)/ca.crt $work/fake-admin/ca.crt &&
  cp $(node_dir 3)/node.crt $work/fake-admin/admin.crt && cp $(node_dir 3)/node.key $work/fake-admin/admin.key &&
  echo $control > $work/fake-admin/control && ip netns exec $(host 1) $bin/meshctl node ls"

step "Networks and services"
for _ in $(seq 100); do
  [ "$(meshctl node ls --format json | grep -c '"connected": true')" -ge $((hosts - 1)) ] && break; sleep 0.1
done
zone_node=$(node_id 2)
meshctl node update "$zone_node" --label-add zone=secure | sed 's/^/  /'
meshctl network create front --subnet 10.10.0.0/24 | sed 's/^/  /'
meshctl network create back --subnet 10.20.0.0/24 | sed 's/^/  /'
meshctl service create web --network front --port 80 --replicas 2 | sed 's/^/  /'
meshctl service create db --network back --port 5432 --constraint node.labels.zone==secure | sed 's/^/  /'
meshctl service ls | sed 's/^/  /'
meshctl network ls | sed 's/^/  /'
status() { in_host "$1" "$bin/meshd" status --state-dir "$(node_dir "$1")" --json; }
sleep 0.5
for i in $(seq 2 "$hosts"); do echo "  --- $(host "$i")"; in_host "$i" "$bin/meshd" status --state-dir "$(node_dir "$i")" | sed 's/^/  /'; done
# grep reads it all: `grep -q` could close the pipe early, and pipefail would count the SIGPIPE.
holds() { status "$1" | grep "\"name\": \"$2\"" >/dev/null; }
only_h2_holds_back() { holds 2 back && for i in $(seq 3 "$hosts"); do ! holds "$i" back || return 1; done; }
check "only the labelled host holds network back" only_h2_holds_back
check "a constraint that no node meets is refused" refused meshctl service create x --network back --constraint node.labels.zone==nowhere
check "an overlapping subnet is refused" refused meshctl network create overlap --subnet 10.10.0.0/16

step "Traffic over the overlay"
svc_addr() { meshctl service inspect "$1" | python3 -c "import json,sys; e=json.load(sys.stdin)['endpoints']; print(e[$2]['addresses']['$3'], e[$2]['node'])"; }
read -r web1_addr web1_node <<<"$(svc_addr web 0 front)"; read -r web2_addr web2_node <<<"$(svc_addr web 1 front)"
read -r db_addr db_node <<<"$(svc_addr db 0 back)"
host_of() { for i in $(seq 2 "$hosts"); do [ "$(node_id "$i")" = "$1" ] && echo "$i"; done; }
web1_ns="$(host "$(host_of "$web1_node")")-web-1"; web2_ns="$(host "$(host_of "$web2_node")")-web-2"
for _ in $(seq 50); do ip netns exec "$web1_ns" ping -c1 -W1 "$web2_addr" >/dev/null 2>&1 && break; sleep 0.1; done
ip netns exec "$web1_ns" ping -c 3 -i 0.2 "$web2_addr" | sed 's/^/  /' | tail -2
check "web.1 reaches web.2 on another host through the encrypted overlay" ip netns exec "$web1_ns" ping -c1 -W1 "$web2_addr"
ip netns exec "$web1_ns" ip route add 10.20.0.0/24 dev mesh0 2>/dev/null || true
check "web (network front) cannot reach db (network back), even with a route" refused ip netns exec "$web1_ns" ping -c1 -W1 "$db_addr"
if command -v dig >/dev/null; then
  echo "  dig web (from web.1): $(ip netns exec "$web1_ns" dig +short +time=2 +tries=1 @127.0.0.11 web | tr '\n' ' ')"
  check "DNS in a workload resolves its network's services" sh -c "ip netns exec $web1_ns dig +short +time=2 +tries=1 @127.0.0.11 tasks.web | grep -q '$web2_addr'"
  check "DNS in a workload does not resolve another network's services" sh -c "ip netns exec $web1_ns dig +time=2 +tries=1 @127.0.0.11 db | grep -q NXDOMAIN"
fi
in_host "$(host_of "$web1_node")" "$bin/meshd" status --state-dir "$(node_dir "$(host_of "$web1_node")")" | grep '^packets' | sed 's/^/  /'

epoch() { meshctl network inspect front | grep -o '"key_epoch": [0-9]*' | grep -o '[0-9]*$'; }
before=$(epoch); meshctl network rotate-key front | sed 's/^/  /'
check "a key rotation advances the epoch" test "$(epoch)" -gt "$before"

step "Policy"
meshctl service create api --network front --port 80/http --command "exec python3 $PWD/examples/http-echo.py 80 api" --readable "$PWD/examples" | sed 's/^/  /'
check "the example policy's own tests pass locally" meshctl policy test "$PWD/examples/policy.toml"
meshctl policy apply "$PWD/examples/policy.toml" | sed 's/^/  /'
sed 's/methods = \["GET", "HEAD"\]/methods = ["HEAD"]/' examples/policy.toml >"$work/broken-policy.toml"
check "a policy whose tests fail is refused" refused meshctl policy apply "$work/broken-policy.toml"
check "and the previous one stays in force" sh -c "ip netns exec $(host 1) env MESHCTL_ADMIN=$MESHCTL_ADMIN $bin/meshctl policy history | grep -c '^[0-9]' | grep -qx 1"
meshctl policy explain --from web --to api --port 80 GET /v1/items/7 | sed 's/^/  /'
meshctl policy explain --from web --to api --port 80 DELETE /v1/items/7 | sed 's/^/  /'
api_host=$(meshctl service inspect api | grep -o '"node": "[a-z0-9]*"' | head -1 | grep -o '[a-z0-9]\{25\}')
for i in $(seq 2 "$hosts"); do [ "$(node_id "$i")" = "$api_host" ] && api_i=$i; done
sleep 0.5
in_host "$api_i" "$bin/meshd" status --state-dir "$(node_dir "$api_i")" | grep '^policy' | sed 's/^/  api host: /'
check "the api host holds the api rules" sh -c "ip netns exec $(host "$api_i") $bin/meshd status --state-dir $(node_dir "$api_i") | grep -q web-reads-items"
for i in $(seq 2 "$hosts"); do
  if [ "$i" != "$api_i" ]; then
    check "$(host "$i") (no api endpoint) holds no api rule" sh -c "! ip netns exec $(host "$i") $bin/meshd status --state-dir $(node_dir "$i") | grep -q web-reads-items"
  fi
done

step "The mTLS mesh: web calls api through both meshd; the policy decides each request"
# From web.1's namespace: `curl -w` prints the status after the body.
call() { ip netns exec "$web1_ns" curl -sS -m 3 -w ' %{http_code}' "$@" 2>&1 | tr '\n' ' '; }
answers() { local want=$1; shift; call "$@" | grep -q "$want"; }
for _ in $(seq 50); do answers ' 200$' http://api/v1/items/7 && break; sleep 0.2; done
echo "  GET http://api/v1/items/7 -> $(call http://api/v1/items/7)"
check "an allowed request reaches api on its host, by name" answers 'api GET /v1/items/7 .*200$' http://api/v1/items/7
echo "  DELETE /v1/items/7 -> $(call -X DELETE http://api/v1/items/7)"
check "a request no rule allows gets 403 from the default" answers 'deny by default' -X DELETE http://api/v1/items/7
check "an admin may delete an item (header rule)" answers 'api DELETE /v1/items/7 .*200$' -X DELETE -H 'x-role: admin' http://api/v1/items/7
check "deleting everything is denied by its rule, even for an admin" \
  answers 'deny by rule .nobody-deletes-everything.' -X DELETE -H 'x-role: admin' http://api/v1/items/all
read -r api_addr _ <<<"$(svc_addr api 0 front)"
check "going around the mesh (straight to api's address) is dropped" refused call --connect-timeout 1 "http://$api_addr/v1/items/7"
metrics=$(ip netns exec "$(host "$api_i")" curl -sS -m 3 http://127.0.0.1:9480/metrics || true)
echo "$metrics" | grep '^mesh_verdicts_total' | sed 's/^/  /'
counted() { echo "$metrics" | grep -q 'rule="nobody-deletes-everything"'; }
check "the api host counts verdicts by rule (Prometheus)" counted

web_host=$(meshctl service inspect web | grep -o '"node": "[a-z0-9]*"' | head -1 | grep -o '[a-z0-9]\{25\}')

step "Removing a node"
meshctl node rm "$web_host" | sed 's/^/  /'
for i in $(seq 2 "$hosts"); do [ "$(node_id "$i")" = "$web_host" ] && victim_host=$i; done
# Keys are per pair of nodes: the removed node's pair keys leave every other node's slice, so
# no rekey is needed; api's host forgets it within a few seconds.
api_holds_victim() { in_host "$api_i" "$bin/meshd" status --json --state-dir "$(node_dir "$api_i")" | grep -q "$web_host"; }
forgotten() { for _ in $(seq 100); do api_holds_victim || return 0; sleep 0.1; done; return 1; }
check "api's host drops the removed node (peer and pair keys) from front" forgotten
check "its endpoint moved to another node" sh -c "! ip netns exec $(host 1) env MESHCTL_ADMIN=$MESHCTL_ADMIN $bin/meshctl service inspect web | grep -q $web_host"
check "the removed node is refused on renewal" refused in_host "$victim_host" "$bin/meshd" renew --state-dir "$(node_dir "$victim_host")"
meshctl node ls | sed 's/^/  /'

step "Summary"
echo "  hosts: $hosts (control on $(host 1), meshd on the rest)"
echo "  checks: $pass passed, $fail failed"
if [ "$keep" = 1 ]; then
  echo "  the lab is still running; state in $lab (namespaces $p-*)"
  echo "  try: MESHCTL_ADMIN=$MESHCTL_ADMIN ip netns exec $(host 1) $bin/meshctl node ls"
  echo "  take it down: $bin/meshctl lab down --dir $lab; rm -rf $work"
fi
[ "$fail" = 0 ] || exit 1
if [ "$stay" = 1 ]; then lab_up; fi
