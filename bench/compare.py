#!/usr/bin/env python3
"""Tollgate against LiteLLM proxy and against the upstream alone, in one run
(docs/BENCHMARKS.md, "Comparison with LiteLLM"). Run by bench/compare.sh, which installs
what this needs; by hand:

    python3 bench/compare.py --tollgate target/release/tollgate --litellm bench/.venv-litellm/bin/litellm \
        --oha bench/.tools/bin/oha [--duration 10] [--rate 1000] [--ttfb-requests 500]

The upstream is nginx (one worker) answering every POST with a fixed body: a chat
completion with usage under /json/v1/chat/completions, and a stream of 20 content
chunks, a finish chunk, a usage chunk (`choices: []`) and `[DONE]` under
/sse/v1/chat/completions. Each system is measured on its own, one after the other:

- throughput at saturation: wrk, 2 threads, 64 connections, `--duration` seconds;
- CPU time per request of the system's process (and its children): utime + stime of
  /proc/PID/stat around the saturation run, divided by the requests wrk completed;
- latency p50 / p99 at a fixed rate: oha `-q RATE --latency-correction`, `--duration`
  seconds; a system that cannot sustain twice the rate is measured at half its
  saturation throughput instead, and the upstream alone at that rate too;
- peak resident memory: VmHWM of /proc/PID/status after all of it;
- streaming: time to the first `data:` bytes, p50 / p99 of `--ttfb-requests` sequential
  requests on new connections, and the same wrk saturation run on the stream.

Between the upstream alone and Tollgate, a second nginx relays to the upstream
(`proxy_pass` over kept-alive connections, unbuffered): what a relay that does nothing
else costs on the same machine.

Tollgate does the full work per request: key authentication, a 3-level CASCADING tree
with REQUEST/MINUTE and TOKEN/MINUTE rate limits and a TOKEN/DAY usage limit at each
level (thresholds never reached), the usage event committed to SQLite before the last
bytes leave. LiteLLM runs with one worker, a master key, no database.
"""

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request

ADMIN_KEY = "tgm_benchadminkeybenchadminkeybenchadminkey"
LITELLM_KEY = "sk-benchlitellmkey"
CHUNKS = 20
PROMPT = {"role": "user", "content": "How much does this cost?"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=60.0, headers=None):
    deadline = time.monotonic() + timeout
    while True:
        try:
            request = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(request, timeout=2) as response:
                return response.status
        except Exception as error:  # noqa: BLE001 - any failure means "not yet"
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer within {timeout} s: {error}")
            time.sleep(0.2)


def json_body():
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "It costs nothing at all."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18},
    }


def sse_body():
    def chunk(delta, finish=None, usage="absent"):
        body = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if usage != "absent":
            body["usage"] = usage
        return "data: " + json.dumps(body, separators=(",", ":")) + "\n\n"

    events = [chunk({"role": "assistant", "content": "tok0 "}, usage=None)]
    events += [chunk({"content": f"tok{i} "}, usage=None) for i in range(1, CHUNKS)]
    events.append(chunk({}, finish="stop", usage=None))
    usage = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "m",
        "choices": [],
        "usage": {"prompt_tokens": 12, "completion_tokens": CHUNKS, "total_tokens": 12 + CHUNKS},
    }
    events.append("data: " + json.dumps(usage, separators=(",", ":")) + "\n\n")
    events.append("data: [DONE]\n\n")
    return "".join(events)


def start_nginx(work, port):
    # nginx answers a POST to a static file with 405; error_page turns it into a GET of
    # the fixed body (a `return 200 "..."` cannot hold a body past 4 KiB)
    os.chmod(work, 0o755)  # nginx's worker runs as an unprivileged user
    os.makedirs(os.path.join(work, "bodies"), exist_ok=True)
    with open(os.path.join(work, "bodies", "json"), "w") as f:
        f.write(json.dumps(json_body(), separators=(",", ":")))
    with open(os.path.join(work, "bodies", "sse"), "w") as f:
        f.write(sse_body())
    http = f"""
    types {{ }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {work};
        location = /json/v1/chat/completions {{ error_page 405 =200 /bodies/json; return 405; }}
        location = /sse/v1/chat/completions {{ error_page 405 =200 /bodies/sse; return 405; }}
        location = /bodies/json {{ internal; default_type application/json; }}
        location = /bodies/sse {{ internal; default_type text/event-stream; }}
    }}
"""
    return run_nginx(work, port, http)


