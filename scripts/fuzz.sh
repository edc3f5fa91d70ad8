#!/usr/bin/env bash
# Builds every fuzz target (cargo-fuzz layout: tun/fuzz, policy/fuzz, meshd/fuzz) with
# libFuzzer's coverage instrumentation on the stable toolchain, and runs each for a bounded time,
# so that none stops compiling or crashing unnoticed.
#
#   ./scripts/fuzz.sh [SECONDS_PER_TARGET]     (default 20)
#
# A crash fails the script; the input that caused it is left under target/fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-20}
[[ "$seconds" =~ ^[0-9]+$ ]] || { echo "fuzz.sh: SECONDS_PER_TARGET must be a number" >&2; exit 2; }

# What cargo-fuzz passes, minus the sanitizer (which needs a nightly compiler): libFuzzer's
# coverage counters, comparison tracing, and `cfg(fuzzing)`.
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
export CARGO_TARGET_DIR=$PWD/target/fuzz
# The workspace's release profile (thin LTO, debug info) is for the binaries users run; a fuzz
# build for a bounded smoke run needs neither, nor full optimisation (opt-level 1 builds much
# faster and still runs the targets at hundreds of thousands of inputs a minute).
export CARGO_PROFILE_RELEASE_LTO=off CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
  CARGO_PROFILE_RELEASE_OPT_LEVEL=1
# RUSTFLAGS then reach only what runs under the fuzzer, not build scripts or proc macros.
triple=$(rustc -vV | sed -n "s/^host: //p")
out=$CARGO_TARGET_DIR/artifacts
mkdir -p "$out"

status=0
for crate in tun/fuzz policy/fuzz meshd/fuzz; do
  echo "fuzz.sh: building $crate" >&2
  cargo build --release --locked --target "$triple" --manifest-path "$crate/Cargo.toml" --bins
  for target in $(sed -n 's/^name = "\(.*\)"$/\1/p' "$crate/Cargo.toml" | tail -n +2); do
    corpus=$CARGO_TARGET_DIR/corpus/$target
    mkdir -p "$corpus"
    echo "fuzz.sh: running $target for ${seconds}s" >&2
    if ! "$CARGO_TARGET_DIR/$triple/release/$target" "$corpus" -max_total_time="$seconds" \
        -artifact_prefix="$out/$target-" -print_final_stats=1 2>"$CARGO_TARGET_DIR/$target.log"; then
      echo "fuzz.sh: $target FAILED; see $CARGO_TARGET_DIR/$target.log and $out/" >&2
      tail -40 "$CARGO_TARGET_DIR/$target.log" >&2
      status=1
    else
      grep -E "^stat::number_of_executed_units|^stat::peak_rss_mb" "$CARGO_TARGET_DIR/$target.log" \
        | sed "s/^/  $target /" >&2
    fi
  done
done
exit $status
