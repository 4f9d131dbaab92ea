#!/usr/bin/env bash
# Tollgate against LiteLLM proxy and against the upstream alone, in one run (the table in
# docs/BENCHMARKS.md, "Comparison with LiteLLM"): nginx with fixed bodies as the upstream,
# nginx relaying to it (proxy_pass, nothing else), a release `tollgate serve` doing the
# full work per request, LiteLLM proxy with one worker; throughput at saturation, CPU per
# request, latency at a fixed rate, stream time to first byte, memory. Installs what it needs the first time: nginx and wrk from
# Debian, oha from crates.io into bench/.tools, LiteLLM from PyPI into
# bench/.venv-litellm (both ignored by git).
#
#   bench/compare.sh                         # 10 s per measurement, fixed rate 1,000 req/s
#   DURATION=5 RATE=500 bench/compare.sh
#   NO_LITELLM=1 bench/compare.sh            # the upstream and Tollgate only
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${DURATION:-10}"
rate="${RATE:-1000}"

if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light wrk
fi
if [ ! -x bench/.tools/bin/oha ]; then
    cargo install oha --locked --root bench/.tools
fi
litellm=()
if [ -z "${NO_LITELLM:-}" ]; then
    if [ ! -x bench/.venv-litellm/bin/litellm ]; then
        python3 -m venv bench/.venv-litellm
        bench/.venv-litellm/bin/pip install -q 'litellm[proxy]'
    fi
    litellm=(--litellm bench/.venv-litellm/bin/litellm)
    echo "LiteLLM $(bench/.venv-litellm/bin/pip show litellm | sed -n 's/^Version: //p')"
fi
cargo build --release -p tollgate --bin tollgate

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 bench/compare.py --tollgate target/release/tollgate --oha bench/.tools/bin/oha \
    --duration "$duration" --rate "$rate" "${litellm[@]}"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