def start_nginx_relay(work, port, upstream):
    """nginx as a bare reverse proxy in front of the upstream: what relaying alone (a
    second hop, a pooled upstream connection, streams passed through unbuffered) costs
    on this machine, with no key, limit or usage event."""
    work = os.path.join(work, "relay")
    os.makedirs(work, exist_ok=True)
    os.chmod(work, 0o755)
    http = f"""
    proxy_temp_path {work}/nginx-proxy;
    upstream models {{ server {upstream.removeprefix("http://")}; keepalive 128; keepalive_requests 1000000; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://models;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
"""
    return run_nginx(work, port, http)


def run_nginx(work, port, http):
    """nginx with one worker, its files under `work`, `http` inside its http block; waits
    until it listens on `port`."""
    conf = f"""
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {work}/nginx-body;
    keepalive_requests 1000000;
{http}
}}
"""
    path = os.path.join(work, "nginx.conf")
    with open(path, "w") as f:
        f.write(conf)
    process = subprocess.Popen(
        ["nginx", "-p", work, "-c", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("nginx did not start; see " + work + "/nginx-error.log")
            time.sleep(0.1)
    return process


def manage(base, method, path, body=None):
    request = urllib.request.Request(
        base + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Api-Key {ADMIN_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def create_group(base, slugs, level, external_id, parent):
    """A group at `level` (0 = root) of the CASCADING tree, with REQUEST/MINUTE and
    TOKEN/MINUTE rate limits and a TOKEN/DAY usage limit per slug; returns its id."""
    scale = 10 ** (3 - level)  # each level tighter than its parent (CASCADING)
    models = [
        {
            "slug": slug,
            "rate_limits": [
                {"type": "REQUEST", "unit": "MINUTE", "threshold": 1_000_000 * scale},
                {"type": "TOKEN", "unit": "MINUTE", "threshold": 1_000_000_000 * scale},
            ],
            "usage_limits": [{"type": "TOKEN", "unit": "DAY", "threshold": 1_000_000_000_000 * scale}],
        }
        for slug in slugs.values()
    ]
    group = manage(
        base,
        "POST",
        "/v1/gateway/groups",
        {
            "metadata": {"external_entity_id": external_id},
            "models": models,
            "hierarchy": {"limit_enforcement": "CASCADING", "parent_group_id": parent},
        },
    )
    return group["id"]


@contextlib.contextmanager
def upstream_in(prefix):
    """A temporary working directory and the nginx upstream of fixed bodies in it, both
    gone afterwards, error or not: yields (work, nginx process, upstream base URL)."""
    work = tempfile.mkdtemp(prefix=prefix)
    nginx = None
    try:
        port = free_port()
        nginx = start_nginx(work, port)
        yield work, nginx, f"http://127.0.0.1:{port}"
    finally:
        stop_process(nginx)
        shutil.rmtree(work, ignore_errors=True)


def stop_process(process, timeout=20):
    """SIGTERM, then SIGKILL if it has not ended within `timeout` seconds; nothing if it
    has already ended (`process` may be None: never started)."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def stop_tollgate(process, work, check=True):
    """Stops the gateway and returns the number of usage events it stored; with `check`,
    none stored is an error. Cleanup after an error passes check=False, so that it
    stops every process and never hides the error that started it."""
    stop_process(process, timeout=30)
    path = os.path.join(work, "tollgate.db")
    if not os.path.exists(path):
        if check:
            raise RuntimeError("Tollgate left no database at " + path)
        return 0
    with sqlite3.connect(path) as db:
        events = db.execute("SELECT count(*) FROM usage_events").fetchone()[0]
    print(f"  usage events stored by Tollgate: {events}", flush=True)
    if check and events == 0:
        raise RuntimeError("Tollgate stored no usage event")
    return events


def start_tollgate(binary, work, upstream, log="warn"):
    process, base = launch_tollgate(binary, work, log)
    try:
        key, slugs = seed_tollgate(base, upstream)
    except BaseException:
        stop_tollgate(process, work, check=False)
        raise
    return process, base, key, slugs


def launch_tollgate(binary, work, log="warn"):
    """`tollgate serve` on work/tollgate.db (created or reopened), its log in work/tollgate.log."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    env.update(
        RUST_LOG=log,
        TOLLGATE_ADMIN_KEY=ADMIN_KEY,
        TOLLGATE_ALLOW_PRIVATE_NETWORKS="true",
    )
    db = os.path.join(work, "tollgate.db")
    process = subprocess.Popen(
        [binary, "serve", "--listen", f"127.0.0.1:{port}", "--database", db],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(work, "tollgate.log"), "w"),
    )
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/v1/gateway/groups", headers={"Authorization": f"Api-Key {ADMIN_KEY}"})
    return process, base


def seed_tollgate(base, upstream):
    """The endpoints, the 3-level tree and a key on its leaf; returns (key, slugs)."""
    slugs = {"json": "bench/json", "sse": "bench/sse"}
    for kind, slug in slugs.items():
        manage(
            base,
            "POST",
            "/v1/gateway/endpoints",
            {
                "slug": slug,
                "targets": [
                    {
                        "provider": "OPENAI_COMPATIBLE",
                        "base_url": f"{upstream}/{kind}/v1",
                        "target_model": "m",
                        "secret_id": None,
                    }
                ],
            },
        )
    parent = None
    for level in range(3):
        parent = create_group(base, slugs, level, f"bench-level-{level}", parent)
    key = manage(base, "POST", f"/v1/gateway/groups/{parent}/api_keys", {"name": "bench"})["api_key"]
    return key, slugs


def start_litellm(binary, work, upstream):
    port = free_port()
    config = os.path.join(work, "litellm.yaml")
    with open(config, "w") as f:
        f.write(
            f"""model_list:
  - model_name: bench-json
    litellm_params:
      model: openai/m
      api_base: {upstream}/json/v1
      api_key: none
  - model_name: bench-sse
    litellm_params:
      model: openai/m
      api_base: {upstream}/sse/v1
      api_key: none
general_settings:
  master_key: {LITELLM_KEY}
litellm_settings:
  set_verbose: false
  telemetry: false
"""
        )
    env = dict(
        os.environ,
        LITELLM_LOG="ERROR",
        LITELLM_TELEMETRY="False",
        LITELLM_LOCAL_MODEL_COST_MAP="True",  # no fetch of the price list at start
        DISABLE_ADMIN_UI="True",
    )
    process = subprocess.Popen(
        [binary, "--config", config, "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
        cwd=work,
        env=env,
        stdout=open(os.path.join(work, "litellm.log"), "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/health/liveliness", timeout=180)
    return process, base, LITELLM_KEY, {"json": "bench-json", "sse": "bench-sse"}


def process_tree(pid):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(entry))
            except OSError:
                pass
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def cpu_seconds(pid):
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid):
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def rss_mib(pid):
    total = 0
    for p in process_tree(pid):
        with open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


def request_body(model, stream):
    body = {"model": model, "messages": [PROMPT]}
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":"))


