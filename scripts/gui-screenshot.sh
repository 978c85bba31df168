#!/usr/bin/env bash
# Runs the real deltasync-gui window under Xvfb against a real server, lets it
# upload a file, and saves a screenshot of the window to target/gui.png.
# Fails if the window never showed the finished upload or the picture is
# blank. Every process it starts is stopped by its own pid.
#
#   bash scripts/gui-screenshot.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/test.sh
source scripts/test.sh
need_pkgs xvfb imagemagick libgl1-mesa-dri libegl1 libgl1 x11-utils

cargo build -q -p deltasync-server -p deltasync-gui
WORK="$(mktemp -d)"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

KEY="$(target/debug/deltasync-server --keys "$WORK/keys.toml" key add shot 2>/dev/null)"
target/debug/deltasync-server --listen 127.0.0.1:0 --dashboard off --keys "$WORK/keys.toml" \
    --root "$WORK/root" >"$WORK/server.out" 2>"$WORK/server.err" &
PIDS+=($!)
for _ in $(seq 100); do grep -q "listening on" "$WORK/server.out" 2>/dev/null && break; sleep 0.1; done
PORT="$(grep -o '127.0.0.1:[0-9]*' "$WORK/server.out" | head -1 | cut -d: -f2)"
[ -n "$PORT" ] || { echo "gui-screenshot: the server did not start" >&2; cat "$WORK/server.err" >&2; exit 1; }

# A free display number.
DISP=99
while [ -e "/tmp/.X11-unix/X$DISP" ] || [ -e "/tmp/.X$DISP-lock" ]; do DISP=$((DISP + 1)); done
Xvfb ":$DISP" -screen 0 1280x800x24 -nolisten tcp >"$WORK/xvfb.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do xdpyinfo -display ":$DISP" >/dev/null 2>&1 && break; sleep 0.1; done

head -c 3000000 /dev/urandom >"$WORK/quarterly-report.bin"
mkdir -p "$WORK/home"
DISPLAY=":$DISP" HOME="$WORK/home" LIBGL_ALWAYS_SOFTWARE=1 \
    target/debug/deltasync-gui --server "127.0.0.1:$PORT" --key "$KEY" "$WORK/quarterly-report.bin" \
    >"$WORK/gui.log" 2>&1 &
PIDS+=($!)

# Wait for the upload to land on the server, then for the window to show it.
for _ in $(seq 150); do [ -f "$WORK/root/quarterly-report.bin" ] && break; sleep 0.1; done
[ -f "$WORK/root/quarterly-report.bin" ] || { echo "gui-screenshot: the upload never arrived" >&2; cat "$WORK/gui.log" >&2; exit 1; }
cmp "$WORK/quarterly-report.bin" "$WORK/root/quarterly-report.bin"
# The window's log pane (echoed on the GUI's stderr) must say the upload
# finished; a failure, or nothing within 15 s, fails the script.
DONE="upload quarterly-report.bin: full"
for _ in $(seq 150); do
    grep -q "$DONE" "$WORK/gui.log" && break
    if grep -q "quarterly-report.bin: failed" "$WORK/gui.log"; then
        echo "gui-screenshot: the window reported a failure" >&2
        cat "$WORK/gui.log" >&2
        exit 1
    fi
    sleep 0.1
done
grep -q "$DONE" "$WORK/gui.log" || { echo "gui-screenshot: the window never showed the finished upload" >&2; cat "$WORK/gui.log" >&2; exit 1; }
# One more frame for the finished job to be painted.
sleep 1
mkdir -p target
import -display ":$DISP" -window root -crop 900x640+0+0 +repage target/gui.png
COLORS="$(identify -format '%k' target/gui.png)"
echo "gui-screenshot: target/gui.png ($COLORS colours)"
[ "$COLORS" -gt 8 ] || { echo "gui-screenshot: the screenshot is blank" >&2; exit 1; }
