#!/usr/bin/env python3
"""How Tollgate's cost per request moves with concurrent connections and with active
groups, in one run (docs/BENCHMARKS.md, "Scaling curve"). Run by bench/curve.sh, which
installs what this needs; by hand:

    python3 bench/curve.py --tollgate target/release/tollgate [--duration 10] \\
        [--connections 1,64,512] [--active-groups 10,10000] [--seed-workers 8] [--first-pass-limit 120]

Same upstream (nginx, one worker, fixed bodies) and same gateway seeding as
bench/compare.py, whose functions this uses; every figure is taken non-streamed and
streamed, with wrk at saturation for `--duration` seconds after a warm-up:

- connections: the upstream alone and Tollgate (one key on the leaf of the 3-level
  CASCADING tree, the full work per request) at each of `--connections` concurrent
  connections, wrk with min(connections, 2) threads: throughput, CPU time per request
  of the process (/proc/PID/stat), p50 / p99 from `wrk --latency`;
- active groups: for each of `--active-groups` N, a fresh Tollgate whose 3-level tree
  has N leaves under the same root and child (the leaf of compare.py's tree and N - 1
  more, each with its own limits and one key), and wrk, 2 threads, 64 connections,
  taking the N keys in turn request by request, so every leaf's counters, cached key and
  limits are in use. Per kind, first a pass over every key from the fresh gateway (the
  first request of a key reads it, and the first of a counter group its day's stored
  usage, from the database), timed, with its CPU per request (skipped under 640 groups:
  with 64 requests in flight when it stops, too few to tell); then the warm-up and the
  measurement, alternating between the gateways.
"""

import argparse
import concurrent.futures
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402 - bench/compare.py, next to this file

KINDS = (("json", False), ("sse", True))


def first_pass(pid, url, keys, body, work, limit):
    """The first use of every key, from a gateway that has served none of them: one wrk
    run, 2 threads, 64 connections, each thread stopping after half as many responses as
    there are keys, wrk interrupted then (or after `limit` seconds). Seconds taken,
    requests, CPU µs per request."""
    before = compare.cpu_seconds(pid)
    stats = compare.wrk_stats(work, url, keys, body, limit, stop_after=(len(keys) + 1) // 2)
    cpu = compare.cpu_seconds(pid) - before
    seconds = stats["requests"] / stats["rps"] if stats["rps"] else limit
    if stats["requests"] < len(keys):
        print(f"  warning: the first pass ended after {limit} s with {stats['requests']} requests for {len(keys)} keys")
    return {"seconds": seconds, "requests": stats["requests"], "cpu_us": cpu / max(stats["requests"], 1) * 1e6}


def measure(name, pid, url, keys, body, kind, duration, work, connections=64):
    """One kind at saturation after a 1-second warm-up: wrk's figures plus CPU µs per request."""
    threads = min(connections, 2)
    # warm-up, also checks that the call answers
    compare.wrk_stats(work, url, keys, body, 1, connections, threads)
    before = compare.cpu_seconds(pid)
    stats = compare.wrk_stats(work, url, keys, body, duration, connections, threads)
    stats["cpu_us"] = (compare.cpu_seconds(pid) - before) / max(stats["requests"], 1) * 1e6
    print(
        f"  {name}, {kind}, {connections} connections: {stats['rps']:.0f} req/s, "
        f"CPU {stats['cpu_us']:.1f} us/request, p50 {stats['p50']:.0f} us, p99 {stats['p99']:.0f} us",
        flush=True,
    )
    return stats


def saturate(name, pid, url, keys, models, duration, work, connections):
    """Both kinds: {kind: `measure`'s figures}."""
    return {
        kind: measure(
            name, pid, url.replace("{kind}", kind), keys, compare.request_body(models[kind], stream),
            kind, duration, work, connections,
        )
        for kind, stream in KINDS
    }


def seed_leaves(base, slugs, count, workers):
    """`count` more leaves beside compare.py's under its level-1 group, one key each."""
    found = compare.manage(base, "GET", "/v1/gateway/groups?external_entity_id=bench-level-1")
    parent = found["items"][0]["id"]

    def leaf(i):
        group = compare.create_group(base, slugs, 2, f"bench-leaf-{i}", parent)
        return compare.manage(base, "POST", f"/v1/gateway/groups/{group}/api_keys", {"name": "bench"})["api_key"]

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(leaf, range(count)))


def connections_curve(args, nginx, upstream, work):
    results = {"upstream": {}, "tollgate": {}}
    url = upstream + "/{kind}/v1/chat/completions"
    for n in args.connections:
        results["upstream"][n] = saturate(
            "upstream alone", nginx.pid, url, None, {"json": "m", "sse": "m"}, args.duration, work, n
        )
    own = os.path.join(work, "connections")
    os.makedirs(own)
    gateway, base, key, slugs = compare.start_tollgate(args.tollgate, own, upstream)
    try:
        for n in args.connections:
            results["tollgate"][n] = saturate(
                "Tollgate", gateway.pid, base + "/v1/chat/completions", key, slugs, args.duration, work, n
            )
    except BaseException:
        compare.stop_tollgate(gateway, own, check=False)
        raise
    compare.stop_tollgate(gateway, own)
    return results