def wrk_script(work, body, keys, stop_after=None):
    """The request script: no key, one key, or a list of keys taken in turn, request by
    request (each wrk thread has its own turn, the second thread starting half-way); with
    `stop_after`, each thread stops after that many responses and leaves a file
    `<script>.stopped<thread>` behind."""
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(body)}", 'wrk.headers["Content-Type"] = "application/json"']
    if isinstance(keys, str):
        lines.append(f'wrk.headers["Authorization"] = "Bearer {keys}"')
    elif keys:
        lines += [
            "local keys = {" + ",".join(json.dumps(k) for k in keys) + "}",
            "local started, requests, turn = 0, {}, 1",
            'function setup(thread) thread:set("offset", started); started = started + 1 end',
            "function init(args)",
            '  for i, key in ipairs(keys) do wrk.headers["Authorization"] = "Bearer " .. key; requests[i] = wrk.format() end',
            "  turn = (offset or 0) * math.floor(#keys / 2) % #keys + 1",
            "end",
            "function request() local r = requests[turn]; turn = turn % #requests + 1; return r end",
        ]
    script = os.path.join(work, "post.lua")
    if stop_after:
        lines += [
            "local answered = 0",
            "function response()",
            "  answered = answered + 1",
            f"  if answered == {stop_after} then",
            f"    io.open({json.dumps(script + '.stopped')} .. (offset or 0), \"w\"):close()",
            "    wrk.thread:stop()",
            "  end",
            "end",
        ]
    with open(script, "w") as f:
        f.write("\n".join(lines) + "\n")
    return script


