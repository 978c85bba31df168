#!/usr/bin/env bash
# Tree pushes against an rsync daemon (see src/bin/vs-rsync-tree.rs), on two
# versions of a real crate's source from the cargo registry:
#   bash bench/vs-rsync-tree.sh [RUNS] [CRATE] [VERSION_A] [VERSION_B]
# (defaults: 5 runs of syn 2.0.117 then syn 3.0.10). The versions are
# fetched into the local registry if missing. BENCH_DIR sets where both
# servers' roots go; DELAY_MS the relay's one-way delay (10).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RUNS=${1:-5}
CRATE=${2:-syn}
A=${3:-2.0.117}
B=${4:-3.0.10}
if ! command -v rsync >/dev/null; then
    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends rsync
fi
registry_src() {
    ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"$CRATE-$1" 2>/dev/null | head -1
}
if [ -z "$(registry_src "$A")" ] || [ -z "$(registry_src "$B")" ]; then
    tmp=$(mktemp -d)
    mkdir -p "$tmp/src" && touch "$tmp/src/lib.rs"
    cat > "$tmp/Cargo.toml" <<TOML
[package]
name = "fetch-trees"
version = "0.0.0"
edition = "2021"
[dependencies]
a = { package = "$CRATE", version = "=$A", default-features = false }
b = { package = "$CRATE", version = "=$B", default-features = false }
TOML
    (cd "$tmp" && cargo fetch --quiet)
    # A fetch keeps the .crate archives; unpack them where builds would.
    for v in "$A" "$B"; do
        if [ -z "$(registry_src "$v")" ]; then
            crate=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$CRATE-$v.crate" | head -1)
            dir=$(dirname "$crate" | sed 's#/cache/#/src/#')
            mkdir -p "$dir" && tar -xzf "$crate" -C "$dir"
        fi
    done
    rm -rf "$tmp"
fi
cargo build --release -p deltasync-server -p deltasync-client -p deltasync-bench
rsync --version | sed -n 1p
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB"
exec target/release/vs-rsync-tree "$(registry_src "$A")" "$(registry_src "$B")" "$RUNS"
