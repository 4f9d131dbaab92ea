#!/usr/bin/env bash
# What the durable commit of usage events adds to a response, at 1, 32 and 256
# concurrent requests: the real release binary, a mock upstream that answers at once,
# RUNS runs of REQUESTS measured requests per level. Prints each run and the medians
# (the table in docs/BENCHMARKS.md, "Usage events: durable commit").
#
#   bench/commit-latency.sh                 # 5 runs of 4000 requests per level
#   RUNS=3 REQUESTS=2000 bench/commit-latency.sh
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${RUNS:-5}"
requests="${REQUESTS:-4000}"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
cargo bench -p tollgate --bench commit_latency -- --runs "$runs" --requests "$requests"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
