# Shared by the benchmark scripts: a two-worker lab in namespaces, built by the lab library
# (`meshctl lab up --bare`: control in h1, meshd in h2 and h3, underlay 10.98.0.0/24), two
# encrypted networks, `bench` (AES-GCM, the default transport) and `benchwg` (WireGuard), with a
# `client` endpoint on h2 and a `server` endpoint on h3 on both (ports
# 5201/tcp and 8080/http; SERVER_COMMAND runs in it when set), and a policy letting the client open
# 5201 over the overlay and GET on 8080 through the mesh. Source it after setting `bin` (release
# binaries) and `p` (a unique prefix: a lowercase letter, then letters and digits). Defines `work`
# (a scratch directory), host/addr/node_dir/meshd_pid/meshctl, cli_ns, srv_ns, srv_ip (on
# `bench`), srv_wg_ip (on `benchwg`), and a cleanup trap (`meshctl lab down`).
work=$(mktemp -d); lab="$work/lab"
cleanup() {
  "$bin/meshctl" lab down --dir "$lab" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
"$bin/meshctl" lab up --bare --hosts 3 --managers 1 --meshd workers --prefix "$p" --subnet 10.98.0.0/24 \
  --dir "$lab" >"$work/lab-up.out" 2>&1 || { cat "$work/lab-up.out" >&2; exit 1; }
# shellcheck source=/dev/null
. "$lab/lab.env"
host() { echo "${LAB_HOST[$1]}"; }
addr() { echo "${LAB_ADDR[$1]}"; }
node_dir() { echo "${LAB_NODE_DIR[$1]}"; }
meshd_pid() { echo "${LAB_MESHD_PID[$1]}"; }
meshctl() { ip netns exec "$(host 1)" "$bin/meshctl" "$@"; }
h2=${LAB_NODE_ID[2]}; h3=${LAB_NODE_ID[3]}
meshctl network create bench --subnet 10.97.0.0/24 >/dev/null
meshctl network create benchwg --subnet 10.96.0.0/24 --transport wireguard >/dev/null
meshctl service create client --network bench --network benchwg --constraint "node.id==$h2" >/dev/null
meshctl service create server --network bench --network benchwg --port 5201 --port 8080/http \
  --constraint "node.id==$h3" \
  ${SERVER_COMMAND:+--command "$SERVER_COMMAND" --readable "$bin"} >/dev/null
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
for _ in $(seq 100); do
  for net in 10.97 10.96; do ip -n "$srv_ns" -4 -br addr 2>/dev/null | grep -q "$net" && ip -n "$cli_ns" -4 -br addr 2>/dev/null | grep -q "$net" || continue 2; done
  break
done
on_subnet() { ip -n "$1" -4 -br addr | awk '{print $3}' | cut -d/ -f1 | grep "^$2\." ; }
srv_ip=$(on_subnet "$srv_ns" 10.97); srv_wg_ip=$(on_subnet "$srv_ns" 10.96)
for ip in "$srv_ip" "$srv_wg_ip"; do
  for _ in $(seq 50); do ip netns exec "$cli_ns" ping -c1 -W1 "$ip" >/dev/null 2>&1 && break; done
done

