//! Durable usage events against the real binary (SPEC §3, C16): a response the client
//! received in full has its event stored, whatever happens to the gateway afterwards —
//! `kill -9` under load, or SIGTERM right after the last response.
//!
//! The SIGKILL variant also runs with a webhook endpoint registered: after the restart,
//! every stored event — so every complete response's — reaches the sink
//! (`kill_9_under_load_every_stored_event_reaches_the_webhook_sink`). [`Gateway`],
//! [`Tenant`], [`drive_load`] and [`kill_9_under_load`] are the pieces to reuse.

use std::collections::{BTreeMap, HashSet};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use rand::{Rng as _, SeedableRng as _};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, Notify};
use tollgate_store::{PageRequest, SqliteStore, Store, UsageEvent, UsageFilter};
use tollgate_testkit::{MockUpstream, WebhookSink};

use crate::support::ok_json;

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// A `tollgate serve` process on `127.0.0.1:0`, its stderr collected.
pub(crate) struct Gateway {
    child: Child,
    /// `127.0.0.1:<port>`
    pub(crate) addr: String,
    pub(crate) admin_key: String,
    /// Its stderr, line by line; closed when the process has ended.
    log: mpsc::UnboundedReceiver<String>,
}

impl Gateway {
    /// Starts the binary on `db_url` (no inherited `TOLLGATE_*` variables) and waits for
    /// its "tollgate listening" line.
    pub(crate) async fn start(db_url: &str) -> Gateway {
        let admin_key = format!("tgm_durability{}", "d".repeat(32));
        let mut command = Command::new(BIN);
        for (name, _) in std::env::vars() {
            if name.starts_with("TOLLGATE_") {
                command.env_remove(name);
            }
        }
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--database", db_url])
            .env("RUST_LOG", "info")
            .env("TOLLGATE_ADMIN_KEY", &admin_key)
            .env("TOLLGATE_ALLOW_PRIVATE_NETWORKS", "true")
            .env("TOLLGATE_WEBHOOK_BATCH_INTERVAL", "200ms")
            .env("TOLLGATE_WEBHOOK_RETRY_SCHEDULE", "100ms,200ms,400ms")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let (send, mut log) = mpsc::unbounded_channel();
        // Always reading, so a full pipe never blocks the gateway.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = send.send(line);
            }
        });
        let addr = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let line = log.recv().await.expect("gateway ended");
                if let (true, Some(at)) = (line.contains("tollgate listening"), line.find("addr="))
                {
                    let rest = &line[at + 5..];
                    return rest.split_whitespace().next().unwrap().to_owned();
                }
            }
        })
        .await
        .expect("the gateway never listened");
        Gateway {
            child,
            addr,
            admin_key,
            log,
        }
    }

    fn signal(&self, name: &str) {
        let pid = self.child.id().unwrap().to_string();
        let status = std::process::Command::new("kill")
            .args([name, &pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill {name} {pid}");
    }

    pub(crate) fn kill_9(&self) {
        self.signal("-KILL");
    }

    pub(crate) fn sigterm(&self) {
        self.signal("-TERM");
    }

    pub(crate) async fn exited(&mut self) -> ExitStatus {
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the gateway did not exit")
            .unwrap()
    }

    /// The first log line after "tollgate listening" containing `text`, once the
    /// process has ended.
    pub(crate) async fn log_line(&mut self, text: &str) -> Option<String> {
        let mut found = None;
        while let Some(line) = self.log.recv().await {
            if found.is_none() && line.contains(text) {
                found = Some(line);
            }
        }
        found
    }
}

/// A customer of the gateway: two endpoints on the mock and one API key.
pub(crate) struct Tenant {
    pub(crate) key: String,
    /// The endpoints the load spreads its requests over.
    pub(crate) slugs: Vec<String>,
}

impl Tenant {
    /// A group for `external_id` allowed on one endpoint per `targets` entry
    /// (`slug -> target_model` scripts for the mock), and a key for it.
    pub(crate) async fn create(
        gateway: &Gateway,
        mock: &MockUpstream,
        external_id: &str,
        targets: &[(&str, &str)],
    ) -> Tenant {
        let http = reqwest::Client::new();
        let post = |path: &str, body: serde_json::Value| {
            http.post(format!("http://{}{path}", gateway.addr))
                .header("Authorization", format!("Api-Key {}", gateway.admin_key))
                .json(&body)
                .send()
        };
        for (slug, model) in targets {
            let endpoint = json!({"slug": slug, "targets": [{"provider": "OPENAI_COMPATIBLE",
                "base_url": mock.base_url(), "target_model": model, "secret_id": null}]});
            ok_json(post("/v1/gateway/endpoints", endpoint).await.unwrap()).await;
        }
        let models: Vec<_> = targets
            .iter()
            .map(|(slug, _)| json!({"slug": slug}))
            .collect();
        let group = ok_json(
            post(
                "/v1/gateway/groups",
                json!({"metadata": {"external_entity_id": external_id}, "models": models,
                       "hierarchy": {"limit_enforcement": "INDEPENDENT", "parent_group_id": null}}),
            )
            .await
            .unwrap(),
        )
        .await;
        let id = group["id"].as_str().unwrap();
        let key = ok_json(
            post(
                &format!("/v1/gateway/groups/{id}/api_keys"),
                json!({"name": "load"}),
            )
            .await
            .unwrap(),
        )
        .await["api_key"]
            .as_str()
            .unwrap()
            .to_owned();
        Tenant {
            key,
            slugs: targets.iter().map(|(slug, _)| (*slug).to_owned()).collect(),
        }
    }
}

/// What the client saw of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Non-streamed: 200 and the whole JSON body; streamed: `data: [DONE]` received.
    Complete { request_id: String },
    /// Answered with headers (and so a request id), then cut off.
    Cut { request_id: String },
    /// Sent, but the connection failed before any header.
    Unanswered,
    /// The connection was refused: the gateway was already gone.
    NotSent,
    /// An HTTP status other than 200.
    Refused { status: u16 },
}

