//! A large workspace against a small one (`docs/BENCHMARKS.md`, "Scale"): start-up
//! time, resident memory, the cost of a request (key look-up and admission included) and
//! of management reads, with 100,000 groups and 1,000,000 keys against 1,000 groups and
//! 10,000 keys, as ratios measured in the same run.
//!
//! Each workspace is seeded once into `target/scale/` through the store's own API (the
//! same rules and transactions as the management API, minus HTTP), then reused: the
//! command that generates them is this program. Layout: `groups / 100` CASCADING roots,
//! each with 99 children; every group is allowed `bench/echo` with a REQUEST/MINUTE
//! limit (roots 1,000,000,000, children 1,000,000) and holds `keys / groups` keys. A
//! sample of 1,000 keys, spread over every root, is kept beside the database.
//!
//!     cargo bench -p tollgate --bench scale -- [--groups N] [--keys N] [--requests N]
//!
//! For each workspace: a fresh release `tollgate serve` on a copy of the seeded file
//! (every run starts from the same state), start-up until it listens, its resident
//! memory, `requests` chat calls at one client cycling through the sampled keys (each
//! call looks its key up and admits against its group's and root's counters), then
//! management reads: the first page of the group list, one group by id (its effective
//! limits), a group by `external_entity_id` (an index look-up), and one group's keys.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    reason = "a benchmark program fails loudly and prints its figures"
)]

#[path = "support/gateway.rs"]
mod gateway;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gateway::{Gateway, ADMIN_KEY};
use reqwest::Method;
use serde_json::{json, Value};
use tollgate_core::group::ModelAccess;
use tollgate_core::ids::{new_id, IdKind};
use tollgate_core::keys::mint_api_key;
use tollgate_core::limits::{LimitType, LimitUnit, RateLimit};
use tollgate_core::{Clock, LimitMode, SystemClock};
use tollgate_store::{NewApiKey, NewGroup, SqliteStore, Store};
use tollgate_testkit::MockUpstream;

const SLUG: &str = "bench/echo";
const CHILDREN_PER_ROOT: usize = 99;
const SAMPLE: usize = 1000;

struct Options {
    groups: usize,
    keys: usize,
    requests: usize,
}

fn options() -> Options {
    let options = Options {
        groups: gateway::flag("--groups", 100_000),
        keys: gateway::flag("--keys", 1_000_000),
        requests: gateway::flag("--requests", 3000),
    };
    assert!(
        options.groups >= 10_000 && options.groups.is_multiple_of(10_000),
        "--groups must be a multiple of 10,000 (the small workspace has 1/100 of them, in trees of 100)"
    );
    assert!(options.keys >= options.groups, "--keys must be >= --groups");
    options
}

/// What one workspace measured.
struct Figures {
    start_up: Duration,
    resident_idle: u64,
    resident_after: u64,
    chat_p50: Duration,
    chat_p99: Duration,
    chat_mean: Duration,
    list_p50: Duration,
    group_p50: Duration,
    by_external_id_p50: Duration,
    keys_p50: Duration,
}

#[tokio::main]
async fn main() {
    let options = options();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/scale");
    std::fs::create_dir_all(&dir).unwrap();
    let small = (options.groups / 100, options.keys / 100);
    let large = (options.groups, options.keys);
    let mock = MockUpstream::start().await.unwrap();
    let mut results = Vec::new();
    for (groups, keys) in [small, large] {
        let seeded = seed(&dir, groups, keys).await;
        let figures = measure(&dir, &seeded, &mock, options.requests).await;
        println!(
            "{groups} groups / {keys} keys: start-up {} ms, resident {} MiB idle, {} MiB after load; \
             chat p50 {} us p99 {} us mean {} us; list p50 {} us, group p50 {} us, \
             by external id p50 {} us, keys p50 {} us",
            figures.start_up.as_millis(),
            figures.resident_idle / (1024 * 1024),
            figures.resident_after / (1024 * 1024),
            figures.chat_p50.as_micros(),
            figures.chat_p99.as_micros(),
            figures.chat_mean.as_micros(),
            figures.list_p50.as_micros(),
            figures.group_p50.as_micros(),
            figures.by_external_id_p50.as_micros(),
            figures.keys_p50.as_micros(),
        );
        results.push((groups, keys, figures));
    }
    let (_, _, s) = &results[0];
    let (_, _, l) = &results[1];
    let ratio = |large: Duration, small: Duration| large.as_secs_f64() / small.as_secs_f64();
    println!();
    println!(
        "| figure | {} groups / {} keys | {} groups / {} keys | ratio |",
        small.0, small.1, large.0, large.1
    );
    println!("|---|---|---|---|");
    let row = |name: &str, small: Duration, large: Duration| {
        println!(
            "| {name} | {} | {} | {:.2} |",
            human(small),
            human(large),
            ratio(large, small)
        );
    };
    row("start-up (spawn to listening)", s.start_up, l.start_up);
    println!(
        "| resident memory, idle / after the calls | {} / {} MiB | {} / {} MiB | {:.1} |",
        s.resident_idle / (1024 * 1024),
        s.resident_after / (1024 * 1024),
        l.resident_idle / (1024 * 1024),
        l.resident_after / (1024 * 1024),
        l.resident_after as f64 / s.resident_after as f64
    );
    row("chat call, p50", s.chat_p50, l.chat_p50);
    row("chat call, p99", s.chat_p99, l.chat_p99);
    row("chat call, mean", s.chat_mean, l.chat_mean);
    row(
        "GET groups (first page of 100), p50",
        s.list_p50,
        l.list_p50,
    );
    row("GET groups/{id}, p50", s.group_p50, l.group_p50);
    row(
        "GET groups?external_entity_id=, p50",
        s.by_external_id_p50,
        l.by_external_id_p50,
    );
    row("GET groups/{id}/api_keys, p50", s.keys_p50, l.keys_p50);
}