def wrk_stats(work, url, keys, body, duration, connections=64, threads=2, stop_after=None):
    """wrk at saturation: requests completed, requests per second, p50 and p99 in µs. With
    `stop_after`, wrk is interrupted (and reports) as soon as every thread has stopped."""
    script = wrk_script(work, body, keys, stop_after)
    stopped = [f"{script}.stopped{t}" for t in range(threads)]
    for path in stopped:
        if os.path.exists(path):
            os.remove(path)
    process = subprocess.Popen(
        ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration}s", "--timeout", "30s",
         "--latency", "-s", script, url],
        stdout=subprocess.PIPE,
        text=True,
    )
    while stop_after and process.poll() is None and not all(os.path.exists(p) for p in stopped):
        time.sleep(0.05)
    if process.poll() is None and stop_after:
        process.send_signal(signal.SIGINT)  # wrk prints its figures on SIGINT
    out = process.communicate()[0]
    if process.returncode != 0:
        raise RuntimeError(f"wrk exited with {process.returncode}: {out}")
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    if errors:
        raise RuntimeError(f"{url}: {errors.group(0)}")
    if socket_errors:
        print(f"  wrk: {socket_errors.group(0)}")
    unit = {"us": 1, "ms": 1e3, "s": 1e6, "m": 60e6}
    percentile = {
        p: float(v) * unit[u] for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
    }
    return {"requests": requests, "rps": rps, "p50": percentile["50"], "p99": percentile["99"]}


def wrk(work, url, key, body, duration):
    """wrk, 2 threads, 64 connections: requests completed and requests per second."""
    stats = wrk_stats(work, url, key, body, duration)
    return stats["requests"], stats["rps"]


def oha(binary, url, key, body, rate, duration):
    command = [
        binary, "--no-tui", "--output-format", "json", "-z", f"{duration}s", "-q", str(rate),
        "--latency-correction", "-c", "32", "-m", "POST", "-T", "application/json", "-d", body,
    ]
    if key:
        command += ["-H", f"Authorization: Bearer {key}"]
    out = subprocess.run(command + [url], capture_output=True, text=True, check=True).stdout
    result = json.loads(out)
    percentiles = result["latencyPercentiles"]
    statuses = result.get("statusCodeDistribution", {})
    bad = sum(v for k, v in statuses.items() if k != "200")
    errors = {k: v for k, v in result.get("errorDistribution", {}).items() if "deadline" not in k}
    if bad or errors:
        print(f"  oha: statuses {statuses}, errors {errors}")
    return percentiles["p50"] * 1e6, percentiles["p99"] * 1e6, result["summary"]["requestsPerSec"]