pub(crate) struct LoadReport {
    pub(crate) outcomes: Vec<Outcome>,
}

impl LoadReport {
    pub(crate) fn complete_ids(&self) -> Vec<String> {
        self.outcomes
            .iter()
            .filter_map(|outcome| match outcome {
                Outcome::Complete { request_id } => Some(request_id.clone()),
                _ => None,
            })
            .collect()
    }

    pub(crate) fn count(&self, pick: fn(&Outcome) -> bool) -> usize {
        self.outcomes.iter().filter(|o| pick(o)).count()
    }
}

/// Sends `total` chat requests from `clients` concurrent clients, request `n` streamed
/// when `n` is odd, on slug `tenant.slugs[(n / 2) % len]` (so every slug gets both
/// kinds). After each complete response `on_complete(completed so far)` runs.
pub(crate) async fn drive_load(
    gateway: &Gateway,
    tenant: &Tenant,
    total: usize,
    clients: usize,
    on_complete: Arc<dyn Fn(usize) + Send + Sync>,
) -> LoadReport {
    let http = reqwest::Client::new();
    let next = Arc::new(AtomicUsize::new(0));
    let completed = Arc::new(AtomicUsize::new(0));
    let url = format!("http://{}/v1/chat/completions", gateway.addr);
    let mut workers = Vec::new();
    for _ in 0..clients {
        let (http, next, completed, url) =
            (http.clone(), next.clone(), completed.clone(), url.clone());
        let (key, slugs, on_complete) = (
            tenant.key.clone(),
            tenant.slugs.clone(),
            on_complete.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= total {
                    return seen;
                }
                let body = json!({"model": slugs[(n / 2) % slugs.len()], "stream": n % 2 == 1,
                    "messages": [{"role": "user", "content": format!("request {n}")}]});
                let outcome = one_request(&http, &url, &key, &body).await;
                if matches!(outcome, Outcome::Complete { .. }) {
                    on_complete(completed.fetch_add(1, Ordering::SeqCst) + 1);
                }
                seen.push((n, outcome));
            }
        }));
    }
    let mut by_index = BTreeMap::new();
    for worker in workers {
        by_index.extend(worker.await.unwrap());
    }
    LoadReport {
        outcomes: by_index.into_values().collect(),
    }
}

