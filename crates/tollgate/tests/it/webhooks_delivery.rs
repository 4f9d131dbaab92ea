//! Billing webhooks end to end (SPEC §3): real requests through the gateway, usage
//! events delivered to a real HTTP sink — body shape, both signatures, batching, retries
//! with a stable identity (C17), dead letters and manual retry, secret rotation, and
//! nothing lost across SIGTERM and restart (C16).

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tollgate::config::Config;
use tollgate::RunningServer;
use tollgate_billing::RetrySchedule;
use tollgate_core::clock::ManualClock;
use tollgate_core::{Clock, SystemClock, Timestamp};
use tollgate_testkit::{MockUpstream, ReceivedWebhook, SinkReply, WebhookSink};

use crate::support::{ok_json, test_config};

const HOOKS: &str = "/v1/gateway/webhook_endpoints";
const SLUG: &str = "acme/m";
const WAIT: Duration = Duration::from_secs(20);

/// A gateway in this process over a data directory that outlives restarts, with the
/// same configuration and clock after each one, a mock upstream and a webhook sink.
struct Rig {
    config: Config,
    clock: Arc<dyn Clock>,
    server: Option<RunningServer>,
    base_url: String,
    admin_key: String,
    http: reqwest::Client,
    mock: MockUpstream,
    sink: WebhookSink,
    _dir: TempDir,
}