fn human(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.2} s", d.as_secs_f64())
    } else if d >= Duration::from_millis(10) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{} µs", d.as_micros())
    }
}

/// A seeded workspace: its database file and a sample of its keys with their groups.
struct Seeded {
    db: PathBuf,
    /// `(key, group id, external id)`.
    sample: Vec<(String, String, String)>,
}

/// Seeds `groups` groups and `keys` keys unless a finished copy exists.
async fn seed(dir: &Path, groups: usize, keys: usize) -> Seeded {
    let db = dir.join(format!("scale-{groups}-{keys}.db"));
    let sample_path = dir.join(format!("scale-{groups}-{keys}.sample.json"));
    if let Ok(text) = std::fs::read(&sample_path) {
        let sample: Vec<(String, String, String)> = serde_json::from_slice(&text).unwrap();
        return Seeded { db, sample };
    }
    for stale in [
        db.clone(),
        db.with_extension("db-wal"),
        db.with_extension("db-shm"),
    ] {
        let _ = std::fs::remove_file(stale);
    }
    let started = Instant::now();
    let url = format!("sqlite://{}", db.display());
    let store = SqliteStore::open(&url).await.unwrap();
    let clock = SystemClock;
    let workspace = tollgate::bootstrap::default_workspace(&store, &clock, Some(ADMIN_KEY))
        .await
        .unwrap();
    let limit = |threshold| ModelAccess {
        slug: SLUG.to_owned(),
        rate_limits: vec![RateLimit {
            kind: LimitType::Request,
            unit: LimitUnit::Minute,
            threshold,
        }],
        usage_limits: Vec::new(),
    };
    let keys_per_group = keys / groups;
    let roots = groups / (CHILDREN_PER_ROOT + 1);
    let sample_every = (keys / SAMPLE).max(1);
    let mut sample = Vec::new();
    let mut minted = 0usize;
    for root in 0..roots {
        let root_id = new_id(IdKind::Group);
        let mut members = Vec::with_capacity(CHILDREN_PER_ROOT + 1);
        let group = NewGroup {
            id: root_id.clone(),
            workspace_id: workspace.id.clone(),
            name: None,
            external_entity_id: format!("org-{root}"),
            models: vec![limit(1_000_000_000)],
            mode: LimitMode::Cascading,
            parent_id: None,
            created_at: clock.now(),
        };
        members.push((root_id.clone(), group.external_entity_id.clone()));
        store.create_group(group).await.unwrap();
        for child in 0..CHILDREN_PER_ROOT {
            let group = NewGroup {
                id: new_id(IdKind::Group),
                workspace_id: workspace.id.clone(),
                name: None,
                external_entity_id: format!("org-{root}-team-{child}"),
                models: vec![limit(1_000_000)],
                mode: LimitMode::Cascading,
                parent_id: Some(root_id.clone()),
                created_at: clock.now(),
            };
            members.push((group.id.clone(), group.external_entity_id.clone()));
            store.create_group(group).await.unwrap();
        }
        for (group_id, external_id) in &members {
            for _ in 0..keys_per_group {
                let key = mint_api_key();
                store
                    .insert_api_key(NewApiKey {
                        group_id: group_id.clone(),
                        prefix: key.prefix,
                        hash: key.hash.to_vec(),
                        name: None,
                        created_at: clock.now(),
                    })
                    .await
                    .unwrap();
                if minted.is_multiple_of(sample_every) && sample.len() < SAMPLE {
                    sample.push((key.full, group_id.clone(), external_id.clone()));
                }
                minted += 1;
            }
        }
        if (root + 1) % 100 == 0 {
            println!(
                "seeding {groups} groups / {keys} keys: {} groups, {minted} keys, {:.0} s",
                (root + 1) * (CHILDREN_PER_ROOT + 1),
                started.elapsed().as_secs_f64()
            );
        }
    }
    store.close().await;
    std::fs::write(&sample_path, serde_json::to_vec(&sample).unwrap()).unwrap();
    println!(
        "seeded {groups} groups / {minted} keys in {:.1} s ({})",
        started.elapsed().as_secs_f64(),
        db.display()
    );
    Seeded { db, sample }
}