async fn one_request(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    body: &serde_json::Value,
) -> Outcome {
    let is_stream = body["stream"] == true;
    let response = match http.post(url).bearer_auth(key).json(body).send().await {
        Ok(response) => response,
        Err(e) if e.is_connect() => return Outcome::NotSent,
        Err(_) => return Outcome::Unanswered,
    };
    let status = response.status().as_u16();
    if status != 200 {
        return Outcome::Refused { status };
    }
    let request_id = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap()
        .to_owned();
    let mut bytes = Vec::new();
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        match chunk {
            Ok(chunk) => bytes.extend_from_slice(&chunk),
            Err(_) => return Outcome::Cut { request_id },
        }
    }
    let is_whole = if is_stream {
        String::from_utf8_lossy(&bytes).contains("data: [DONE]")
    } else {
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .is_ok_and(|answer| answer["choices"].is_array())
    };
    if is_whole {
        Outcome::Complete { request_id }
    } else {
        Outcome::Cut { request_id }
    }
}

/// Every usage event in the SQLite file at `db_url` (the gateway has exited).
pub(crate) async fn stored_events(db_url: &str) -> Vec<UsageEvent> {
    let store = SqliteStore::open(db_url).await.unwrap();
    let page = PageRequest {
        limit: 10_000,
        after: None,
    };
    let events = store
        .list_usage_events(&UsageFilter::default(), page)
        .await
        .unwrap()
        .items;
    store.close().await;
    events
}

/// Request ids stored more than once.
fn duplicated_request_ids(events: &[UsageEvent]) -> Vec<String> {
    let mut seen = HashSet::new();
    events
        .iter()
        .filter(|e| !seen.insert(e.request_id.clone()))
        .map(|e| e.request_id.clone())
        .collect()
}

/// The seed of the kill moment: `TOLLGATE_KILL_SEED` to replay a run, else fresh.
fn kill_seed() -> u64 {
    std::env::var("TOLLGATE_KILL_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(rand::random)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_no_event_of_a_complete_response() {
    let run = kill_9_under_load(Stall::No, None).await;
    run.assert_every_complete_response_has_one_event().await;
    run.stop().await;
}

/// The same, with the database stalled (another process holds its write lock) from the
/// chosen moment until after the kill: commits are certainly in flight when the process
/// dies, so a response released before its commit would be caught every time, not only
/// when the kill happens to land in the sub-millisecond window of a normal commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_the_store_stalls_loses_no_event_of_a_complete_response() {
    let run = kill_9_under_load(Stall::Yes, None).await;
    run.assert_every_complete_response_has_one_event().await;
    run.stop().await;
}

