#!/usr/bin/env bash
# Runs the deltasync vs rsync comparison (see src/bin/vs-rsync.rs):
#   bash bench/vs-rsync.sh [RUNS] [BIG_MIB]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! command -v rsync >/dev/null; then
    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends rsync
fi
cargo build --release --workspace --bins
rsync --version | sed -n 1p
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB"
exec target/release/vs-rsync "$@"
