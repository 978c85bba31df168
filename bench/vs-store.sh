#!/usr/bin/env bash
# The file store against the S3 store (see src/bin/vs-store.rs), with
# SeaweedFS started (and stopped) as the test command does:
#   bash bench/vs-store.sh [RUNS] [BIG_MIB] [COPY_MIB] [RSS_GIB]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=../scripts/test.sh
source scripts/test.sh
trap stop_seaweedfs EXIT
cargo build --release --workspace --bins
start_seaweedfs
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB"
DELTASYNC_BENCH_S3="$DELTASYNC_TEST_S3" target/release/vs-store "$@"
