#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser that meets the network or an operator's file
# (fuzz/fuzz_targets/*.rs), with libFuzzer through libfuzzer-sys.
#
#   scripts/fuzz.sh [SECONDS-PER-TARGET] [TARGET...]     (default: 60 s, every target)
#
# Runs the targets one after another and fails on the first panic (a failed assertion
# included), timeout or out-of-memory; the input that caused it is written to
# fuzz/target/artifacts/TARGET/ (reproduce with `fuzz/target/<triple>/release/TARGET FILE`). Seeds come from fuzz/corpus/TARGET (committed,
# read only here); what the fuzzer learns goes to fuzz/target/corpus/TARGET and is kept between
# runs. Only the stable toolchain is needed: the instrumentation is LLVM's SanitizerCoverage,
# enabled through stable `-C passes`/`-C llvm-args` flags, and libFuzzer itself is built from
# source by libfuzzer-sys (needs a C++ compiler).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds="${1:-60}"
shift || true
all=(reply ehlo dot session config expect postfix_map guest_values)
if [ $# -gt 0 ]; then targets=("$@"); else targets=("${all[@]}"); fi

triple="$(rustc -vV | sed -n 's/^host: //p')"
# --target keeps the flags off build scripts and proc macros (they run in the compiler, where
# the coverage hooks do not exist). `--cfg fuzzing` is what cargo-fuzz sets too.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
# Instrumented artifacts stay in fuzz/target, apart from the main workspace's.
unset CARGO_BUILD_BUILD_DIR CARGO_TARGET_DIR
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
cargo build --locked --release --target "$triple" "${bins[@]}"

for t in "${targets[@]}"; do
    work="target/corpus/$t"
    artifacts="target/artifacts/$t/"
    mkdir -p "$work" "$artifacts" "corpus/$t"
    dict=()
    if [ -f "dict/$t.dict" ]; then dict=(-dict="dict/$t.dict"); fi
    log="target/fuzz-$t.log"
    echo "== fuzz $t: ${seconds}s"
    status=0
    "target/$triple/release/$t" "$work" "corpus/$t" "${dict[@]}" \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=8192 \
        -artifact_prefix="$artifacts" -print_final_stats=1 >"$log" 2>&1 || status=$?
    # The last status line (executions, coverage, corpus) and the final counters.
    grep -E '^#[0-9]+' "$log" | tail -n 1 || true
    grep -E 'stat::number_of_executed_units|stat::peak_rss_mb' "$log" || true
    if [ "$status" -ne 0 ]; then
        tail -n 60 "$log"
        echo "fuzz target $t FAILED (exit $status); input saved under fuzz/$artifacts" >&2
        exit 1
    fi
done
echo "fuzz: ${#targets[@]} passed, 0 failed"
