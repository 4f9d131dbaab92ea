//! Billing webhooks with several `tollgate serve` processes on one PostgreSQL database
//! (SPEC §4): every batch is cut once and sent by one instance at a time (deliveries are
//! claimed with `FOR UPDATE SKIP LOCKED` under a lease), and a batch whose sender dies
//! mid-attempt is sent again by another instance, same id and bytes, once the lease
//! (attempt timeout 10 s + 5 s) has run out.
//!
//! Same switches as `multi_instance.rs`: unset back-ends print a skip line and return.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tollgate_testkit::{MockUpstream, ReceivedWebhook, SinkReply, WebhookSink};

use crate::multi_instance::{on_m, Instance, Shared, ADMIN_KEY};
use crate::support::ok_json;

const HOOKS: &str = "/v1/gateway/webhook_endpoints";
/// Short batches, so the instances race to cut and claim many of them.
const FAST_BATCHES: [(&str, &str); 1] = [("TOLLGATE_WEBHOOK_BATCH_INTERVAL", "100ms")];
/// The lease is 15 s; a redelivery after a crash comes well within this.
const WAIT: Duration = Duration::from_secs(45);

/// Endpoint `acme/m` on a fresh mock, a group with a key, and a webhook endpoint on
/// `sink`: `(mock, key, webhook id, webhook secret)`.
async fn customer_and_hook(
    instance: &Instance,
    sink: &WebhookSink,
) -> (MockUpstream, String, String, String) {
    let mock = MockUpstream::start().await.unwrap();
    instance
        .create_endpoint(&mock, "echo?prompt_tokens=3&completion_tokens=2")
        .await;
    let (_group, key) = instance.member("cust-wh", None, on_m(&[])).await;
    let hook = instance
        .admin_post(HOOKS, json!({"url": sink.url(), "description": "billing"}))
        .await;
    let id = hook["id"].as_str().unwrap().to_owned();
    let secret = hook["secret"].as_str().unwrap().to_owned();
    (mock, key, id, secret)
}

/// One chat call that must answer 200; returns its `x-request-id`.
async fn served(instance: &Instance, key: &str) -> String {
    let answer = instance.chat_response(key).await;
    let status = answer.status();
    let id = answer
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = answer.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
    id.unwrap()
}

/// The endpoint's deliveries as the management API lists them.
async fn deliveries(instance: &Instance, hook: &str) -> Vec<Value> {
    let answer = instance
        .http
        .get(instance.url(&format!("{HOOKS}/{hook}/deliveries?limit=1000")))
        .header("Authorization", format!("Api-Key {ADMIN_KEY}"))
        .send()
        .await
        .unwrap();
    ok_json(answer).await["items"].as_array().unwrap().clone()
}