async fn measure(dir: &Path, seeded: &Seeded, mock: &MockUpstream, requests: usize) -> Figures {
    // A copy, so every run starts from the seeded state.
    let run = tempfile::tempdir_in(dir).unwrap();
    let db = run.path().join("run.db");
    std::fs::copy(&seeded.db, &db).unwrap();
    let mut gateway = Gateway::start(&format!("sqlite://{}", db.display())).await;
    let start_up = gateway.start_up;
    let http = reqwest::Client::new();
    let ready = http.get(gateway.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let resident_idle = gateway.resident_bytes();

    gateway
        .manage(
            &http,
            Method::POST,
            "/v1/gateway/endpoints",
            Some(
                json!({"slug": SLUG, "targets": [{"provider": "OPENAI_COMPATIBLE",
                "base_url": mock.base_url(), "target_model": "echo", "secret_id": null}]}),
            ),
        )
        .await;

    let body = json!({"model": SLUG, "messages": [{"role": "user", "content": "hi"}]});
    let chat_url = gateway.url("/v1/chat/completions");
    // Warm-up: every sampled key once (first touches of their counters), then measured.
    for (key, _, _) in &seeded.sample {
        chat(&http, &chat_url, key, &body).await;
    }
    let mut chats = Vec::with_capacity(requests);
    for i in 0..requests {
        let (key, _, _) = &seeded.sample[i % seeded.sample.len()];
        let started = Instant::now();
        chat(&http, &chat_url, key, &body).await;
        chats.push(started.elapsed());
    }
    let chat_mean = chats.iter().sum::<Duration>() / u32::try_from(chats.len()).unwrap();
    chats.sort();

    let reads = 300;
    let mut list = Vec::new();
    let mut group = Vec::new();
    let mut by_external_id = Vec::new();
    let mut keys = Vec::new();
    for i in 0..reads {
        let (_, group_id, external_id) = &seeded.sample[(i * 7) % seeded.sample.len()];
        list.push(timed_get(&gateway, &http, "/v1/gateway/groups?limit=100").await);
        group.push(timed_get(&gateway, &http, &format!("/v1/gateway/groups/{group_id}")).await);
        by_external_id.push(
            timed_get(
                &gateway,
                &http,
                &format!("/v1/gateway/groups?external_entity_id={external_id}"),
            )
            .await,
        );
        keys.push(
            timed_get(
                &gateway,
                &http,
                &format!("/v1/gateway/groups/{group_id}/api_keys"),
            )
            .await,
        );
    }
    let resident_after = gateway.resident_bytes();
    gateway.stop().await;
    Figures {
        start_up,
        resident_idle,
        resident_after,
        chat_p50: percentile(&chats, 0.50),
        chat_p99: percentile(&chats, 0.99),
        chat_mean,
        list_p50: median(list),
        group_p50: median(group),
        by_external_id_p50: median(by_external_id),
        keys_p50: median(keys),
    }
}

async fn chat(http: &reqwest::Client, url: &str, key: &str, body: &Value) {
    let response = http
        .post(url)
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
}

async fn timed_get(gateway: &Gateway, http: &reqwest::Client, path: &str) -> Duration {
    let started = Instant::now();
    let value = gateway.manage(http, Method::GET, path, None).await;
    let elapsed = started.elapsed();
    assert!(value.is_object(), "{path}: {value}");
    elapsed
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}
