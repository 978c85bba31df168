#!/usr/bin/env bash
# The deltasync server's peak RSS against the file size (see src/bin/server-rss.rs):
#   bash bench/server-rss.sh [GIB|GIB+GIB...]      (default: 1 4 1+0.5)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release --workspace --bins
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB"
exec target/release/server-rss "$@"