/// C16's SIGKILL variant, sink half: after the restart every stored event — among them
/// every complete response's — reaches the webhook sink, signed, with duplicates only
/// under an identical idempotency key and body. A batch the killed process was sending
/// is sent again once its lease runs out (attempt timeout + 5 s), hence the long wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_every_stored_event_reaches_the_webhook_sink() {
    let sink = WebhookSink::start().await.unwrap();
    let run = kill_9_under_load(Stall::No, Some(&sink.url())).await;
    run.assert_every_complete_response_has_one_event().await;
    let stored_keys: BTreeMap<String, String> = stored_events(&run.db_url)
        .await
        .into_iter()
        .map(|e| (e.request_id, e.idempotency_key))
        .collect();
    let stored: HashSet<String> = stored_keys.keys().cloned().collect();
    let delivered = |requests: &[tollgate_testkit::ReceivedWebhook]| -> HashSet<String> {
        tollgate_testkit::dedupe_accepted(requests)
            .events
            .values()
            .filter_map(|e| e["requestId"].as_str().map(str::to_owned))
            .collect()
    };
    let is_all_there = sink
        .wait_until(Duration::from_secs(60), |requests| {
            delivered(requests).is_superset(&stored)
        })
        .await;
    let requests = sink.requests();
    let got = delivered(&requests);
    let missing: Vec<&String> = stored.iter().filter(|id| !got.contains(*id)).collect();
    assert!(
        is_all_there,
        "not delivered (seed {}): {missing:?}",
        run.seed
    );
    assert_eq!(got, stored, "the sink holds exactly the stored events");
    let kept = tollgate_testkit::dedupe_accepted(&requests);
    assert!(kept.conflicts.is_empty(), "{:?}", kept.conflicts);
    // Identity survives the kill: each event is delivered under the idempotency key it
    // was committed with before the process died.
    let delivered_keys: BTreeMap<String, String> = kept
        .events
        .iter()
        .map(|(key, e)| (e["requestId"].as_str().unwrap().to_owned(), key.clone()))
        .collect();
    assert_eq!(delivered_keys, stored_keys);
    let (_, secret) = run.webhook.clone().unwrap();
    assert!(requests.iter().all(|r| r.verifies(&secret)));
    println!(
        "kill test: {} events delivered in {} requests ({} repeated under their own key)",
        got.len(),
        requests.len(),
        kept.duplicates
    );
    run.stop().await;
}

/// Whether the database stalls around the kill
/// (`kill_9_while_the_store_stalls_loses_no_event_of_a_complete_response`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stall {
    No,
    Yes,
}

/// What a kill run leaves for its checks.
pub(crate) struct KilledRun {
    pub(crate) seed: u64,
    stall: Stall,
    kill_after: usize,
    /// What each of the 200 clients' requests came to.
    pub(crate) report: LoadReport,
    /// The gateway started again on the same file after the kill, still running — its
    /// webhook worker delivers what the killed process had not.
    pub(crate) restarted: Gateway,
    /// The webhook endpoint's id and secret, when the run registered one.
    pub(crate) webhook: Option<(String, String)>,
    pub(crate) db_url: String,
    _dir: tempfile::TempDir,
    _mock: MockUpstream,
}

