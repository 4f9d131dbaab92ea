#!/usr/bin/env python3
"""Where Tollgate's latency at a fixed request rate goes (docs/BENCHMARKS.md, "Latency
at 1,000 requests/s"). Run by bench/latency.sh, which installs what this needs; by hand:

    python3 bench/latency.py --tollgate target/release/tollgate --oha bench/.tools/bin/oha \\
        [--rate 1000] [--duration 8] [--rounds 3] [--saturate 0]

Same upstream (nginx, one worker, fixed bodies) and same gateway seeding as
bench/compare.py, whose functions this uses. For each round, a fresh gateway on a fresh
SQLite file; with `--saturate S`, S seconds of wrk at saturation (64 connections) to
fill the usage table, and the gateway restarted on the same file so that its figures
below cover the fixed-rate run alone (none by default: the file stays small); a 1 s
warm-up at a fifth of the rate, then non-streamed requests at `--rate` with oha (`-q RATE
--latency-correction`, 32 connections) for `--duration` seconds, and right after it the
upstream alone at the same rate for the added latency. The gateway then stops, and its
own log line `usage events flushed` gives the commit wait — from the moment a request
hands its usage event to the outbox to the moment the outbox answers, which is how long
that response's last bytes are held — at p50 / p99 / max, with the number of
transactions and the largest batch.
"""

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402 - bench/compare.py, next to this file


def flushed(log_path):
    """The commit-wait figures of the gateway's `usage events flushed` line."""
    with open(log_path) as f:
        text = f.read()
    figures = {}
    for line in text.splitlines():
        if "usage events flushed" in line:
            for key, value in re.findall(r"(\w+)=(\d+)", line):
                figures[key] = int(value)
    if "commit_wait_p99_us" not in figures:
        raise RuntimeError("no 'usage events flushed' line in " + log_path)
    return figures


def round_once(args, work, upstream):
    os.makedirs(work)
    gateway, base, key, slugs = compare.start_tollgate(args.tollgate, work, upstream, log="info")
    ok = False
    try:
        url = base + "/v1/chat/completions"
        body = compare.request_body(slugs["json"], False)
        if args.saturate:
            # Fill the table, then start again on the same file, so the gateway's commit
            # figures cover the fixed-rate run alone.
            compare.wrk(work, url, key, body, args.saturate)
            compare.stop_tollgate(gateway, work)
            gateway, base = compare.launch_tollgate(args.tollgate, work, log="info")
            url = base + "/v1/chat/completions"
        compare.oha(args.oha, url, key, body, max(1, args.rate // 5), 1)
        p50, p99, achieved = compare.oha(args.oha, url, key, body, args.rate, args.duration)
        b50, b99, _ = compare.oha(
            args.oha, f"{upstream}/json/v1/chat/completions", None,
            compare.request_body("m", False), args.rate, args.duration,
        )
        ok = True
    finally:
        # After an error, stop it without the stored-events check, which would hide it.
        compare.stop_tollgate(gateway, work, check=ok)
    figures = flushed(os.path.join(work, "tollgate.log"))
    return {
        "p50": p50, "p99": p99, "achieved": achieved, "b50": b50, "b99": b99,
        "wait50": figures["commit_wait_p50_us"], "wait99": figures["commit_wait_p99_us"],
        "waitmax": figures["commit_wait_max_us"], "transactions": figures["transactions"],
        "events": figures["events"], "largest": figures["largest_batch"],
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tollgate", required=True)
    parser.add_argument("--oha", required=True)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--saturate", type=int, default=0)
    args = parser.parse_args()
    args.tollgate = os.path.abspath(args.tollgate)
    args.oha = os.path.abspath(args.oha)

    with compare.upstream_in("tollgate-latency-") as (work, _nginx, upstream):
        rows = []
        for n in range(1, args.rounds + 1):
            print(f"round {n}:", flush=True)
            r = round_once(args, os.path.join(work, f"round-{n}"), upstream)
            rows.append(
                f"| {n} | {r['p50']:.0f} / {r['p99']:.0f} | {r['b50']:.0f} / {r['b99']:.0f} "
                f"| {r['p50'] - r['b50']:.0f} / {r['p99'] - r['b99']:.0f} "
                f"| {r['wait50']} / {r['wait99']} / {r['waitmax']} "
                f"| {r['events']} / {r['transactions']} ({r['largest']}) |"
            )
        print()
        print(
            f"non-streamed at {args.rate} req/s, {args.duration} s per round"
            + (f", after {args.saturate} s at saturation" if args.saturate else "")
            + ":\n"
            "| round | Tollgate p50 / p99, µs | upstream alone p50 / p99, µs | added p50 / p99, µs "
            "| commit wait p50 / p99 / max, µs | events / transactions (largest batch) |"
        )
        print("|---|---|---|---|---|---|")
        for row in rows:
            print(row)


if __name__ == "__main__":
    sys.exit(main())
