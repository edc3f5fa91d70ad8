# Shared by the benchmark scripts: a two-worker lab in namespaces (control in h1, meshd in h2
# and h3), one encrypted network `bench` with a `client` endpoint on h2 and a `server` endpoint on
# h3 (ports 5201/tcp and 8080/http; SERVER_COMMAND runs in it when set), and a policy letting the
# client open 5201 over the overlay and GET on 8080 through the mesh. Source it after setting `bin`
# (release binaries) and `p` (a unique prefix). Defines
# host/addr/meshctl, cli_ns, srv_ns, srv_ip, and a cleanup trap.
work=$(mktemp -d); br="$p-br"
host() { echo "$p-h$1"; }
addr() { echo "10.98.0.$((10 + $1))"; }
cleanup() {
  for i in 1 2 3; do ip netns pids "$(host "$i")" 2>/dev/null | xargs -r kill 2>/dev/null || true; done
  for _ in $(seq 30); do ls /var/run/netns 2>/dev/null | grep -q "^$p-h[0-9]-" || break; sleep 0.1; done
  for ns in $(ls /var/run/netns 2>/dev/null | grep "^$p-"); do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true; ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT
ip netns add "$br"; ip -n "$br" link add br0 type bridge; ip -n "$br" link set br0 up
for i in 1 2 3; do
  ip netns add "$(host "$i")"
  ip link add eth0 netns "$(host "$i")" type veth peer name "v$i" netns "$br"
  ip -n "$br" link set "v$i" master br0 up
  ip -n "$(host "$i")" addr add "$(addr "$i")/24" dev eth0
  ip -n "$(host "$i")" link set eth0 up; ip -n "$(host "$i")" link set lo up
done
control="$(addr 1):7400"
ip netns exec "$(host 1)" "$bin/mesh-control" init --state-dir "$work/control" --listen "$control" >/dev/null
ip netns exec "$(host 1)" "$bin/mesh-control" run --state-dir "$work/control" 2>"$work/control.log" &
export MESHCTL_ADMIN="$work/control/admin"
meshctl() { ip netns exec "$(host 1)" "$bin/meshctl" "$@"; }
for _ in $(seq 50); do meshctl node ls >/dev/null 2>&1 && break; sleep 0.1; done
token=$(meshctl join-token worker -q)
for i in 2 3; do
  ip netns exec "$(host "$i")" "$bin/meshd" join --control "$control" --token "$token" --state-dir "$work/h$i" --hostname "$(host "$i")" >/dev/null 2>&1
  nsenter --net="/var/run/netns/$(host "$i")" "$bin/meshd" run --state-dir "$work/h$i" --underlay "$(addr "$i")" \
    --netns-prefix "$(host "$i")" 2>"$work/meshd-$i.log" &
  echo $! >"$work/meshd-$i.pid"
done
for _ in $(seq 100); do [ "$(meshctl node ls --format json | grep -c '"connected": true')" = 2 ] && break; sleep 0.1; done
h2=$(meshctl node ls --format json | python3 -c "import json,sys; print([n['id'] for n in json.load(sys.stdin) if n['hostname']=='$(host 2)'][0])")
h3=$(meshctl node ls --format json | python3 -c "import json,sys; print([n['id'] for n in json.load(sys.stdin) if n['hostname']=='$(host 3)'][0])")
meshctl network create bench --subnet 10.97.0.0/24 >/dev/null
meshctl service create client --network bench --constraint "node.id==$h2" >/dev/null
meshctl service create server --network bench --port 5201 --port 8080/http --constraint "node.id==$h3" \
  ${SERVER_COMMAND:+--command "$SERVER_COMMAND"} >/dev/null
# The policy: iperf3 straight over the overlay (an L4 rule), HTTP GETs through the mesh.
cat >"$work/policy.toml" <<'POLICY'
[[rule]]
name = "bench-overlay"
action = "allow"
from = ["client"]
to = ["server"]
ports = [5201]
protocol = "tcp"

[[rule]]
name = "bench-mesh"
action = "allow"
from = ["client"]
to = ["server"]
ports = [8080]
methods = ["GET"]
POLICY
meshctl policy apply "$work/policy.toml" >/dev/null
srv_ns="$(host 3)-server-1"; cli_ns="$(host 2)-client-1"
for _ in $(seq 100); do ip -n "$srv_ns" -4 -br addr 2>/dev/null | grep -q 10.97 && ip -n "$cli_ns" -4 -br addr 2>/dev/null | grep -q 10.97 && break; sleep 0.1; done
srv_ip=$(ip -n "$srv_ns" -4 -br addr show mesh0 | awk '{print $3}' | cut -d/ -f1)
for _ in $(seq 50); do ip netns exec "$cli_ns" ping -c1 -W1 "$srv_ip" >/dev/null 2>&1 && break; done