def ttfb(base_url, path, key, body, count):
    host, port = base_url.removeprefix("http://").split(":")
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        + (f"Authorization: Bearer {key}\r\n" if key else "")
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body.encode()
    samples = []
    for i in range(count + count // 10):
        with socket.create_connection((host, int(port))) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            seen = b""
            started = time.perf_counter()
            s.sendall(head)
            first = None
            while True:
                data = s.recv(65536)
                if not data:
                    break
                seen += data
                if first is None and b"data:" in seen:
                    first = time.perf_counter() - started
            if first is None or b"[DONE]" not in seen:
                raise RuntimeError(f"stream without data or [DONE]: {seen[:300]!r}")
            if i >= count // 10:
                samples.append(first * 1e6)
    samples.sort()
    return samples[len(samples) // 2], samples[min(len(samples) - 1, len(samples) * 99 // 100)]


RELAY = "nginx as a relay (proxy_pass, 1 worker)"


def measure(name, pid, base, path_prefix, key, models, args, work):
    print(f"{name}:", flush=True)
    figures = {}
    url_path = f"{path_prefix}/chat/completions"
    for kind, stream in (("json", False), ("sse", True)):
        url = base + url_path.replace("{kind}", kind)
        body = request_body(models[kind], stream)
        # warm-up, also checks that the call answers
        wrk(work, url, key, body, 1)
        before = cpu_seconds(pid)
        requests, rps = wrk(work, url, key, body, args.duration)
        cpu = cpu_seconds(pid) - before
        figures[kind] = {"rps": rps, "cpu_us": cpu / max(requests, 1) * 1e6}
        print(f"  {kind}: {rps:.0f} req/s, CPU {figures[kind]['cpu_us']:.1f} us/request", flush=True)
    rate = args.rate if figures["json"]["rps"] >= 2 * args.rate else max(1, int(figures["json"]["rps"] / 2))
    url = base + url_path.replace("{kind}", "json")
    p50, p99, achieved = oha(args.oha, url, key, request_body(models["json"], False), rate, args.duration)
    figures["rate"] = rate
    figures["p50"], figures["p99"], figures["achieved"] = p50, p99, achieved
    print(f"  at {rate} req/s (achieved {achieved:.0f}): p50 {p50:.0f} us, p99 {p99:.0f} us", flush=True)
    path = url_path.replace("{kind}", "sse")
    t50, t99 = ttfb(base, path, key, request_body(models["sse"], True), args.ttfb_requests)
    figures["ttfb50"], figures["ttfb99"] = t50, t99
    print(f"  stream TTFB p50 {t50:.0f} us, p99 {t99:.0f} us", flush=True)
    figures["hwm"] = peak_rss_mib(pid)
    return figures


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tollgate", required=True)
    parser.add_argument("--litellm")
    parser.add_argument("--oha", required=True)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--ttfb-requests", type=int, default=500)
    args = parser.parse_args()
    args.tollgate = os.path.abspath(args.tollgate)
    args.oha = os.path.abspath(args.oha)
    if args.litellm:
        args.litellm = os.path.abspath(args.litellm)

    work = tempfile.mkdtemp(prefix="tollgate-compare-")
    processes = []
    try:
        port = free_port()
        nginx = start_nginx(work, port)
        processes.append(nginx)
        upstream = f"http://127.0.0.1:{port}"
        results = {}
        results["upstream alone (nginx, 1 worker)"] = measure(
            "upstream alone", nginx.pid, upstream, "/{kind}/v1", None,
            {"json": "m", "sse": "m"}, args, work,
        )
        relay_port = free_port()
        relay = start_nginx_relay(work, relay_port, upstream)
        processes.append(relay)
        results[RELAY] = measure(
            "nginx as a relay", relay.pid, f"http://127.0.0.1:{relay_port}", "/{kind}/v1", None,
            {"json": "m", "sse": "m"}, args, work,
        )
        stop_process(relay)
        gateway, base, key, slugs = start_tollgate(args.tollgate, work, upstream)
        processes.append(gateway)
        idle = rss_mib(gateway.pid)
        results["Tollgate"] = measure("Tollgate", gateway.pid, base, "/v1", key, slugs, args, work)
        results["Tollgate"]["idle"] = idle
        stop_tollgate(gateway, work)
        if args.litellm:
            proxy, base, key, models = start_litellm(args.litellm, work, upstream)
            processes.append(proxy)
            idle = rss_mib(proxy.pid)
            results["LiteLLM proxy"] = measure("LiteLLM", proxy.pid, base, "/v1", key, models, args, work)
            results["LiteLLM proxy"]["idle"] = idle
        # the upstream alone at every other rate a system was measured at
        upstream_name = "upstream alone (nginx, 1 worker)"
        base_rates = {results[upstream_name]["rate"]: (results[upstream_name]["p50"], results[upstream_name]["p99"])}
        for name, fig in results.items():
            if fig["rate"] not in base_rates:
                p50, p99, _ = oha(
                    args.oha, f"{upstream}/json/v1/chat/completions", None,
                    request_body("m", False), fig["rate"], args.duration,
                )
                base_rates[fig["rate"]] = (p50, p99)
                print(f"upstream alone at {fig['rate']} req/s: p50 {p50:.0f} us, p99 {p99:.0f} us")
        report(results, upstream_name, base_rates)
    finally:
        for process in reversed(processes):
            stop_process(process)
        shutil.rmtree(work, ignore_errors=True)


def report(results, upstream_name, base_rates):
    up = results[upstream_name]
    print()
    print(
        "| system | throughput, req/s (non-streamed / streamed) | CPU per request, µs (non-streamed / streamed) "
        "| CPU ratio to the upstream's | p50 / p99 at fixed rate, µs | added p50 / p99, µs "
        "| stream TTFB p50 / p99, µs | added TTFB p50, µs | resident memory idle / peak, MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, f in results.items():
        b50, b99 = base_rates[f["rate"]]
        added = "—" if name == upstream_name else f"{f['p50'] - b50:.0f} / {f['p99'] - b99:.0f}"
        ratio = (
            "1 / 1"
            if name == upstream_name
            else f"{f['json']['cpu_us'] / up['json']['cpu_us']:.1f} / {f['sse']['cpu_us'] / up['sse']['cpu_us']:.1f}"
        )
        ttfb_added = "—" if name == upstream_name else f"{f['ttfb50'] - up['ttfb50']:.0f}"
        idle = f"{f['idle']:.0f}" if "idle" in f else "—"
        print(
            f"| {name} | {f['json']['rps']:.0f} / {f['sse']['rps']:.0f} "
            f"| {f['json']['cpu_us']:.1f} / {f['sse']['cpu_us']:.1f} | {ratio} "
            f"| {f['p50']:.0f} / {f['p99']:.0f} at {f['rate']} req/s | {added} "
            f"| {f['ttfb50']:.0f} / {f['ttfb99']:.0f} | {ttfb_added} | {idle} / {f['hwm']:.0f} |"
        )
    if RELAY in results:
        t, r = results["Tollgate"], results[RELAY]
        print()
        print(
            f"CPU per request Tollgate / the nginx relay: {t['json']['cpu_us'] / r['json']['cpu_us']:.1f} "
            f"non-streamed, {t['sse']['cpu_us'] / r['sse']['cpu_us']:.1f} streamed"
        )
    if "LiteLLM proxy" in results:
        t, l = results["Tollgate"], results["LiteLLM proxy"]
        print()
        print(
            f"throughput Tollgate / LiteLLM: {t['json']['rps'] / l['json']['rps']:.1f} non-streamed, "
            f"{t['sse']['rps'] / l['sse']['rps']:.1f} streamed"
        )
        print(
            f"CPU per request LiteLLM / Tollgate: {l['json']['cpu_us'] / t['json']['cpu_us']:.1f} non-streamed, "
            f"{l['sse']['cpu_us'] / t['sse']['cpu_us']:.1f} streamed"
        )


if __name__ == "__main__":
    sys.exit(main())