impl Rig {
    async fn start(clock: Arc<dyn Clock>, adjust: impl FnOnce(&mut Config)) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(&dir);
        adjust(&mut config);
        let server = tollgate::start_with_clock(config.clone(), clock.clone())
            .await
            .unwrap();
        Rig {
            base_url: format!("http://{}", server.local_addr()),
            admin_key: config.admin_key.clone().unwrap(),
            config,
            clock,
            server: Some(server),
            http: reqwest::Client::new(),
            mock: MockUpstream::start().await.unwrap(),
            sink: WebhookSink::start().await.unwrap(),
            _dir: dir,
        }
    }

    /// A rig for a gateway running elsewhere (another process), with its own mock and
    /// sink; it cannot be restarted from here.
    async fn attach(base_url: String, admin_key: String) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        Rig {
            config: test_config(&dir),
            clock: Arc::new(SystemClock),
            server: None,
            base_url,
            admin_key,
            http: reqwest::Client::new(),
            mock: MockUpstream::start().await.unwrap(),
            sink: WebhookSink::start().await.unwrap(),
            _dir: dir,
        }
    }

    /// A graceful shutdown, then the same configuration over the same files.
    async fn restart(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await.unwrap();
        }
        let server = tollgate::start_with_clock(self.config.clone(), self.clock.clone())
            .await
            .unwrap();
        self.base_url = format!("http://{}", server.local_addr());
        self.server = Some(server);
    }

    fn post(&self, path: &str, body: &Value) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}{path}", self.base_url))
            .header("Authorization", format!("Api-Key {}", self.admin_key))
            .json(body)
    }

    async fn get(&self, path: &str) -> Value {
        ok_json(
            self.http
                .get(format!("{}{path}", self.base_url))
                .header("Authorization", format!("Api-Key {}", self.admin_key))
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    /// Endpoint `acme/m` on the mock, a group for `external_id` and a key in it.
    async fn customer(&self, external_id: &str) -> String {
        let post = |path: &str, body: Value| self.post(path, &body).send();
        ok_json(
            post(
                "/v1/gateway/endpoints",
                json!({"slug": SLUG, "targets": [{"provider": "OPENAI_COMPATIBLE",
                    "base_url": self.mock.base_url(),
                    "target_model": "echo?prompt_tokens=7&completion_tokens=3&cached_tokens=2",
                    "secret_id": null}]}),
            )
            .await
            .unwrap(),
        )
        .await;
        let group = ok_json(
            post(
                "/v1/gateway/groups",
                json!({"metadata": {"external_entity_id": external_id},
                       "models": [{"slug": SLUG}],
                       "hierarchy": {"limit_enforcement": "INDEPENDENT", "parent_group_id": null}}),
            )
            .await
            .unwrap(),
        )
        .await;
        let id = group["id"].as_str().unwrap();
        ok_json(
            post(
                &format!("/v1/gateway/groups/{id}/api_keys"),
                json!({"name": null}),
            )
            .await
            .unwrap(),
        )
        .await["api_key"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// A webhook endpoint on the sink, through the management API: `(id, secret)`.
    async fn hook(&self) -> (String, String) {
        let created = ok_json(
            self.post(
                HOOKS,
                &json!({"url": self.sink.url(), "description": "billing"}),
            )
            .send()
            .await
            .unwrap(),
        )
        .await;
        (
            created["id"].as_str().unwrap().to_owned(),
            created["secret"].as_str().unwrap().to_owned(),
        )
    }

    /// One chat completion; returns the gateway's `x-request-id`.
    async fn chat(&self, key: &str, metadata: Option<&str>) -> String {
        let mut request = self
            .http
            .post(format!("{}/v1/chat/completions", self.base_url))
            .bearer_auth(key)
            .json(&json!({"model": SLUG, "messages": [{"role": "user", "content": "hi"}]}));
        if let Some(metadata) = metadata {
            request = request.header("X-Request-Metadata", metadata);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        let id = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        response.bytes().await.unwrap();
        id
    }

    async fn deliveries(&self, hook: &str) -> Vec<Value> {
        self.get(&format!("{HOOKS}/{hook}/deliveries?limit=1000"))
            .await["items"]
            .as_array()
            .unwrap()
            .clone()
    }

    /// Waits until the endpoint's deliveries (as the API lists them) satisfy `done`.
    async fn wait_deliveries(&self, hook: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let deliveries = self.deliveries(hook).await;
            if done(&deliveries) {
                return deliveries;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "deliveries never got there: {deliveries:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await.unwrap();
        }
    }
}

fn schedule(text: &str) -> RetrySchedule {
    RetrySchedule::parse(text).unwrap()
}

fn request_ids(requests: &[ReceivedWebhook]) -> Vec<String> {
    requests
        .iter()
        .flat_map(ReceivedWebhook::events)
        .map(|e| e["requestId"].as_str().unwrap().to_owned())
        .collect()
}

/// Every attempt of one delivery: the same id in both headers and the same bytes.
fn assert_one_identity(requests: &[ReceivedWebhook], secret: &str) {
    let first = &requests[0];
    let id = first.header("webhook-id").unwrap();
    assert!(id.starts_with("dlv_"), "{id}");
    for request in requests {
        assert_eq!(request.header("webhook-id"), Some(id));
        assert_eq!(request.header("x-baseten-request-id"), Some(id));
        assert_eq!(request.body, first.body, "byte-identical body");
        assert!(request.verifies_standard(secret) && request.verifies_baseten(secret));
    }
}

#[tokio::test]
async fn a_batch_carries_every_event_field_and_verifies_under_both_schemes() {
    // The gateway's clock stands still, so both events wait for one batch however slow
    // the machine is.
    let clock = Arc::new(ManualClock::new(Timestamp(1_800_000_000_000)));
    let rig = Rig::start(clock.clone(), |_| {}).await;
    let key = rig.customer("cust-7").await;
    let (hook, secret) = rig.hook().await;
    let first = rig
        .chat(&key, Some(r#"{"run": "a-1", "n": 9007199254740993}"#))
        .await;
    let second = rig.chat(&key, None).await;
    clock.advance_millis(1000);
    assert!(rig.sink.wait_for_events(2, WAIT).await);

    let requests = rig.sink.requests();
    assert_eq!(requests.len(), 1, "both events in one batch");
    let request = &requests[0];
    assert!(request.verifies_standard(&secret));
    assert!(request.verifies_baseten(&secret));
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, "/webhook");
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(request.header("webhook-timestamp"), Some("1800000001"));

    let body = request.json().unwrap();
    assert_eq!(body["type"], "API_BILLING_USAGE");
    assert_eq!(body.as_object().unwrap().len(), 2);
    assert_eq!(body["data"].as_object().unwrap().len(), 1);
    let events = request.events();
    let prefix = key.split('.').next().unwrap();
    let group_id = events[0]["groupId"].as_str().unwrap().to_owned();
    assert!(group_id.starts_with("grp_"));
    for (event, (request_id, metadata)) in events.iter().zip([
        (&first, json!({"run": "a-1", "n": 9007199254740993_u64})),
        (&second, Value::Null),
    ]) {
        let idempotency_key = event["idempotencyKey"].as_str().unwrap();
        assert!(!idempotency_key.is_empty());
        assert_eq!(
            *event,
            json!({
                "idempotencyKey": idempotency_key,
                "timestamp": 1_800_000_000_000_i64,
                "requestId": request_id,
                "requestMetadata": metadata,
                "modelSlug": SLUG,
                "externalEntityId": "cust-7",
                "externalCustomerId": "cust-7",
                "apiKeyPrefix": prefix,
                "groupId": group_id,
                "status": "completed",
                "tokens": {"inputTokens": 7, "outputTokens": 3, "cachedInputTokens": 2},
            })
        );
    }
    // The metadata's integer above 2^53 travels digit for digit.
    let text = String::from_utf8(request.body.to_vec()).unwrap();
    assert!(text.contains(r#""requestMetadata":{"run": "a-1", "n": 9007199254740993}"#));

    // The events pull API shows the same objects.
    let pulled = rig.get("/v1/gateway/events").await;
    assert_eq!(pulled["items"].as_array().unwrap(), &events);

    let deliveries = rig
        .wait_deliveries(&hook, |d| {
            d.first().is_some_and(|d| d["status"] == "delivered")
        })
        .await;
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0]["id"], request.header("webhook-id").unwrap());
    assert_eq!(deliveries[0]["attempts"], 1);
    assert_eq!(deliveries[0]["event_count"], 2);
    rig.stop().await;
}

#[tokio::test]
async fn events_are_cut_100_100_50_and_the_rest_after_the_batch_interval() {
    let clock = Arc::new(ManualClock::new(Timestamp(1_800_000_000_000)));
    let rig = Rig::start(clock.clone(), |_| {}).await;
    let key = rig.customer("cust-7").await;
    let (hook, secret) = rig.hook().await;
    let sent: Vec<String> = futures::future::join_all((0..250).map(|_| rig.chat(&key, None))).await;
    // 200 fill two batches; the last 50 wait for the interval on the gateway's clock.
    let two = rig
        .wait_deliveries(&hook, |d| {
            d.len() == 2 && d.iter().all(|d| d["status"] == "delivered")
        })
        .await;
    assert_eq!(two[0]["event_count"], 100);
    assert_eq!(two[1]["event_count"], 100);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(rig.sink.requests().len(), 2);
    clock.advance_millis(1000);
    let three = rig
        .wait_deliveries(&hook, |d| {
            d.len() == 3 && d.iter().all(|d| d["status"] == "delivered")
        })
        .await;
    assert_eq!(three[2]["event_count"], 50);

    let requests = rig.sink.requests();
    assert_eq!(requests.len(), 3);
    assert!(requests.iter().all(|r| r.verifies(&secret)));
    let mut received = request_ids(&requests);
    let mut expected = sent;
    received.sort();
    expected.sort();
    assert_eq!(received, expected, "each request's event exactly once");
    rig.stop().await;
}

/// C17: 500 twice, then 200 — three attempts with one identity, and a receiver that
/// dedupes by idempotency key ends with exactly one of each event.
#[tokio::test]
async fn c17_a_delivery_answered_500_twice_keeps_its_identity() {
    let rig = Rig::start(Arc::new(SystemClock), |config| {
        config.webhooks.retry_schedule = schedule("100ms,200ms");
    })
    .await;
    let key = rig.customer("cust-7").await;
    let (hook, secret) = rig.hook().await;
    rig.sink.fail_next(2);
    let ids = [rig.chat(&key, None).await, rig.chat(&key, None).await];
    let deliveries = rig
        .wait_deliveries(&hook, |d| {
            d.first().is_some_and(|d| d["status"] == "delivered")
        })
        .await;

    let requests = rig.sink.requests();
    assert_eq!(requests.len(), 3);
    assert_one_identity(&requests, &secret);
    assert_eq!(deliveries[0]["attempts"], 3);
    assert_eq!(
        deliveries[0]["id"],
        requests[0].header("webhook-id").unwrap()
    );
    // The schedule: ≥ 100 ms, then ≥ 200 ms (each + at most 10 % and one poll).
    let waits = [
        requests[1].received_at - requests[0].received_at,
        requests[2].received_at - requests[1].received_at,
    ];
    assert!(waits[0] >= Duration::from_millis(100), "{waits:?}");
    assert!(waits[1] >= Duration::from_millis(200), "{waits:?}");
    let kept = rig.sink.accepted_events();
    assert_eq!(kept.events.len(), 2);
    assert_eq!(kept.duplicates, 0);
    let mut kept_ids: Vec<&str> = kept
        .events
        .values()
        .map(|e| e["requestId"].as_str().unwrap())
        .collect();
    kept_ids.sort_unstable();
    let mut sent: Vec<&str> = ids.iter().map(String::as_str).collect();
    sent.sort_unstable();
    assert_eq!(kept_ids, sent);
    rig.stop().await;
}

/// C17, variant: the receiver sleeps past the timeout; the retry is the same delivery.
#[tokio::test]
async fn c17_a_receiver_that_sleeps_past_the_timeout_gets_the_same_delivery_again() {
    let rig = Rig::start(Arc::new(SystemClock), |config| {
        config.webhooks.retry_schedule = schedule("100ms");
        config.webhooks.timeout = Duration::from_millis(500);
    })
    .await;
    let key = rig.customer("cust-7").await;
    let (hook, secret) = rig.hook().await;
    rig.sink.script([SinkReply::Sleep(Duration::from_secs(2))]);
    rig.chat(&key, None).await;
    let deliveries = rig
        .wait_deliveries(&hook, |d| {
            d.first().is_some_and(|d| d["status"] == "delivered")
        })
        .await;
    let requests = rig.sink.requests();
    assert_eq!(requests.len(), 2);
    assert_one_identity(&requests, &secret);
    assert_eq!(deliveries[0]["attempts"], 2);
    // The timed-out attempt happened; its successor came after timeout + the step.
    let gap = requests[1].received_at - requests[0].received_at;
    assert!(gap >= Duration::from_millis(600), "{gap:?}");
    assert_eq!(rig.sink.accepted_events().events.len(), 1);
    rig.stop().await;
}

/// C17, variant: the gateway restarts between two attempts of a delivery.
#[tokio::test]
async fn c17_a_restart_between_attempts_keeps_the_identity() {
    let mut rig = Rig::start(Arc::new(SystemClock), |config| {
        config.webhooks.retry_schedule = schedule("2500ms");
    })
    .await;
    let key = rig.customer("cust-7").await;
    let (hook, secret) = rig.hook().await;
    rig.sink.fail_next(1);
    let id = rig.chat(&key, None).await;
    assert!(rig.sink.wait_for_requests(1, WAIT).await);
    rig.wait_deliveries(&hook, |d| d.first().is_some_and(|d| d["attempts"] == 1))
        .await;
    rig.restart().await;
    let deliveries = rig
        .wait_deliveries(&hook, |d| {
            d.first().is_some_and(|d| d["status"] == "delivered")
        })
        .await;
    let requests = rig.sink.requests();
    assert_eq!(requests.len(), 2);
    assert_one_identity(&requests, &secret);
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0]["attempts"], 2);
    let kept = rig.sink.accepted_events();
    assert_eq!(kept.events.len(), 1);
    assert_eq!(kept.events.values().next().unwrap()["requestId"], id);
    rig.stop().await;
}

#[tokio::test]
async fn a_dead_letter_is_listed_and_a_manual_retry_redelivers_it() {
    let rig = Rig::start(Arc::new(SystemClock), |config| {
        config.webhooks.retry_schedule = schedule("50ms,50ms");
    })
    .await;
    let key = rig.customer("cust-7").await;
    let (hook, secret) = rig.hook().await;
    rig.sink.set_default(SinkReply::Status(503));
    rig.chat(&key, None).await;
    let failed = rig
        .wait_deliveries(&hook, |d| {
            d.first().is_some_and(|d| d["status"] == "failed")
        })
        .await;
    assert_eq!(failed[0]["attempts"], 3, "two retry steps: three attempts");
    assert_eq!(failed[0]["last_response_status"], 503);
    assert_eq!(failed[0]["next_attempt_at"], Value::Null);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        rig.sink.requests().len(),
        3,
        "nothing after the dead letter"
    );

    rig.sink.set_default(SinkReply::Status(200));
    let id = failed[0]["id"].as_str().unwrap();
    let retried = ok_json(
        rig.post(&format!("{HOOKS}/{hook}/deliveries/{id}/retry"), &json!({}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(retried["status"], "pending");
    let delivered = rig
        .wait_deliveries(&hook, |d| {
            d.first().is_some_and(|d| d["status"] == "delivered")
        })
        .await;
    assert_eq!(delivered[0]["attempts"], 4);
    assert_eq!(delivered[0]["last_response_status"], 200);
    let requests = rig.sink.requests();
    assert_eq!(requests.len(), 4);
    assert_one_identity(&requests, &secret);
    rig.stop().await;
}

#[tokio::test]
async fn a_4xx_answer_fails_the_delivery_at_once() {
    let rig = Rig::start(Arc::new(SystemClock), |config| {
        config.webhooks.retry_schedule = schedule("50ms,50ms");
    })
    .await;
    let key = rig.customer("cust-7").await;
    let (hook, _) = rig.hook().await;
    rig.sink.script([SinkReply::Status(422)]);
    rig.chat(&key, None).await;
    let failed = rig
        .wait_deliveries(&hook, |d| {
            d.first().is_some_and(|d| d["status"] == "failed")
        })
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(failed[0]["attempts"], 1);
    assert_eq!(failed[0]["last_response_status"], 422);
    assert_eq!(rig.sink.requests().len(), 1);
    rig.stop().await;
}

#[tokio::test]
async fn after_a_rotation_both_secrets_sign_for_24_hours_then_only_the_new_one() {
    let clock = Arc::new(ManualClock::new(Timestamp(1_800_000_000_000)));
    let rig = Rig::start(clock.clone(), |_| {}).await;
    let key = rig.customer("cust-7").await;
    let (hook, old) = rig.hook().await;
    let rotated = ok_json(
        rig.post(&format!("{HOOKS}/{hook}/rotate_secret"), &json!({}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let new = rotated["secret"].as_str().unwrap().to_owned();

    // Sent 23:59:59 after the rotation: both sign, newest first.
    clock.advance_millis(86_398_000);
    rig.chat(&key, None).await;
    clock.advance_millis(1000);
    assert!(rig.sink.wait_for_requests(1, WAIT).await);
    // Sent two seconds past the 24 hours: only the new one.
    clock.advance_millis(2000);
    rig.chat(&key, None).await;
    clock.advance_millis(1000);
    assert!(rig.sink.wait_for_requests(2, WAIT).await);

    let requests = rig.sink.requests();
    let during = &requests[0];
    assert!(during.verifies(&old) && during.verifies(&new));
    assert_eq!(
        during
            .header("webhook-signature")
            .unwrap()
            .split(' ')
            .count(),
        2
    );
    let baseten: Vec<&str> = during
        .header("x-baseten-signature")
        .unwrap()
        .split(',')
        .collect();
    assert_eq!(baseten.len(), 2);
    let newest_first = ReceivedWebhook {
        headers: vec![("x-baseten-signature".into(), baseten[0].into())],
        ..during.clone()
    };
    assert!(newest_first.verifies_baseten(&new));
    let after = &requests[1];
    assert!(after.verifies(&new));
    assert!(!after.verifies_standard(&old) && !after.verifies_baseten(&old));
    assert_eq!(
        after
            .header("webhook-signature")
            .unwrap()
            .split(' ')
            .count(),
        1
    );
    rig.stop().await;
}

// --- C16: a real process, SIGTERM, restart ---------------------------------------------

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// `tollgate serve` on a free port over `db`; returns the child and its address.
async fn spawn_gateway(db: &str, admin: &str, batch_interval: &str) -> (Child, String) {
    let mut command = Command::new(BIN);
    for (name, _) in std::env::vars() {
        if name.starts_with("TOLLGATE_") {
            command.env_remove(name);
        }
    }
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--database", db])
        .env("RUST_LOG", "info")
        .env("TOLLGATE_ADMIN_KEY", admin)
        .env("TOLLGATE_ALLOW_PRIVATE_NETWORKS", "true")
        .env("TOLLGATE_WEBHOOK_BATCH_INTERVAL", batch_interval)
        .env("TOLLGATE_WEBHOOK_RETRY_SCHEDULE", "100ms,200ms,400ms")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let line = lines.next_line().await.unwrap().expect("gateway exited");
            if let (true, Some(at)) = (line.contains("tollgate listening"), line.find("addr=")) {
                return line[at + 5..].split_whitespace().next().unwrap().to_owned();
            }
        }
    })
    .await
    .unwrap();
    // Keep draining the log so the gateway never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr)
}

async fn sigterm_and_wait(child: &mut Child) {
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

/// C16: with the batch interval at its longest nothing is sent before the stop; SIGTERM
/// right after the 50th response; after a restart the sink has all 50 request ids, each
/// once (and when it answers 500 to the first two attempts, still all 50, duplicates
/// only under an identical idempotency key).
async fn c16(failing_attempts: usize) {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("t.db").display());
    let admin = format!("tgm_c16{}", "x".repeat(40));
    let (mut gateway, addr) = spawn_gateway(&db, &admin, "1h").await;
    let mut rig = Rig::attach(format!("http://{addr}"), admin.clone()).await;
    rig.sink.fail_next(failing_attempts);
    let key = rig.customer("cust-7").await;
    let (hook, secret) = rig.hook().await;
    let mut sent = Vec::new();
    for _ in 0..50 {
        sent.push(rig.chat(&key, None).await);
    }
    sigterm_and_wait(&mut gateway).await;
    assert!(
        rig.sink.requests().is_empty(),
        "batch interval not over yet"
    );

    let (mut gateway, addr) = spawn_gateway(&db, &admin, "200ms").await;
    rig.base_url = format!("http://{addr}");
    assert!(rig.sink.wait_for_events(50, WAIT).await);
    rig.wait_deliveries(&hook, |d| {
        !d.is_empty() && d.iter().all(|d| d["status"] == "delivered")
    })
    .await;
    sigterm_and_wait(&mut gateway).await;

    let requests = rig.sink.requests();
    assert!(requests.iter().all(|r| r.verifies(&secret)));
    let kept = rig.sink.accepted_events();
    assert!(
        kept.conflicts.is_empty(),
        "a repeat differed: {:?}",
        kept.conflicts
    );
    let mut received: Vec<String> = kept
        .events
        .values()
        .map(|e| e["requestId"].as_str().unwrap().to_owned())
        .collect();
    received.sort();
    sent.sort();
    assert_eq!(received, sent, "50 distinct request ids");
    assert_eq!(
        requests.iter().filter(|r| !r.is_accepted()).count(),
        failing_attempts
    );
    let accepted_events: usize = requests
        .iter()
        .filter(|r| r.is_accepted())
        .map(|r| r.events().len())
        .sum();
    assert_eq!(accepted_events, 50, "no event accepted twice");
}

#[tokio::test]
async fn c16_nothing_queued_is_lost_on_sigterm() {
    c16(0).await;
}

#[tokio::test]
async fn c16_nothing_queued_is_lost_on_sigterm_with_two_failed_attempts() {
    c16(2).await;
}
