#!/usr/bin/env bash
# Tollgate's cost per request against concurrent connections (1, 64, 512, the upstream
# alone measured at each too) and against active groups (10 and 10,000 leaves, one key
# each, wrk taking the keys in turn; first use of the keys, then warm), non-streamed and
# streamed, in one run (the tables in docs/BENCHMARKS.md, "Scaling curve"). Same upstream
# and seeding as bench/compare.sh, whose driver bench/curve.py imports. Installs nginx and
# wrk from Debian the first time; then about 7 minutes with the defaults.
#
#   bench/curve.sh                                   # 10 s per measurement
#   DURATION=5 CONNECTIONS=1,64,512 ACTIVE_GROUPS=10,10000 SEED_WORKERS=8 FIRST_PASS_LIMIT=120 bench/curve.sh
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${DURATION:-10}"
connections="${CONNECTIONS:-1,64,512}"
active_groups="${ACTIVE_GROUPS:-10,10000}"
seed_workers="${SEED_WORKERS:-8}"
first_pass_limit="${FIRST_PASS_LIMIT:-120}"

if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light wrk
fi
cargo build --release -p tollgate --bin tollgate
target="${CARGO_TARGET_DIR:-target}"

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 bench/curve.py --tollgate "$target/release/tollgate" --duration "$duration" \
    --connections "$connections" --active-groups "$active_groups" --seed-workers "$seed_workers" \
    --first-pass-limit "$first_pass_limit"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