/// C16's SIGKILL variant: 200 requests from 24 clients, streamed and not, on a quick
/// and a slow endpoint; `kill -9` at a seeded moment; restart on the same file. With
/// `webhook_url`, a webhook endpoint pointing there is registered before the load (the
/// sink half of C16: every event of [`LoadReport::complete_ids`] must reach it).
pub(crate) async fn kill_9_under_load(stall: Stall, webhook_url: Option<&str>) -> KilledRun {
    let seed = kill_seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // The kill lands after this many complete responses, then a random extra delay,
    // while the other clients are mid-request: streams between chunks or at [DONE],
    // complete answers waiting on the mock or on their commit.
    let kill_after: usize = rng.gen_range(20..=170);
    let extra_delay = match stall {
        Stall::No => Duration::from_micros(rng.gen_range(0..20_000)),
        Stall::Yes => Duration::from_millis(rng.gen_range(20..200)),
    };
    println!(
        "kill test ({stall:?} stall): seed {seed} (TOLLGATE_KILL_SEED={seed} replays it), \
         kill -9 after {kill_after} complete responses + {extra_delay:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite://{}", dir.path().join("tollgate.db").display());
    let mock = MockUpstream::start().await.unwrap();
    let gateway = Arc::new(Gateway::start(&db_url).await);
    let tenant = Tenant::create(
        &gateway,
        &mock,
        "cust-7",
        &[
            ("acme/quick", "echo?chunks=3"),
            ("acme/slow", "echo?chunks=12&interval_ms=15&latency_ms=40"),
        ],
    )
    .await;
    let webhook = match webhook_url {
        Some(url) => {
            let created = ok_json(
                reqwest::Client::new()
                    .post(format!(
                        "http://{}/v1/gateway/webhook_endpoints",
                        gateway.addr
                    ))
                    .header("Authorization", format!("Api-Key {}", gateway.admin_key))
                    .json(&json!({"url": url, "description": "kill test"}))
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
            Some((
                created["id"].as_str().unwrap().to_owned(),
                created["secret"].as_str().unwrap().to_owned(),
            ))
        }
        None => None,
    };
    let staller = match stall {
        Stall::No => None,
        Stall::Yes => Some(Arc::new(tokio::sync::Mutex::new(
            <sqlx::SqliteConnection as sqlx::Connection>::connect(&db_url)
                .await
                .unwrap(),
        ))),
    };

    let killed = Arc::new(Notify::new());
    let on_complete: Arc<dyn Fn(usize) + Send + Sync> = {
        let (gateway, killed) = (Arc::clone(&gateway), Arc::clone(&killed));
        let staller = staller.clone();
        Arc::new(move |completed| {
            if completed != kill_after {
                return;
            }
            let (gateway, killed) = (Arc::clone(&gateway), Arc::clone(&killed));
            let staller = staller.clone();
            tokio::spawn(async move {
                if let Some(staller) = &staller {
                    let mut connection = staller.lock().await;
                    sqlx::query("BEGIN IMMEDIATE")
                        .execute(&mut *connection)
                        .await
                        .unwrap();
                }
                tokio::time::sleep(extra_delay).await;
                gateway.kill_9();
                drop(gateway);
                killed.notify_one();
            });
        })
    };
    let report = drive_load(&gateway, &tenant, 200, 24, on_complete).await;
    tokio::time::timeout(Duration::from_secs(10), killed.notified())
        .await
        .expect("the kill never happened");
    let mut gateway = Arc::into_inner(gateway).unwrap();
    let status = gateway.exited().await;
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "{status}"
    );
    if let Some(staller) = staller {
        let mut connection = staller.lock().await;
        sqlx::query("ROLLBACK")
            .execute(&mut *connection)
            .await
            .unwrap();
    }

    // Restart on the same file: it opens (WAL recovered) and serves.
    let restarted = Gateway::start(&db_url).await;
    let health = reqwest::get(format!("http://{}/healthz", restarted.addr))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    KilledRun {
        seed,
        stall,
        kill_after,
        report,
        restarted,
        webhook,
        db_url,
        _dir: dir,
        _mock: mock,
    }
}

impl KilledRun {
    /// C16's store half: every response the client received in full has exactly one
    /// stored event with its request id; no request id is stored twice.
    pub(crate) async fn assert_every_complete_response_has_one_event(&self) {
        let (report, seed) = (&self.report, self.seed);
        let events = stored_events(&self.db_url).await;
        let complete = report.complete_ids();
        let cut = report.count(|o| matches!(o, Outcome::Cut { .. }));
        let unanswered = report.count(|o| matches!(o, Outcome::Unanswered));
        let not_sent = report.count(|o| matches!(o, Outcome::NotSent));
        let answered: HashSet<String> = report
            .outcomes
            .iter()
            .filter_map(|o| match o {
                Outcome::Complete { request_id } | Outcome::Cut { request_id } => {
                    Some(request_id.clone())
                }
                _ => None,
            })
            .collect();
        // A complete answer killed between its commit and its first byte is billed and
        // never seen: the tokens were spent upstream all the same.
        let stored_unseen = events
            .iter()
            .filter(|e| !answered.contains(&e.request_id))
            .count();
        println!(
            "kill test ({:?} stall): {} complete, {cut} cut, {unanswered} unanswered, \
             {not_sent} not sent; {} events stored ({stored_unseen} of requests whose \
             answer never arrived)",
            self.stall,
            complete.len(),
            events.len()
        );
        assert_eq!(report.outcomes.len(), 200);
        assert_eq!(
            report.count(|o| matches!(o, Outcome::Refused { .. })),
            0,
            "{:?}",
            report.outcomes
        );
        assert!(
            complete.len() >= self.kill_after,
            "{} complete",
            complete.len()
        );
        assert!(
            complete.len() < 200,
            "the kill landed after the load ended; nothing was tested mid-flight"
        );
        assert_eq!(duplicated_request_ids(&events), Vec::<String>::new());
        let stored: HashSet<&str> = events.iter().map(|e| e.request_id.as_str()).collect();
        let missing: Vec<&String> = complete
            .iter()
            .filter(|id| !stored.contains(id.as_str()))
            .collect();
        assert_eq!(
            missing,
            Vec::<&String>::new(),
            "complete responses without an event (seed {seed})"
        );
        // At most one event per request sent, all of them the customer's.
        assert!(events.len() <= 200 - not_sent);
        assert!(events.iter().all(|e| e.external_entity_id == "cust-7"));
    }

