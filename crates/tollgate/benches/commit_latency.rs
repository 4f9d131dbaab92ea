//! What the durable commit of usage events adds to a response, at 1, 32 and 256
//! concurrent requests (`docs/BENCHMARKS.md`, "Usage events: durable commit").
//!
//! For each run and each concurrency level: a fresh `tollgate serve` (this build's
//! release binary, its own SQLite file), a mock upstream answering at once
//! (non-streamed chat, no latency), then `requests` calls at that concurrency to the
//! mock directly (the upstream alone) and the same calls through the gateway. The client
//! measures both; the gateway measures its commit wait (queue to commit, the time each
//! response's bytes are held for it) and its batches, and logs them when stopped
//! (`usage events flushed`). Run with `bench/commit-latency.sh`, or:
//!
//!     cargo bench -p tollgate --bench commit_latency -- [--runs N] [--requests N]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    reason = "a benchmark program fails loudly and prints its figures"
)]

#[path = "support/gateway.rs"]
#[allow(
    dead_code,
    reason = "shared with the scale benchmark, which also reads start-up time and resident memory"
)]
mod gateway;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway::{Gateway, BIN};
use reqwest::Method;
use serde_json::{json, Value};
use tollgate_testkit::MockUpstream;

const LEVELS: [usize; 3] = [1, 32, 256];
const TARGET_MODEL: &str = "echo";

struct Options {
    runs: usize,
    /// Measured requests per level (the level's warm-up is a tenth more).
    requests: usize,
}

fn options() -> Options {
    Options {
        runs: gateway::flag("--runs", 3),
        requests: gateway::flag("--requests", 4000),
    }
}

/// One level's figures in one run.
#[derive(Debug, Clone, Copy)]
struct Figures {
    upstream_p50: Duration,
    upstream_p99: Duration,
    gateway_p50: Duration,
    gateway_p99: Duration,
    commit_p50: Duration,
    commit_p99: Duration,
    events_per_transaction: f64,
    largest_batch: u64,
    /// Requests per second through the gateway while measured.
    gateway_rate: f64,
}

