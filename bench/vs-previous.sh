#!/usr/bin/env bash
# This build against the build of COMMIT, side by side (see src/bin/vs-previous.rs):
#   bash bench/vs-previous.sh COMMIT [RUNS] [SIZE_MIB]
# Builds COMMIT in a temporary worktree (sharing target/ for its dependencies),
# keeps its two binaries in target/prev-bin, then builds this tree and runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
COMMIT="$1"
shift
WT="$(mktemp -d)"
trap 'git worktree remove --force "$WT" >/dev/null 2>&1 || true' EXIT
git worktree add --detach -f "$WT" "$COMMIT" >/dev/null
(cd "$WT" && CARGO_TARGET_DIR="$OLDPWD/target" cargo build --release -q -p deltasync-server -p deltasync-client)
mkdir -p target/prev-bin
cp target/release/deltasync-server target/release/deltasync target/prev-bin/
cargo build --release -q --workspace --bins
echo "earlier: $(git rev-parse --short "$COMMIT"), this: $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (with uncommitted changes)')"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB"
target/release/cipher-bench 256
target/release/vs-previous target/prev-bin "$@"
