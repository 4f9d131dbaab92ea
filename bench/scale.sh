#!/usr/bin/env bash
# A workspace of 100,000 groups and 1,000,000 keys against one of 1,000 groups and
# 10,000 keys, measured in the same run (the table in docs/BENCHMARKS.md, "Scale"):
# start-up, resident memory, chat calls (key look-up and admission included) and
# management reads. The first run generates both workspaces into target/scale/ through
# the store's API (several minutes for the large one); later runs reuse them.
#
#   bench/scale.sh                                   # 100,000 groups / 1,000,000 keys
#   SCALE_GROUPS=10000 SCALE_KEYS=100000 SCALE_REQUESTS=2000 bench/scale.sh  # a quicker run (SCALE_GROUPS: a multiple of 10,000)
set -euo pipefail
cd "$(dirname "$0")/.."
groups="${SCALE_GROUPS:-100000}"
keys="${SCALE_KEYS:-1000000}"
requests="${SCALE_REQUESTS:-3000}"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
cargo bench -p tollgate --bench scale -- --groups "$groups" --keys "$keys" --requests "$requests"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
