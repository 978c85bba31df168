#!/usr/bin/env bash
# Coverage-guided fuzzing of deltasync-core (cargo-fuzz / libFuzzer).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Builds the fuzz targets in fuzz/, runs every file in
# fuzz/regressions/<target>/ through its target once, then fuzzes each
# target for SECONDS (default 30) on a copy of fuzz/corpus/<target>/, so a
# short run does not grow the committed corpus (FUZZ_GROW_CORPUS=1 fuzzes
# the committed corpus in place). Prints each target's final libFuzzer line
# (executions, cov, ft) and exits non-zero if any target crashed; crashes
# are saved under fuzz/artifacts/<target>/.
#
# Environment: FUZZ_SANITIZER (default none: core forbids unsafe code, so
# panics and overflow checks are the oracle; `address` also works),
# FUZZ_GROW_CORPUS=1, FUZZ_TIMEOUT (seconds one input may take, default 30).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
seconds="${1:-30}"
shift || true
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
    targets=(frame_decoder message_decode server_session receiver)
fi
case "$seconds" in
    '' | *[!0-9]*) echo "usage: $0 [SECONDS] [TARGET...]" >&2; exit 2 ;;
esac
sanitizer="${FUZZ_SANITIZER:-none}"
timeout="${FUZZ_TIMEOUT:-30}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

# libFuzzer's instrumentation needs nightly; stable works with RUSTC_BOOTSTRAP.
if command -v rustup >/dev/null 2>&1 && rustup toolchain list | grep -q '^nightly'; then
    fuzz=(cargo +nightly fuzz)
else
    echo "== no nightly toolchain: using stable with RUSTC_BOOTSTRAP=1"
    export RUSTC_BOOTSTRAP=1
    fuzz=(cargo fuzz)
fi
# Release code with debug assertions and overflow checks.
flags=(-O -a -s "$sanitizer")

# Longest input per target: server scripts carry whole uploads.
max_len() {
    case "$1" in
        server_session) echo 65536 ;;
        frame_decoder) echo 8192 ;;
        *) echo 4096 ;;
    esac
}

cd "$root/fuzz"
echo "== building ${targets[*]}"
for t in "${targets[@]}"; do
    "${fuzz[@]}" build "${flags[@]}" "$t"
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=()
summary=()

for t in "${targets[@]}"; do
    regressions=()
    if [ -d "regressions/$t" ]; then
        while IFS= read -r -d '' f; do
            regressions+=("$f")
        done < <(find "regressions/$t" -type f -print0 | sort -z)
    fi
    if [ "${#regressions[@]}" -gt 0 ]; then
        echo "== $t: ${#regressions[@]} regression input(s)"
        # One run per file: libFuzzer stops at the first input that crashes.
        for f in "${regressions[@]}"; do
            if ! "${fuzz[@]}" run "${flags[@]}" "$t" "$f" -- -timeout="$timeout" >"$work/$t.reg.log" 2>&1; then
                echo "$f:"
                grep -E -A 1 'panicked' "$work/$t.reg.log" | head -n 2 || true
                failed+=("$f")
            fi
        done
    fi

    if [ "$seconds" -eq 0 ]; then
        continue
    fi
    if [ "${FUZZ_GROW_CORPUS:-0}" = 1 ]; then
        corpus="corpus/$t"
        mkdir -p "$corpus"
    else
        corpus="$work/corpus-$t"
        mkdir -p "$corpus"
        if [ -d "corpus/$t" ]; then
            cp -r "corpus/$t/." "$corpus/"
        fi
    fi
    echo "== $t: fuzzing for ${seconds}s"
    status=0
    "${fuzz[@]}" run "${flags[@]}" "$t" "$corpus" -- \
        -max_total_time="$seconds" -max_len="$(max_len "$t")" -timeout="$timeout" \
        -print_final_stats=1 >"$work/$t.log" 2>&1 || status=$?
    last="$(grep -E '^#[0-9]+[[:space:]]+DONE' "$work/$t.log" | tail -n 1 || true)"
    files="$(find "$corpus" -type f | wc -l | tr -d ' ')"
    if [ "$status" -ne 0 ] || [ -z "$last" ]; then
        grep -E -A 4 'panicked|ERROR|Test unit written' "$work/$t.log" | tail -n 30 || true
        failed+=("$t")
        summary+=("$t: CRASHED (exit $status), corpus $files files")
    else
        summary+=("$t: $last, corpus $files files")
    fi
done

echo "== summary"
for s in "${summary[@]}"; do
    echo "$s"
done
if [ "${#failed[@]}" -gt 0 ]; then
    echo "FAILED: ${failed[*]}" >&2
    echo "(crashes found by fuzzing are saved under fuzz/artifacts/<target>/)" >&2
    exit 1
fi