def groups_curve(args, upstream, work):
    """A gateway per number of active groups, seeded and taken through its first pass
    over the keys; then the measurements, alternating between the gateways."""
    results, gateways = {}, {}
    try:
        for n in args.active_groups:
            own = os.path.join(work, f"groups-{n}")
            os.makedirs(own)
            gateway, base, key, slugs = compare.start_tollgate(args.tollgate, own, upstream)
            gateways[n] = (gateway, own)
            url = base + "/v1/chat/completions"
            started = time.monotonic()
            keys = [key] + seed_leaves(base, slugs, n - 1, args.seed_workers)
            bodies = {kind: compare.request_body(slugs[kind], stream) for kind, stream in KINDS}
            results[n] = {"seeding": time.monotonic() - started, "cold": {}, "url": url, "keys": keys, "bodies": bodies}
            print(f"  {n} active groups: seeded {n - 1} leaves and keys in {results[n]['seeding']:.1f} s", flush=True)
            for kind, _ in KINDS:
                if n < 10 * 64:  # 64 requests in flight when wrk stops: too few keys to tell
                    continue
                cold = first_pass(gateway.pid, url, keys, bodies[kind], work, args.first_pass_limit)
                results[n]["cold"][kind] = cold
                print(
                    f"  {n} active groups, {kind}, first pass: {cold['requests']} requests in "
                    f"{cold['seconds']:.0f} s, CPU {cold['cpu_us']:.1f} us/request",
                    flush=True,
                )
        for kind, _ in KINDS:
            for n in args.active_groups:
                r = results[n]
                r[kind] = measure(
                    f"{n} active groups", gateways[n][0].pid, r["url"], r["keys"], r["bodies"][kind],
                    kind, args.duration, work,
                )
        for n in args.active_groups:
            results[n]["rss"] = compare.rss_mib(gateways[n][0].pid)
    except BaseException:
        for gateway, own in gateways.values():
            compare.stop_tollgate(gateway, own, check=False)
        raise
    stored = [compare.stop_tollgate(gateway, own, check=False) for gateway, own in gateways.values()]
    if 0 in stored:
        raise RuntimeError("a gateway stored no usage event")
    return results


def report(args, by_connections, by_groups):
    up, tg = by_connections["upstream"], by_connections["tollgate"]
    base = 64 if 64 in args.connections else args.connections[0]  # compare.py's point
    for kind, title in (("json", "non-streamed"), ("sse", "streamed")):
        print()
        print(f"connections, {title}:")
        print(
            "| connections | upstream alone: req/s, CPU µs/request, p50 / p99 µs "
            "| Tollgate: req/s, CPU µs/request, p50 / p99 µs | CPU ratio to the upstream's "
            f"| Tollgate CPU per request relative to {base} connection(s) |"
        )
        print("|---|---|---|---|---|")
        for n in args.connections:
            u, t = up[n][kind], tg[n][kind]
            print(
                f"| {n} | {u['rps']:.0f}, {u['cpu_us']:.1f}, {u['p50']:.0f} / {u['p99']:.0f} "
                f"| {t['rps']:.0f}, {t['cpu_us']:.1f}, {t['p50']:.0f} / {t['p99']:.0f} "
                f"| {t['cpu_us'] / u['cpu_us']:.1f} | {t['cpu_us'] / tg[base][kind]['cpu_us']:.2f} |"
            )
    print()
    print("active groups (64 connections):")
    print(
        "| active groups | seeding, s | first pass over the keys: s, CPU µs/request (non-streamed / streamed) "
        "| then non-streamed: req/s, CPU µs/request, p50 / p99 µs "
        "| then streamed: req/s, CPU µs/request, p50 / p99 µs | resident memory after, MiB |"
    )
    print("|---|---|---|---|---|---|")
    for n, f in by_groups.items():
        cold = " / ".join(
            f"{f['cold'][k]['seconds']:.1f} s, {f['cold'][k]['cpu_us']:.0f}" if k in f["cold"] else "—" for k, _ in KINDS
        )
        cells = [f"{f[k]['rps']:.0f}, {f[k]['cpu_us']:.1f}, {f[k]['p50']:.0f} / {f[k]['p99']:.0f}" for k, _ in KINDS]
        print(f"| {n} | {f['seeding']:.1f} | {cold} | {cells[0]} | {cells[1]} | {f['rss']:.0f} |")
    small, large = args.active_groups[0], args.active_groups[-1]
    if small != large:
        s, l = by_groups[small], by_groups[large]
        print()
        print(
            f"{large} / {small} active groups: CPU per request {l['json']['cpu_us'] / s['json']['cpu_us']:.2f} "
            f"non-streamed, {l['sse']['cpu_us'] / s['sse']['cpu_us']:.2f} streamed; throughput "
            f"{l['json']['rps'] / s['json']['rps']:.2f} / {l['sse']['rps'] / s['sse']['rps']:.2f}"
        )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tollgate", required=True)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", default="1,64,512")
    parser.add_argument("--active-groups", default="10,10000")
    parser.add_argument("--seed-workers", type=int, default=8)
    parser.add_argument("--first-pass-limit", type=int, default=120)
    args = parser.parse_args()
    args.tollgate = os.path.abspath(args.tollgate)
    args.connections = [int(n) for n in args.connections.split(",")]
    args.active_groups = [int(n) for n in args.active_groups.split(",")]

    with compare.upstream_in("tollgate-curve-") as (work, nginx, upstream):
        print("by connections:", flush=True)
        by_connections = connections_curve(args, nginx, upstream, work)
        print("by active groups:", flush=True)
        by_groups = groups_curve(args, upstream, work)
        report(args, by_connections, by_groups)


if __name__ == "__main__":
    sys.exit(main())