    /// SIGTERM to the restarted gateway; it must exit cleanly.
    pub(crate) async fn stop(mut self) {
        self.restarted.sigterm();
        assert!(self.restarted.exited().await.success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_after_the_last_response_keeps_all_fifty_events() {
    let dir = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite://{}", dir.path().join("tollgate.db").display());
    let mock = MockUpstream::start().await.unwrap();
    let gateway = Arc::new(Gateway::start(&db_url).await);
    let tenant = Tenant::create(
        &gateway,
        &mock,
        "cust-7",
        &[
            ("acme/quick", "echo?chunks=4&interval_ms=5"),
            ("acme/slow", "echo?chunks=8&interval_ms=10&latency_ms=20"),
        ],
    )
    .await;
    let on_complete: Arc<dyn Fn(usize) + Send + Sync> = {
        let gateway = Arc::clone(&gateway);
        Arc::new(move |completed| {
            if completed == 50 {
                gateway.sigterm();
            }
        })
    };
    let report = drive_load(&gateway, &tenant, 50, 10, on_complete).await;
    let mut gateway = Arc::into_inner(gateway).unwrap();
    assert!(gateway.exited().await.success());
    let flushed = gateway.log_line("usage events flushed").await.unwrap();
    assert!(flushed.contains("events=50 "), "{flushed}");

    let mut restarted = Gateway::start(&db_url).await;
    restarted.sigterm();
    assert!(restarted.exited().await.success());

    let complete = report.complete_ids();
    assert_eq!(complete.len(), 50, "{:?}", report.outcomes);
    let events = stored_events(&db_url).await;
    let mut stored: Vec<String> = events.iter().map(|e| e.request_id.clone()).collect();
    stored.sort();
    let mut expected = complete;
    expected.sort();
    assert_eq!(
        stored, expected,
        "exactly the 50 answered requests, once each"
    );
    assert!(events.iter().all(|e| e.external_entity_id == "cust-7"));
}

/// SIGTERM while 20 requests (10 streamed) are mid-flight: each finishes, and each has
/// its event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_flight_finishes_every_request_and_keeps_its_event() {
    let dir = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite://{}", dir.path().join("tollgate.db").display());
    let mock = Arc::new(MockUpstream::start().await.unwrap());
    let gateway = Arc::new(Gateway::start(&db_url).await);
    let tenant = Tenant::create(
        &gateway,
        &mock,
        "cust-7",
        &[("acme/long", "echo?chunks=20&interval_ms=25&latency_ms=300")],
    )
    .await;
    mock.clear();
    let stop = {
        let gateway = Arc::clone(&gateway);
        let mock_requests = Arc::clone(&mock);
        tokio::spawn(async move {
            // Once all 20 requests reached the mock, the streams are under way.
            while mock_requests.requests().len() < 20 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            gateway.sigterm();
        })
    };
    let report = drive_load(&gateway, &tenant, 20, 20, Arc::new(|_| {})).await;
    stop.await.unwrap();
    let mut gateway = Arc::into_inner(gateway).unwrap();
    assert!(gateway.exited().await.success());
    let complete = report.complete_ids();
    assert_eq!(complete.len(), 20, "{:?}", report.outcomes);
    let mut stored: Vec<String> = stored_events(&db_url)
        .await
        .into_iter()
        .map(|e| e.request_id)
        .collect();
    stored.sort();
    let mut expected = complete;
    expected.sort();
    assert_eq!(stored, expected);
}