#[tokio::main]
async fn main() {
    let options = options();
    let mock = MockUpstream::start().await.unwrap();
    println!(
        "commit latency: {} run(s), {} requests per level, binary {BIN}",
        options.runs, options.requests
    );
    let mut all: Vec<Vec<Figures>> = vec![Vec::new(); LEVELS.len()];
    for run in 1..=options.runs {
        for (level, &concurrency) in LEVELS.iter().enumerate() {
            let figures = measure(&mock, concurrency, options.requests).await;
            println!(
                "run {run} c={concurrency:>3}: upstream p50 {:>8} p99 {:>8} | gateway p50 {:>8} \
                 p99 {:>8} ({:.0}/s) | commit wait p50 {:>8} p99 {:>8} | {:.1} \
                 events/transaction (largest {})",
                us(figures.upstream_p50),
                us(figures.upstream_p99),
                us(figures.gateway_p50),
                us(figures.gateway_p99),
                figures.gateway_rate,
                us(figures.commit_p50),
                us(figures.commit_p99),
                figures.events_per_transaction,
                figures.largest_batch,
            );
            all[level].push(figures);
        }
    }
    println!();
    println!("medians of {} run(s) (microseconds):", options.runs);
    println!(
        "| concurrency | upstream alone p50 / p99 | through the gateway p50 / p99 | gateway requests/s | commit wait p50 / p99 | commit wait / gateway, p50 / p99 | events per transaction |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (level, &concurrency) in LEVELS.iter().enumerate() {
        let runs = &all[level];
        let mid = |pick: fn(&Figures) -> f64| median(runs.iter().map(pick).collect());
        let (up50, up99) = (
            mid(|f| micros(f.upstream_p50)),
            mid(|f| micros(f.upstream_p99)),
        );
        let (gw50, gw99) = (
            mid(|f| micros(f.gateway_p50)),
            mid(|f| micros(f.gateway_p99)),
        );
        let (cw50, cw99) = (mid(|f| micros(f.commit_p50)), mid(|f| micros(f.commit_p99)));
        let share50 = mid(|f| f.commit_p50.as_secs_f64() / f.gateway_p50.as_secs_f64());
        let share99 = mid(|f| f.commit_p99.as_secs_f64() / f.gateway_p99.as_secs_f64());
        println!(
            "| {concurrency} | {up50:.0} / {up99:.0} | {gw50:.0} / {gw99:.0} | {:.0} | {cw50:.0} / {cw99:.0} | {:.0} % / {:.0} % | {:.1} |",
            mid(|f| f.gateway_rate),
            share50 * 100.0,
            share99 * 100.0,
            mid(|f| f.events_per_transaction),
        );
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn us(d: Duration) -> String {
    format!("{}us", d.as_micros())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

async fn measure(mock: &MockUpstream, concurrency: usize, requests: usize) -> Figures {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("bench.db").display());
    let mut gateway = Gateway::start(&db).await;
    let key = tenant(&gateway, mock).await;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .unwrap();

    let upstream_url = format!("{}/chat/completions", mock.base_url());
    let gateway_url = format!("http://{}/v1/chat/completions", gateway.addr);
    let warm_up = (requests / 10).max(concurrency);
    // The upstream alone: the model name is the mock's script, no key.
    let direct = |model: &'static str| {
        json!({"model": model,
        "messages": [{"role": "user", "content": "How much does this cost?"}]})
    };
    load(
        &http,
        &upstream_url,
        None,
        direct(TARGET_MODEL),
        concurrency,
        warm_up,
    )
    .await;
    let upstream = load(
        &http,
        &upstream_url,
        None,
        direct(TARGET_MODEL),
        concurrency,
        requests,
    )
    .await;
    load(
        &http,
        &gateway_url,
        Some(&key),
        direct("bench/m"),
        concurrency,
        warm_up,
    )
    .await;
    let started = Instant::now();
    let through = load(
        &http,
        &gateway_url,
        Some(&key),
        direct("bench/m"),
        concurrency,
        requests,
    )
    .await;

    let gateway_rate = requests as f64 / started.elapsed().as_secs_f64();
    let flushed = gateway.stop().await;
    let field = |name: &str| -> u64 {
        let at = flushed.find(&format!("{name}=")).unwrap() + name.len() + 1;
        flushed[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(field("failed_transactions"), 0, "{flushed}");
    assert_eq!(
        usize::try_from(field("events")).unwrap(),
        requests + warm_up,
        "{flushed}"
    );
    Figures {
        upstream_p50: percentile(&upstream, 0.50),
        upstream_p99: percentile(&upstream, 0.99),
        gateway_p50: percentile(&through, 0.50),
        gateway_p99: percentile(&through, 0.99),
        commit_p50: Duration::from_micros(field("commit_wait_p50_us")),
        commit_p99: Duration::from_micros(field("commit_wait_p99_us")),
        events_per_transaction: field("events") as f64 / field("transactions") as f64,
        largest_batch: field("largest_batch"),
        gateway_rate,
    }
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// `total` POSTs of `body` from `concurrency` clients; each latency is send to last byte
/// of a 200. Sorted.
async fn load(
    http: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    body: Value,
    concurrency: usize,
    total: usize,
) -> Vec<Duration> {
    let next = Arc::new(AtomicUsize::new(0));
    let body = Arc::new(body);
    let mut clients = Vec::new();
    for _ in 0..concurrency {
        let (http, next, body) = (http.clone(), next.clone(), body.clone());
        let (url, key) = (url.to_owned(), key.map(str::to_owned));
        clients.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let mut request = http.post(&url).json(&*body);
                if let Some(key) = &key {
                    request = request.bearer_auth(key);
                }
                let started = Instant::now();
                let response = request.send().await.unwrap();
                let status = response.status();
                let bytes = response.bytes().await.unwrap();
                latencies.push(started.elapsed());
                assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
            }
            latencies
        }));
    }
    let mut all = Vec::with_capacity(total);
    for client in clients {
        all.extend(client.await.unwrap());
    }
    all.sort();
    all
}

/// Endpoint `bench/m` on the mock, a group allowed on it, no limits; its key.
async fn tenant(gateway: &Gateway, mock: &MockUpstream) -> String {
    let http = reqwest::Client::new();
    gateway
        .manage(
            &http,
            Method::POST,
            "/v1/gateway/endpoints",
            Some(
                json!({"slug": "bench/m", "targets": [{"provider": "OPENAI_COMPATIBLE",
                "base_url": mock.base_url(), "target_model": TARGET_MODEL, "secret_id": null}]}),
            ),
        )
        .await;
    let group = gateway
        .manage(
            &http,
            Method::POST,
            "/v1/gateway/groups",
            Some(
                json!({"metadata": {"external_entity_id": "bench"}, "models": [{"slug": "bench/m"}],
                   "hierarchy": {"limit_enforcement": "INDEPENDENT", "parent_group_id": null}}),
            ),
        )
        .await;
    let id = group["id"].as_str().unwrap();
    let key = gateway
        .manage(
            &http,
            Method::POST,
            &format!("/v1/gateway/groups/{id}/api_keys"),
            Some(json!({"name": "bench"})),
        )
        .await;
    key["api_key"].as_str().unwrap().to_owned()
}
