//! The delivery worker against a real SQLite store and a real HTTP sink: batching,
//! identity across retries, the retry schedule, dead letters, terminal 4xx, the private
//! address guard, secret rotation and C18's signatures over awkward payloads.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

use std::sync::Arc;
use std::time::Duration;

use tollgate_billing::{
    create_webhook_endpoint, rotate_webhook_secret, DeliveryWorker, RetrySchedule, WorkerConfig,
};
use tollgate_core::clock::ManualClock;
use tollgate_core::ids::{new_id, IdKind};
use tollgate_core::secretbox::SecretBox;
use tollgate_core::{Clock, SystemClock, Timestamp};
use tollgate_store::{
    DeliveryStatus, PageRequest, SqliteStore, Store, UsageEvent, UsageStatus, WebhookDelivery,
};
use tollgate_testkit::{ReceivedWebhook, SinkReply, WebhookSink};

const WAIT: Duration = Duration::from_secs(10);

struct Rig {
    store: Arc<dyn Store>,
    sealer: Arc<SecretBox>,
    clock: Arc<dyn Clock>,
    workspace_id: String,
    sink: WebhookSink,
    _dir: tempfile::TempDir,
}

impl Rig {
    async fn new(clock: Arc<dyn Clock>) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&url).await.unwrap());
        let workspace = store.create_workspace("w", clock.now()).await.unwrap();
        Rig {
            store,
            sealer: Arc::new(SecretBox::new(&[9; 32])),
            clock,
            workspace_id: workspace.id,
            sink: WebhookSink::start().await.unwrap(),
            _dir: dir,
        }
    }

    /// A webhook endpoint on the sink; returns (id, secret).
    async fn endpoint(&self) -> (String, String) {
        let created = create_webhook_endpoint(
            self.store.as_ref(),
            &self.sealer,
            &self.workspace_id,
            &self.sink.url(),
            Some("billing".into()),
            self.clock.now(),
        )
        .await
        .unwrap();
        (created.endpoint.id, created.secret)
    }

    fn worker(&self, config: WorkerConfig) -> DeliveryWorker {
        DeliveryWorker::start(
            self.store.clone(),
            self.sealer.clone(),
            self.clock.clone(),
            config,
        )
        .unwrap()
    }

    fn event(&self, n: usize) -> UsageEvent {
        UsageEvent {
            idempotency_key: new_id(IdKind::Event),
            timestamp: self.clock.now(),
            request_id: format!("req_{n}"),
            request_metadata: Some(format!(r#"{{"n": {n}}}"#)),
            model_slug: "acme/llama".into(),
            external_entity_id: "cust-7".into(),
            api_key_prefix: "tg_abc".into(),
            group_id: "grp_1".into(),
            workspace_id: self.workspace_id.clone(),
            status: UsageStatus::Completed,
            input_tokens: 10,
            output_tokens: n as u64,
            cached_input_tokens: 0,
            is_estimated: false,
        }
    }

    async fn store_events(&self, count: usize) -> Vec<UsageEvent> {
        let mut events = Vec::new();
        for n in 0..count {
            let event = self.event(n);
            self.store.insert_usage_event(&event).await.unwrap();
            events.push(event);
        }
        events
    }

    async fn deliveries(&self, webhook_id: &str) -> Vec<WebhookDelivery> {
        self.store
            .list_webhook_deliveries(
                webhook_id,
                PageRequest {
                    limit: 1000,
                    after: None,
                },
            )
            .await
            .unwrap()
            .items
    }

    /// Waits until the endpoint's deliveries satisfy `done`.
    async fn wait_deliveries(
        &self,
        webhook_id: &str,
        done: impl Fn(&[WebhookDelivery]) -> bool,
    ) -> Vec<WebhookDelivery> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let deliveries = self.deliveries(webhook_id).await;
            if done(&deliveries) || tokio::time::Instant::now() > deadline {
                return deliveries;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn fast(schedule: &str) -> WorkerConfig {
    WorkerConfig {
        batch_interval: Duration::from_millis(50),
        retry_schedule: RetrySchedule::parse(schedule).unwrap(),
        request_timeout: Duration::from_secs(2),
        allow_private_networks: true,
        max_in_flight: 32,
    }
}

fn keys(request: &ReceivedWebhook) -> Vec<String> {
    request
        .events()
        .iter()
        .map(|e| e["idempotencyKey"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn cuts_250_events_into_100_100_50_and_waits_the_interval_for_the_partial_one() {
    let clock = Arc::new(ManualClock::new(Timestamp(1_800_000_000_000)));
    let rig = Rig::new(clock.clone()).await;
    let before = rig.store_events(3).await;
    let (webhook_id, secret) = rig.endpoint().await;
    let events = rig.store_events(250).await;
    let worker = rig.worker(WorkerConfig {
        batch_interval: Duration::from_secs(1),
        ..fast("1s")
    });

    assert!(rig.sink.wait_for_requests(2, WAIT).await);
    // The 50 left are younger than the interval on the worker's clock: not cut yet.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(rig.sink.requests().len(), 2);
    clock.advance_millis(999);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(rig.sink.requests().len(), 2);
    clock.advance_millis(1);
    assert!(rig.sink.wait_for_requests(3, WAIT).await);
    rig.wait_deliveries(&webhook_id, |d| {
        d.len() == 3 && d.iter().all(|d| d.status == DeliveryStatus::Delivered)
    })
    .await;
    worker.shutdown().await;

    // The two full batches travel concurrently: put requests in the order they were cut.
    let deliveries = rig.deliveries(&webhook_id).await;
    let requests: Vec<ReceivedWebhook> = deliveries
        .iter()
        .map(|d| {
            let mut sent = rig.sink.requests();
            sent.retain(|r| r.header("webhook-id") == Some(d.id.as_str()));
            assert_eq!(sent.len(), 1);
            sent.remove(0)
        })
        .collect();
    let sizes: Vec<usize> = requests.iter().map(|r| r.events().len()).collect();
    assert_eq!(sizes, [100, 100, 50]);
    let sent: Vec<String> = requests.iter().flat_map(keys).collect();
    let stored: Vec<String> = events.iter().map(|e| e.idempotency_key.clone()).collect();
    assert_eq!(sent, stored, "every event once, in storage order");
    for old in &before {
        assert!(
            !sent.contains(&old.idempotency_key),
            "sent an event older than the endpoint"
        );
    }
    for request in &requests {
        assert!(request.verifies(&secret));
        assert_eq!(request.header("content-type"), Some("application/json"));
        let timestamp: i64 = request
            .header("webhook-timestamp")
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            (1_800_000_000..=1_800_000_001).contains(&timestamp),
            "{timestamp}"
        );
    }
    let counts: Vec<u32> = deliveries.iter().map(|d| d.event_count).collect();
    assert_eq!(counts, [100, 100, 50]);
    assert!(deliveries
        .iter()
        .all(|d| d.status == DeliveryStatus::Delivered && d.attempts == 1));
    assert_eq!(
        rig.store
            .webhook_endpoint(&webhook_id)
            .await
            .unwrap()
            .unwrap()
            .cursor,
        deliveries[2].last_event_seq
    );
}

#[tokio::test]
async fn a_retried_delivery_keeps_its_id_and_bytes_and_follows_the_schedule() {
    let rig = Rig::new(Arc::new(SystemClock)).await;
    let (webhook_id, secret) = rig.endpoint().await;
    rig.sink.fail_next(2);
    let worker = rig.worker(fast("100ms,200ms,5s"));
    rig.store_events(3).await;

    assert!(rig.sink.wait_for_requests(3, WAIT).await);
    let delivery = rig
        .wait_deliveries(&webhook_id, |d| {
            d.first()
                .is_some_and(|d| d.status == DeliveryStatus::Delivered)
        })
        .await;
    worker.shutdown().await;

    let requests = rig.sink.requests();
    assert_eq!(requests.len(), 3);
    let replies: Vec<SinkReply> = requests.iter().map(|r| r.reply).collect();
    assert_eq!(
        replies,
        [
            SinkReply::Status(500),
            SinkReply::Status(500),
            SinkReply::Status(200)
        ]
    );
    for request in &requests {
        assert_eq!(request.header("webhook-id"), Some(delivery[0].id.as_str()));
        assert_eq!(
            request.header("x-baseten-request-id"),
            Some(delivery[0].id.as_str())
        );
        assert_eq!(request.body, requests[0].body);
        assert_eq!(request.body.as_ref(), delivery[0].body.as_slice());
        assert!(request.verifies(&secret));
    }
    // Waits of at least 100 ms then 200 ms: never earlier than the step (the upper
    // bounds leave room for a loaded machine, and still tell the steps from the 5 s one).
    let first_wait = requests[1].received_at - requests[0].received_at;
    let second_wait = requests[2].received_at - requests[1].received_at;
    assert!(first_wait >= Duration::from_millis(100), "{first_wait:?}");
    assert!(first_wait < Duration::from_millis(1100), "{first_wait:?}");
    assert!(second_wait >= Duration::from_millis(200), "{second_wait:?}");
    assert!(second_wait < Duration::from_millis(1200), "{second_wait:?}");
    assert_eq!(delivery[0].attempts, 3);
    assert_eq!(delivery[0].last_http_status, Some(200));
    assert_eq!(delivery[0].last_error, None);
    let kept = rig.sink.accepted_events();
    assert_eq!(kept.events.len(), 3);
    assert_eq!(kept.duplicates, 0);
}

#[tokio::test]
async fn timeouts_dropped_connections_and_429_are_retried() {
    let rig = Rig::new(Arc::new(SystemClock)).await;
    let (webhook_id, secret) = rig.endpoint().await;
    rig.sink.script([
        SinkReply::Sleep(Duration::from_millis(1500)),
        SinkReply::Drop,
        SinkReply::Status(429),
        SinkReply::Status(503),
    ]);
    let worker = rig.worker(WorkerConfig {
        request_timeout: Duration::from_millis(300),
        ..fast("50ms,50ms,50ms,50ms,50ms")
    });
    rig.store_events(1).await;
    let deliveries = rig
        .wait_deliveries(&webhook_id, |d| {
            d.first()
                .is_some_and(|d| d.status == DeliveryStatus::Delivered)
        })
        .await;
    worker.shutdown().await;
    let requests = rig.sink.requests();
    assert_eq!(requests.len(), 5);
    assert!(requests.iter().all(
        |r| r.header("webhook-id") == Some(deliveries[0].id.as_str())
            && r.body == requests[0].body
            && r.verifies(&secret)
    ));
    assert_eq!(deliveries[0].attempts, 5);
    assert_eq!(deliveries[0].status, DeliveryStatus::Delivered);
}

#[tokio::test]
async fn the_last_failure_of_the_schedule_is_a_dead_letter_and_a_manual_retry_resends_it() {
    let rig = Rig::new(Arc::new(SystemClock)).await;
    let (webhook_id, secret) = rig.endpoint().await;
    rig.sink.set_default(SinkReply::Status(500));
    let worker = rig.worker(fast("50ms,50ms"));
    rig.store_events(2).await;
    let failed = rig
        .wait_deliveries(&webhook_id, |d| {
            d.first()
                .is_some_and(|d| d.status == DeliveryStatus::Failed)
        })
        .await;
    // A schedule of two steps allows three attempts.
    assert_eq!(failed[0].attempts, 3);
    assert_eq!(failed[0].last_http_status, Some(500));
    assert_eq!(
        failed[0].last_error.as_deref(),
        Some("HTTP 500 (retry schedule exhausted)")
    );
    assert_eq!(failed[0].next_attempt_at, None);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        rig.sink.requests().len(),
        3,
        "nothing sent after the dead letter"
    );

    rig.sink.set_default(SinkReply::Status(200));
    rig.store
        .retry_webhook_delivery(&failed[0].id, rig.clock.now())
        .await
        .unwrap()
        .unwrap();
    let retried = rig
        .wait_deliveries(&webhook_id, |d| {
            d.first()
                .is_some_and(|d| d.status == DeliveryStatus::Delivered)
        })
        .await;
    worker.shutdown().await;
    assert_eq!(retried[0].id, failed[0].id);
    assert_eq!(retried[0].attempts, 4);
    let requests = rig.sink.requests();
    assert_eq!(requests.len(), 4);
    assert_eq!(requests[3].body, requests[0].body);
    assert_eq!(
        requests[3].header("webhook-id"),
        Some(failed[0].id.as_str())
    );
    assert!(requests[3].verifies(&secret));
}

#[tokio::test]
async fn a_4xx_other_than_429_fails_at_once() {
    let rig = Rig::new(Arc::new(SystemClock)).await;
    let (webhook_id, _) = rig.endpoint().await;
    rig.sink.script([SinkReply::Status(400)]);
    let worker = rig.worker(fast("50ms,50ms"));
    rig.store_events(1).await;
    let deliveries = rig
        .wait_deliveries(&webhook_id, |d| {
            d.first()
                .is_some_and(|d| d.status == DeliveryStatus::Failed)
        })
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    worker.shutdown().await;
    assert_eq!(rig.sink.requests().len(), 1);
    assert_eq!(deliveries[0].attempts, 1);
    assert_eq!(deliveries[0].last_http_status, Some(400));
    assert_eq!(
        deliveries[0].last_error.as_deref(),
        Some("HTTP 400 (not retried)")
    );
}

#[tokio::test]
async fn a_name_resolving_to_a_private_address_is_refused_at_send_time() {
    let rig = Rig::new(Arc::new(SystemClock)).await;
    // Created while allowed (or before the name was re-pointed): the check at send
    // time is what stops it.
    let created = create_webhook_endpoint(
        rig.store.as_ref(),
        &rig.sealer,
        &rig.workspace_id,
        &format!("http://localhost:{}/webhook", rig.sink.addr().port()),
        None,
        rig.clock.now(),
    )
    .await
    .unwrap();
    let literal = rig.endpoint().await;
    let worker = rig.worker(WorkerConfig {
        allow_private_networks: false,
        ..fast("10s")
    });
    rig.store_events(1).await;
    for webhook_id in [&created.endpoint.id, &literal.0] {
        let deliveries = rig
            .wait_deliveries(webhook_id, |d| d.first().is_some_and(|d| d.attempts == 1))
            .await;
        assert_eq!(deliveries[0].status, DeliveryStatus::Pending, "retryable");
        let error = deliveries[0].last_error.clone().unwrap();
        assert!(
            error.contains("private address 127.0.0.1")
                || error.contains("private address ::1")
                || error == "address 127.0.0.1 is private",
            "{error}"
        );
    }
    worker.shutdown().await;
    assert!(rig.sink.requests().is_empty());
}

#[tokio::test]
async fn during_a_rotation_both_secrets_sign_and_after_24_hours_only_the_new_one() {
    let clock = Arc::new(ManualClock::new(Timestamp(1_800_000_000_000)));
    let rig = Rig::new(clock.clone()).await;
    let (webhook_id, old) = rig.endpoint().await;
    let worker = rig.worker(fast("1s"));

    rig.store_events(1).await;
    clock.advance_millis(100);
    assert!(rig.sink.wait_for_requests(1, WAIT).await);

    let new = rotate_webhook_secret(rig.store.as_ref(), &rig.sealer, &webhook_id, clock.now())
        .await
        .unwrap()
        .unwrap();
    assert_ne!(new, old);
    rig.store_events(1).await;
    clock.advance_millis(100);
    assert!(rig.sink.wait_for_requests(2, WAIT).await);

    clock.advance_millis(24 * 3600 * 1000 - 300);
    rig.store_events(1).await;
    clock.advance_millis(100);
    assert!(rig.sink.wait_for_requests(3, WAIT).await);

    clock.advance_millis(101);
    rig.store_events(1).await;
    clock.advance_millis(100);
    assert!(rig.sink.wait_for_requests(4, WAIT).await);
    worker.shutdown().await;

    let requests = rig.sink.requests();
    let signatures = |r: &ReceivedWebhook| {
        (
            r.header("webhook-signature").unwrap().split(' ').count(),
            r.header("x-baseten-signature").unwrap().split(',').count(),
        )
    };
    // Before: the old secret alone.
    assert_eq!(signatures(&requests[0]), (1, 1));
    assert!(requests[0].verifies(&old));
    assert!(!requests[0].verifies_standard(&new));
    // Right after and 24 h later (the old one's last millisecond): both, newest first.
    for request in &requests[1..3] {
        assert_eq!(signatures(request), (2, 2));
        assert!(request.verifies(&old) && request.verifies(&new));
        let first_baseten = request
            .header("x-baseten-signature")
            .unwrap()
            .split(',')
            .next();
        let only_new = ReceivedWebhook {
            headers: vec![("x-baseten-signature".into(), first_baseten.unwrap().into())],
            ..request.clone()
        };
        assert!(only_new.verifies_baseten(&new), "newest first");
    }
    // Past 24 h: the new one alone.
    assert_eq!(signatures(&requests[3]), (1, 1));
    assert!(requests[3].verifies(&new));
    assert!(!requests[3].verifies_standard(&old));
    assert!(!requests[3].verifies_baseten(&old));
}

/// C18: awkward payloads, 1,000 deliveries, a quarter of attempts answered 500: every
/// request verifies under both schemes over the raw body, and the receiver's dedupe
/// ends with each event once, its awkward fields intact.
#[tokio::test]
async fn c18_every_signature_verifies_over_the_raw_bytes() {
    let rig = Rig::new(Arc::new(SystemClock)).await;
    let mut endpoints = Vec::new();
    for _ in 0..10 {
        endpoints.push(rig.endpoint().await);
    }
    rig.sink.script((0..2000).map(|n| {
        if n % 4 == 1 {
            SinkReply::Status(500)
        } else {
            SinkReply::Status(200)
        }
    }));
    let worker = rig.worker(WorkerConfig {
        batch_interval: Duration::from_millis(1),
        // Long enough that no delivery is dead-lettered by bad luck in the interleaving.
        ..fast(&["10ms"; 20].join(","))
    });
    let metadata = r#"{"team": "Équipe 🚀 Δ", "big": 9007199254740993, "empty": "", "quote": "say \"hi\" \\ bye"}"#;
    for n in 0..100 {
        let mut event = rig.event(n);
        event.request_metadata = Some(metadata.to_owned());
        event.external_entity_id = r#"cust "7" \ back\slash"#.into();
        event.api_key_prefix = String::new();
        rig.store.insert_usage_event(&event).await.unwrap();
        // One event per batch: wait until every endpoint cut it.
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let mut cut = 0;
            for (id, _) in &endpoints {
                cut += rig.deliveries(id).await.len();
            }
            if cut == 10 * (n + 1) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "batches not cut");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let delivered = rig
        .sink
        .wait_until(Duration::from_secs(30), |requests| {
            requests.iter().filter(|r| r.is_accepted()).count() >= 1000
        })
        .await;
    worker.shutdown().await;
    let mut statuses = std::collections::BTreeMap::new();
    for (id, _) in &endpoints {
        for d in rig.deliveries(id).await {
            *statuses
                .entry(format!("{:?}/{}", d.status, d.attempts))
                .or_insert(0) += 1;
        }
    }
    assert!(
        delivered,
        "{} requests; deliveries by status/attempts: {statuses:?}",
        rig.sink.requests().len()
    );

    let requests = rig.sink.requests();
    assert!(requests.len() > 1000, "some attempts were retried");
    let mut deliveries = 0;
    for (id, secret) in &endpoints {
        let ids: Vec<String> = rig.deliveries(id).await.into_iter().map(|d| d.id).collect();
        deliveries += ids.len();
        for request in requests.iter().filter(|r| {
            ids.iter()
                .any(|id| Some(id.as_str()) == r.header("webhook-id"))
        }) {
            assert!(request.verifies_standard(secret), "standard signature");
            assert!(request.verifies_baseten(secret), "X-Baseten-Signature");
        }
    }
    assert_eq!(deliveries, 1000);
    let accepted = requests.iter().filter(|r| r.is_accepted()).count();
    assert_eq!(accepted, 1000);
    let body = String::from_utf8(requests[0].body.to_vec()).unwrap();
    assert!(body.contains(metadata), "metadata bytes as sent: {body}");
    assert!(body.contains(r#""externalEntityId":"cust \"7\" \\ back\\slash""#));
    assert!(body.contains(r#""apiKeyPrefix":"""#));
    let kept = rig.sink.accepted_events();
    assert_eq!(kept.events.len(), 100);
    assert!(kept.conflicts.is_empty());
    for event in kept.events.values() {
        assert_eq!(
            event["requestMetadata"]["big"].as_u64(),
            Some(9_007_199_254_740_993)
        );
        assert_eq!(event["requestMetadata"]["team"], "Équipe 🚀 Δ");
        assert_eq!(event["externalCustomerId"], r#"cust "7" \ back\slash"#);
    }
}

/// A receiver that accepts with 200 and then streams an endless answer. Returns its URL
/// and a channel that yields how many answer bytes it managed to write before the
/// worker closed the connection.
async fn endless_answer_receiver() -> (String, tokio::sync::oneshot::Receiver<u64>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/webhook", listener.local_addr().unwrap());
    let (written_tx, written_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        // Read the request head and its body (whatever arrives first is enough).
        let mut buffer = vec![0_u8; 64 * 1024];
        let _ = stream.read(&mut buffer).await;
        stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1099511627776\r\n\r\n")
            .await
            .unwrap();
        let chunk = vec![b'x'; 64 * 1024];
        let mut written: u64 = 0;
        while stream.write_all(&chunk).await.is_ok() {
            written += chunk.len() as u64;
        }
        let _ = written_tx.send(written);
    });
    (url, written_rx)
}

#[tokio::test]
async fn an_endless_answer_is_not_read_into_memory() {
    let rig = Rig::new(Arc::new(SystemClock)).await;
    let (url, written) = endless_answer_receiver().await;
    let created = create_webhook_endpoint(
        rig.store.as_ref(),
        &rig.sealer,
        &rig.workspace_id,
        &url,
        None,
        rig.clock.now(),
    )
    .await
    .unwrap();
    let worker = rig.worker(fast("10s"));
    rig.store_events(1).await;

    let deliveries = rig
        .wait_deliveries(&created.endpoint.id, |d| {
            d.first()
                .is_some_and(|d| d.status == DeliveryStatus::Delivered)
        })
        .await;
    assert_eq!(deliveries[0].status, DeliveryStatus::Delivered);
    assert_eq!(deliveries[0].last_http_status, Some(200));
    assert_eq!(deliveries[0].attempts, 1);
    // The worker reads at most 64 KiB of an answer, then closes the connection; what the
    // receiver wrote beyond that sits in the two socket buffers (about 4 MiB on Linux).
    let written = tokio::time::timeout(WAIT, written).await.unwrap().unwrap();
    assert!(
        written < 32 * 1024 * 1024,
        "the receiver wrote {written} bytes of its answer before the worker hung up"
    );
    worker.shutdown().await;
}
