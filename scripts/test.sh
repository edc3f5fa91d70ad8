#!/usr/bin/env bash
# Runs the project's tests. On a fresh Debian machine, as root, it first installs what they need:
# system packages through apt, Rust components through rustup.
#
#   sudo ./scripts/test.sh [extra cargo test arguments]
#
# Tests that build network namespaces need root; run without it they fail saying so.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for pair in ip:iproute2 ping:iputils-ping nsenter:util-linux python3:python3 dig:bind9-dnsutils curl:curl nft:nftables systemd-analyze:systemd cfssl:golang-cfssl; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need_apt+=("${pair#*:}")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "test.sh: missing ${need_apt[*]}; run as root to install them" >&2
    exit 1
  fi
  echo "test.sh: installing ${need_apt[*]}" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "test.sh: cargo not found; install Rust (rustup.rs) first" >&2; exit 1; }

# The end-to-end tests run the real binaries. `cargo test` builds them (every package with
# binaries has integration tests) with the same features as the tests, so nothing is built twice.
cargo test --workspace --locked --no-run
cargo test --workspace --locked "$@"