/// Waits until the deliveries satisfy `done`; fails after [`WAIT`].
async fn wait_deliveries(
    instance: &Instance,
    hook: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let listed = deliveries(instance, hook).await;
        if done(&listed) {
            return listed;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "deliveries never got there: {listed:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn webhook_id(request: &ReceivedWebhook) -> String {
    request.header("webhook-id").unwrap().to_owned()
}

fn request_ids(request: &ReceivedWebhook) -> Vec<String> {
    request
        .events()
        .iter()
        .map(|e| e["requestId"].as_str().unwrap().to_owned())
        .collect()
}

/// 240 requests spread over three instances, each cutting and claiming batches every
/// 25 ms: every event is in exactly one batch, every batch is sent exactly once (the
/// sink answers 200 to all), and the sink's batches are exactly the stored deliveries.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_deliver_every_event_in_exactly_one_batch_sent_once() {
    const REQUESTS: usize = 240;
    let Some(shared) =
        Shared::create("three_instances_deliver_every_event_in_exactly_one_batch_sent_once").await
    else {
        return;
    };
    // One after the other: the first start creates the tables and the default workspace.
    let mut instances = Vec::new();
    for _ in 0..3 {
        instances.push(Instance::start_with(&shared, &FAST_BATCHES).await);
    }
    let sink = WebhookSink::start().await.unwrap();
    let (_mock, key, hook, secret) = customer_and_hook(&instances[0], &sink).await;

    let instances = Arc::new(instances);
    let mut tasks = Vec::new();
    for worker in 0..24 {
        let (instances, key) = (instances.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in 0..REQUESTS / 24 {
                ids.push(served(&instances[(worker + n) % 3], &key).await);
            }
            ids
        }));
    }
    let mut sent = Vec::new();
    for task in tasks {
        sent.extend(task.await.unwrap());
    }
    assert_eq!(sent.len(), REQUESTS);

    let listed = wait_deliveries(&instances[1], &hook, |d| {
        d.iter().all(|d| d["status"] == "delivered")
            && d.iter()
                .map(|d| d["event_count"].as_u64().unwrap())
                .sum::<u64>()
                == REQUESTS as u64
    })
    .await;
    // Every delivery is recorded; a second sender of one of them would have sent by now
    // (attempts take milliseconds here), so the sink's list is final.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let requests = sink.requests();

    // Each batch exactly once, accepted, signed both ways, one identity in both headers.
    assert_eq!(requests.len(), listed.len(), "one request per batch");
    let received: BTreeSet<String> = requests.iter().map(webhook_id).collect();
    assert_eq!(received.len(), requests.len(), "no batch id twice");
    let stored: BTreeMap<String, u64> = listed
        .iter()
        .map(|d| {
            assert_eq!(d["attempts"], 1, "{d}");
            (
                d["id"].as_str().unwrap().to_owned(),
                d["event_count"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(received, stored.keys().cloned().collect::<BTreeSet<_>>());
    for request in &requests {
        assert!(request.is_accepted());
        assert!(request.verifies_standard(&secret), "Standard Webhooks");
        assert!(request.verifies_baseten(&secret), "X-Baseten-Signature");
        let id = webhook_id(request);
        assert_eq!(request.header("x-baseten-request-id"), Some(id.as_str()));
        let events = request.events().len() as u64;
        assert!((1..=100).contains(&events), "{events}");
        assert_eq!(stored[&id], events, "the stored count of {id}");
    }

    // Each served request's event in exactly one batch.
    let mut delivered: Vec<String> = requests.iter().flat_map(request_ids).collect();
    assert_eq!(delivered.len(), REQUESTS, "no event in two batches");
    delivered.sort();
    sent.sort();
    assert_eq!(delivered, sent);

    // No instance failed to cut, claim or record anything on the way.
    for instance in instances.iter() {
        let complaints: Vec<String> = instance
            .stderr_text()
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .map(str::to_owned)
            .collect();
        assert!(complaints.is_empty(), "{complaints:#?}");
    }

    drop(instances);
    shared.drop_schema().await;
}

/// The instance sending a batch is SIGKILLed while the receiver still holds the request
/// open. Another instance, already running, leaves the batch alone while the lease
/// lasts, then sends it: the same delivery id and the same body bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_sender_dies_is_sent_again_by_another_instance_with_its_identity() {
    let Some(shared) = Shared::create(
        "a_batch_whose_sender_dies_is_sent_again_by_another_instance_with_its_identity",
    )
    .await
    else {
        return;
    };
    // Alone at first, so the first attempt is certainly this instance's.
    let mut holder = Instance::start_with(&shared, &FAST_BATCHES).await;
    let sink = WebhookSink::start().await.unwrap();
    let (_mock, key, hook, secret) = customer_and_hook(&holder, &sink).await;
    // The first request is held open long past the end of the test; the rest get 200.
    sink.script([SinkReply::Sleep(Duration::from_secs(300))]);
    let mut sent = Vec::new();
    for _ in 0..3 {
        sent.push(served(&holder, &key).await);
    }
    assert!(sink.wait_for_requests(1, WAIT).await);

    let other = Instance::start_with(&shared, &FAST_BATCHES).await;
    holder.kill().await;
    assert_eq!(holder.pid(), None);
    assert!(
        sink.wait_until(WAIT, |r| r.iter().any(|r| r.is_accepted()))
            .await
    );
    let listed = wait_deliveries(&other, &hook, |d| {
        d.first().is_some_and(|d| d["status"] == "delivered")
    })
    .await;

    let requests = sink.requests();
    assert_eq!(requests.len(), 2, "the held attempt and one resend");
    let (held, resent) = (&requests[0], &requests[1]);
    assert!(!held.is_accepted() && resent.is_accepted());
    assert_eq!(webhook_id(held), webhook_id(resent));
    assert!(webhook_id(held).starts_with("dlv_"));
    assert_eq!(held.body, resent.body, "byte-identical body");
    for request in [held, resent] {
        assert!(request.verifies_standard(&secret) && request.verifies_baseten(&secret));
    }
    let mut delivered = request_ids(resent);
    delivered.sort();
    sent.sort();
    assert_eq!(delivered, sent);
    // The resend waited for the lease: 15 s from the claim, which came just before the
    // held request arrived.
    let gap = resent.received_at - held.received_at;
    assert!(gap >= Duration::from_secs(14), "{gap:?}");

    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], webhook_id(held));
    assert_eq!(listed[0]["event_count"], 3);
    // The killed attempt never got to record itself.
    assert_eq!(listed[0]["attempts"], 1);

    drop(other);
    shared.drop_schema().await;
}
