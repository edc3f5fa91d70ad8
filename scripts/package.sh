#!/usr/bin/env bash
# Builds the Debian packages of mesh-control, meshd and meshctl with cargo-deb (installed if
# missing) into target/debian/:
#
#   ./scripts/package.sh           build with the `dist` profile (release settings), package
#   sudo ./scripts/package.sh --check
#                                  package the binaries the tests built (target/debug) instead of
#                                  building again, install the packages (dpkg -i), check what
#                                  they installed and that each binary runs, then remove them
set -euo pipefail
cd "$(dirname "$0")/.."
check=false
[ "${1:-}" = --check ] && check=true

command -v cargo-deb >/dev/null || cargo install cargo-deb --locked --version 3.8.0
bins=(mesh-control meshd meshctl)
out=target/dist
mkdir -p "$out"
if $check; then
  for b in "${bins[@]}"; do
    [ -x "target/debug/$b" ] || { echo "package.sh: target/debug/$b is missing: run cargo build first" >&2; exit 1; }
    cp "target/debug/$b" "$out/$b"
  done
else
  cargo build --locked --profile dist -p control -p meshd -p meshctl --bins
fi

# meshctl's completions and man pages, written by meshctl itself.
docs=packaging/generated
rm -rf "$docs" && mkdir -p "$docs/man"
"$out/meshctl" completion bash > "$docs/meshctl.bash"
"$out/meshctl" completion zsh > "$docs/_meshctl"
"$out/meshctl" completion fish > "$docs/meshctl.fish"
"$out/meshctl" man --dir "$docs/man" >/dev/null

rm -f target/debian/*.deb
for p in control meshd meshctl; do
  cargo deb --locked --no-build --profile dist -p "$p" --output target/debian/ >/dev/null
done
ls -1 target/debian/*.deb
$check || exit 0

# Installed as a user would, then checked: binaries, units, configuration files, docs.
[ "$(id -u)" = 0 ] || { echo "package.sh --check installs the packages: run it as root" >&2; exit 1; }
DEBIAN_FRONTEND=noninteractive dpkg -i target/debian/*.deb >/dev/null
trap 'dpkg --purge meshctl meshd mesh-control >/dev/null' EXIT
version=$(cargo metadata --no-deps --format-version 1 --locked | python3 -c 'import json,sys; print(json.load(sys.stdin)["packages"][0]["version"])')
for b in "${bins[@]}"; do
  [ "$(command -v "$b")" = "/usr/bin/$b" ] || { echo "package.sh: $b is not installed in /usr/bin" >&2; exit 1; }
  "/usr/bin/$b" --version | grep -q "$version" || { echo "package.sh: $b --version does not say $version" >&2; exit 1; }
  "/usr/bin/$b" --help >/dev/null
done
for unit in mesh-control meshd; do
  file=""
  for dir in /lib/systemd/system /usr/lib/systemd/system; do
    [ -f "$dir/$unit.service" ] && file="$dir/$unit.service"
  done
  [ -n "$file" ] || { echo "package.sh: the $unit unit is not installed" >&2; exit 1; }
  warnings=$(systemd-analyze verify --man=no "$file" 2>&1 || true)
  [ -z "$warnings" ] || { echo "package.sh: $file: $warnings" >&2; exit 1; }
  [ -f "/etc/mesh/$unit.toml" ] || { echo "package.sh: /etc/mesh/$unit.toml is not installed" >&2; exit 1; }
done
# The installed configuration is the one read by default.
/usr/bin/meshd run --print-config | grep -q '^# configuration file: /etc/mesh/meshd.toml' \
  || { echo "package.sh: meshd does not read /etc/mesh/meshd.toml" >&2; exit 1; }
/usr/bin/mesh-control run --print-config | grep -q '^state-dir = "/var/lib/mesh-control" .*/etc/mesh/mesh-control.toml:' \
  || { echo "package.sh: mesh-control does not read /etc/mesh/mesh-control.toml" >&2; exit 1; }
for f in /usr/share/bash-completion/completions/meshctl /usr/share/man/man1/meshctl-service-update.1; do
  [ -f "$f" ] || [ -f "$f.gz" ] || { echo "package.sh: $f is not installed" >&2; exit 1; }
done
dpkg-deb -f target/debian/meshd_*.deb Depends | grep -q nftables || { echo "package.sh: meshd does not depend on nftables" >&2; exit 1; }
echo "package.sh: the packages install, and every binary runs"
