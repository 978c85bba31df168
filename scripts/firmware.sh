#!/usr/bin/env bash
# Builds the QEMU mps2-an386 firmware (embedded-client/firmware), lints it with
# clippy (warnings denied) and checks its size:
#
#   bash scripts/firmware.sh
#
# Uses Debian's rustc-web toolchain with -Zbuild-std (rustup here has no thumbv7em
# target; see the notes on step_cross in scripts/test.sh), installing the packages
# it needs when they are missing. Prints a size report and, last, the line
#   FIRMWARE=<path of the ELF>
# Fails when flash (.vector_table + .text + .rodata + .data) is over 96 KiB, or
# static RAM (.data + .bss) other than the 16 KiB log store is over 16 KiB.
#
# Environment:
#   DELTASYNC_DEVICE_KEY  the device's key baked into the firmware (a dsk1-... string
#                         from `deltasync-server key add`; default: the published
#                         QEMU test key in embedded-client/firmware/src/main.rs)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FW_DIR="$ROOT/embedded-client/firmware"
TARGET=thumbv7em-none-eabihf
TARGET_DIR="$ROOT/target/firmware"
ELF="$TARGET_DIR/$TARGET/release/deltasync-firmware"
FLASH_LIMIT=$((96 * 1024))
RAM_LIMIT=$((16 * 1024))
LOG_SYMBOL=LOG_STORE

# need_pkgs comes from test.sh (sourcing it only defines functions).
# shellcheck source=scripts/test.sh
source "$ROOT/scripts/test.sh"

# rust-web-llvm provides /usr/bin/rust-lld (-> lld-22) for linking, and pulls in
# llvm-22 for the size report. qemu-system-arm and socat run the result
# (std-server/tests/qemu.rs: socat relays each guest connection to the server).
need_pkgs rustc-web cargo-web rust-web-src lld-22 rust-web-llvm rust-web-clippy qemu-system-arm socat

# llvm-size-22 and llvm-nm-22 come from llvm-22, a dependency of rust-web-llvm.
tool() {
    local t
    for t in "$1-22" "$1"; do
        if command -v "$t" >/dev/null 2>&1; then
            echo "$t"
            return 0
        fi
    done
    echo "firmware.sh: $1-22 not found (package llvm-22)" >&2
    return 1
}
SIZE="$(tool llvm-size)"
NM="$(tool llvm-nm)"

echo "firmware.sh: $(/usr/bin/rustc --version), $(/usr/bin/cargo --version)"
# Host-only settings (rustup's rustc, -C target-cpu=native, sccache) must not
# leak into the cross build; the firmware's .cargo/config.toml sets its flags,
# and --config adds (arrays merge) path remapping: shorter panic-location paths
# in flash, and no build-machine paths in the ELF.
CRATES_SRC="${CARGO_HOME:-$HOME/.cargo}/registry/src"
REMAP="target.$TARGET.rustflags=[\"--remap-path-prefix=$CRATES_SRC=/crates\", \"--remap-path-prefix=/usr/lib/rustlib/src/rust=/rust\", \"--remap-path-prefix=$ROOT=/deltasync\"]"
FEATURES=()
if [ -z "${DELTASYNC_DEVICE_KEY:-}" ]; then
    echo "firmware.sh: DELTASYNC_DEVICE_KEY is not set: building with the published QEMU test key"
    FEATURES=(--features qemu-test-key)
fi
cd "$FW_DIR"
env -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS -u RUSTC_WRAPPER -u CARGO_BUILD_RUSTC_WRAPPER \
    RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 \
    /usr/bin/cargo build --release "${FEATURES[@]}" \
    -Zbuild-std=core,alloc --target "$TARGET" \
    --config "$REMAP" \
    --target-dir "$TARGET_DIR"

[ -f "$ELF" ] || { echo "firmware.sh: $ELF was not built" >&2; exit 1; }

# Lint it with Debian's clippy (warnings denied). Called directly: `cargo
# clippy` would run the rustup proxy from ~/.cargo/bin, which has no
# thumbv7em standard library.
echo "firmware.sh: clippy (rust-web-clippy), warnings denied"
env -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS -u RUSTC_WRAPPER -u CARGO_BUILD_RUSTC_WRAPPER \
    PATH="/usr/bin:/bin" CARGO=/usr/bin/cargo RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 \
    /usr/bin/cargo-clippy clippy --release "${FEATURES[@]}" \
    -Zbuild-std=core,alloc --target "$TARGET" \
    --config "$REMAP" \
    --target-dir "$TARGET_DIR" -- -D warnings

# Section sizes (SysV format: name size addr).
section() {
    "$SIZE" -A "$ELF" | awk -v s="$1" '$1 == s { print $2; found = 1 } END { if (!found) print 0 }'
}
vectors=$(section .vector_table)
text=$(section .text)
rodata=$(section .rodata)
data=$(section .data)
bss=$(section .bss)
uninit=$(section .uninit)
flash=$((vectors + text + rodata + data))
ram=$((data + bss + uninit))

# The log store is a named static (take_static!(LOG_STORE: ...) in src/main.rs).
# (Whole outputs into variables, then filtered: with pipefail, a reader that
# stops early would fail the script through SIGPIPE.)
symbols="$("$NM" -S -C --size-sort -r "$ELF")"
log_hex=$(awk -v s="::$LOG_SYMBOL\$" '$0 ~ s && !found { print $2; found = 1 }' <<<"$symbols")
if [ -z "$log_hex" ]; then
    echo "firmware.sh: symbol $LOG_SYMBOL not found in $ELF" >&2
    exit 1
fi
log_store=$((16#$log_hex))
other_ram=$((ram - log_store))

echo
"$SIZE" -A "$ELF" | grep -E '^(section|\.vector_table|\.text|\.rodata|\.data|\.bss|\.uninit)\b' || true
echo
echo "largest statics in RAM:"
awk '$3 ~ /^[bBdD]$/ && n++ < 8' <<<"$symbols" |
    while read -r _addr size _kind name; do
        printf '  %6d  %s\n' "$((16#$size))" "$name"
    done
echo
printf 'flash:      %6d bytes (.vector_table %d + .text %d + .rodata %d + .data %d), limit %d\n' \
    "$flash" "$vectors" "$text" "$rodata" "$data" "$FLASH_LIMIT"
printf 'static RAM: %6d bytes (.data %d + .bss %d + .uninit %d)\n' "$ram" "$data" "$bss" "$uninit"
printf '  log store %6d bytes (%s)\n' "$log_store" "$LOG_SYMBOL"
printf '  the rest  %6d bytes, limit %d\n' "$other_ram" "$RAM_LIMIT"
echo "(the stack is not static: the firmware prints its peak as 'STACK peak=' at the end of a run)"

fail=0
if [ "$flash" -gt "$FLASH_LIMIT" ]; then
    echo "firmware.sh: FAIL: flash $flash > $FLASH_LIMIT" >&2
    fail=1
fi
if [ "$other_ram" -gt "$RAM_LIMIT" ]; then
    echo "firmware.sh: FAIL: static RAM besides the log store $other_ram > $RAM_LIMIT" >&2
    fail=1
fi
[ "$fail" -eq 0 ] || exit 1

echo "FIRMWARE=$ELF"
