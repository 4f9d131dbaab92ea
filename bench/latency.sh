#!/usr/bin/env bash
# Tollgate's latency at a fixed request rate beside the upstream alone, with the usage
# commit's share from the gateway's own figures, on a fresh gateway per round (the table
# in docs/BENCHMARKS.md, "Latency at 1,000 requests/s"). Installs nginx and wrk from
# Debian and oha from crates.io into bench/.tools the first time; then about a minute
# (two with SATURATE=20).
#
#   bench/latency.sh                          # RATE=1000 DURATION=8 ROUNDS=3 SATURATE=0
#   SATURATE=20 bench/latency.sh              # after 20 s at saturation: a table of ~200,000 events
#   TOLLGATE=/path/to/another/build bench/latency.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light wrk
fi
if [ ! -x bench/.tools/bin/oha ]; then
    cargo install oha --locked --root bench/.tools
fi
target="${CARGO_TARGET_DIR:-target}"
tollgate="${TOLLGATE:-}"
if [ -z "$tollgate" ]; then
    cargo build --release -p tollgate --bin tollgate
    tollgate="$target/release/tollgate"
fi
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 bench/latency.py --tollgate "$tollgate" --oha bench/.tools/bin/oha \
    --rate "${RATE:-1000}" --duration "${DURATION:-8}" --rounds "${ROUNDS:-3}" \
    --saturate "${SATURATE:-0}"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
