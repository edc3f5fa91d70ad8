#!/usr/bin/env bash
# Builds static binaries of mesh-control, meshd and meshctl for x86_64-unknown-linux-musl, with
# the `dist` profile (release settings), into target/x86_64-unknown-linux-musl/dist/; installs
# the Rust target and musl-tools when missing (as root), then checks that each binary is
# statically linked and runs.
#
#   sudo ./scripts/static.sh
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-musl
profile=${PROFILE:-dist}
rustup target list --installed | grep -qx "$target" || rustup target add "$target"
if ! command -v musl-gcc >/dev/null; then
  [ "$(id -u)" = 0 ] || { echo "static.sh: musl-gcc is missing; run as root to install musl-tools" >&2; exit 1; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq musl-tools >/dev/null
fi
# The C parts (aws-lc) are compiled for musl too.
export CC_x86_64_unknown_linux_musl=musl-gcc
cargo build --locked --target "$target" --profile "$profile" -p control -p meshd -p meshctl --bins
for b in mesh-control meshd meshctl; do
  f="target/$target/$profile/$b"
  kind=$(file -b "$f")
  case "$kind" in
    *"statically linked"* | *"static-pie linked"*) ;;
    *) echo "static.sh: $f is not static: $kind" >&2; exit 1 ;;
  esac
  "$f" --version
done
echo "static.sh: static binaries in target/$target/$profile/"
