//! Conformance cases for billing webhooks: endpoints and their cursor, secret rotation,
//! reading events after a cursor, the compare-and-set batch cut, leased claims, attempt
//! outcomes and manual retry. Run by `webhook_conformance_cases!(opener)` like
//! `conformance_cases!` (the runner includes `cases.rs` too).

use std::sync::Arc;

use tollgate_core::Timestamp;
use tollgate_store::{
    DeliveryStatus, NewWebhookDelivery, NewWebhookEndpoint, PageRequest, Store, UsageEvent,
    UsageStatus, WebhookAttempt,
};

macro_rules! webhook_conformance_cases {
    ($open:path) => {
        webhook_conformance_cases!(
            $open;
            webhook_endpoints_start_at_the_newest_event_and_are_soft_deleted,
            rotation_keeps_each_replaced_secret_until_its_own_expiry,
            usage_events_after_reads_one_workspace_in_storage_order,
            cutting_a_batch_is_a_compare_and_set_on_the_cursor,
            concurrent_cuts_from_one_cursor_cut_once,
            due_deliveries_are_leased_and_attempts_recorded,
        );
    };
    ($open:path; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                // The opener's result, as for `conformance_cases!` (`cases::Opened`).
                let Some((guard, store)) = cases::Opened::into_store($open().await) else {
                    return;
                };
                webhooks::$case(store).await;
                drop(guard);
            }
        )+
    };
}

const T0: Timestamp = Timestamp(1_796_320_404_123);

fn at(offset_ms: i64) -> Timestamp {
    Timestamp(T0.0 + offset_ms)
}

fn all() -> PageRequest {
    PageRequest {
        limit: 1000,
        after: None,
    }
}

fn event(key: &str, workspace: &str) -> UsageEvent {
    UsageEvent {
        idempotency_key: key.into(),
        timestamp: T0,
        request_id: format!("req-{key}"),
        request_metadata: None,
        model_slug: "acme/m".into(),
        external_entity_id: "cust-7".into(),
        api_key_prefix: "tg_0000000000001".into(),
        group_id: "grp_1".into(),
        workspace_id: workspace.into(),
        status: UsageStatus::Completed,
        input_tokens: 1,
        output_tokens: 2,
        cached_input_tokens: 0,
        is_estimated: false,
    }
}

async fn workspace(store: &Arc<dyn Store>, name: &str) -> String {
    store.create_workspace(name, T0).await.unwrap().id
}

async fn endpoint(store: &Arc<dyn Store>, workspace: &str, id: &str) -> i64 {
    store
        .insert_webhook_endpoint(NewWebhookEndpoint {
            id: id.into(),
            workspace_id: workspace.into(),
            url: format!("https://billing.example.com/{id}"),
            description: Some("billing".into()),
            secret_ciphertext: format!("sealed-{id}").into_bytes(),
            created_at: T0,
        })
        .await
        .unwrap()
        .cursor
}

fn delivery(id: &str, webhook: &str, first: i64, last: i64, due: Timestamp) -> NewWebhookDelivery {
    NewWebhookDelivery {
        id: id.into(),
        webhook_id: webhook.into(),
        body: format!("body of {id} \u{c9}quipe").into_bytes(),
        event_count: u32::try_from(last - first + 1).unwrap(),
        first_event_seq: first,
        last_event_seq: last,
        created_at: T0,
        next_attempt_at: due,
    }
}

async fn seqs(store: &Arc<dyn Store>, workspace: &str) -> Vec<i64> {
    store
        .usage_events_after(workspace, 0, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|(seq, _)| seq)
        .collect()
}

pub async fn webhook_endpoints_start_at_the_newest_event_and_are_soft_deleted(
    store: Arc<dyn Store>,
) {
    let ws = workspace(&store, "acme").await;
    let other = workspace(&store, "other").await;
    assert_eq!(endpoint(&store, &ws, "wh_empty").await, 0, "no events yet");
    store.insert_usage_event(&event("a", &ws)).await.unwrap();
    store.insert_usage_event(&event("b", &other)).await.unwrap();
    let newest = *seqs(&store, &other).await.last().unwrap();
    assert_eq!(
        endpoint(&store, &ws, "wh_1").await,
        newest,
        "any workspace's newest"
    );
    endpoint(&store, &other, "wh_other").await;

    let read = store.webhook_endpoint("wh_1").await.unwrap().unwrap();
    assert_eq!(read.workspace_id, ws);
    assert_eq!(read.url, "https://billing.example.com/wh_1");
    assert_eq!(read.description.as_deref(), Some("billing"));
    assert_eq!(read.created_at, T0);
    let first_page = store
        .list_webhook_endpoints(
            &ws,
            PageRequest {
                limit: 1,
                after: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(first_page.items[0].id, "wh_empty");
    let second_page = store
        .list_webhook_endpoints(
            &ws,
            PageRequest {
                limit: 1,
                after: first_page.next_after,
            },
        )
        .await
        .unwrap();
    assert_eq!(second_page.items[0].id, "wh_1");
    assert_eq!(second_page.next_after, None);

    let deleted = store.delete_webhook_endpoint("wh_1", at(5)).await.unwrap();
    assert_eq!(deleted.map(|e| e.id).as_deref(), Some("wh_1"));
    assert!(store
        .delete_webhook_endpoint("wh_1", at(6))
        .await
        .unwrap()
        .is_none());
    assert!(store.webhook_endpoint("wh_1").await.unwrap().is_none());
    let live: Vec<String> = store
        .all_webhook_endpoints()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(live, ["wh_empty", "wh_other"]);
    let listed = store.list_webhook_endpoints(&ws, all()).await.unwrap();
    assert_eq!(listed.items.len(), 1);
}

pub async fn rotation_keeps_each_replaced_secret_until_its_own_expiry(store: Arc<dyn Store>) {
    let ws = workspace(&store, "acme").await;
    endpoint(&store, &ws, "wh_1").await;
    let live = |at: Timestamp| {
        let store = store.clone();
        async move {
            store
                .webhook_secrets("wh_1", at)
                .await
                .unwrap()
                .into_iter()
                .map(|s| String::from_utf8(s.ciphertext).unwrap())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(live(T0).await, ["sealed-wh_1"]);
    let day = 86_400_000;
    let rotated = store
        .rotate_webhook_secret("wh_1", b"second".to_vec(), at(1000), at(1000 + day))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rotated.expires_at, None);
    assert_eq!(rotated.created_at, at(1000));
    assert_eq!(live(at(1000)).await, ["second", "sealed-wh_1"]);
    store
        .rotate_webhook_secret("wh_1", b"third".to_vec(), at(5000), at(5000 + day))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        live(at(999 + day)).await,
        ["third", "second", "sealed-wh_1"]
    );
    assert_eq!(live(at(1000 + day)).await, ["third", "second"]);
    assert_eq!(live(at(5000 + day)).await, ["third"]);
    assert!(store
        .rotate_webhook_secret("wh_nope", b"x".to_vec(), T0, T0)
        .await
        .unwrap()
        .is_none());
    store.delete_webhook_endpoint("wh_1", at(9)).await.unwrap();
    assert!(store
        .rotate_webhook_secret("wh_1", b"x".to_vec(), T0, T0)
        .await
        .unwrap()
        .is_none());
}

pub async fn usage_events_after_reads_one_workspace_in_storage_order(store: Arc<dyn Store>) {
    let ws = workspace(&store, "acme").await;
    let other = workspace(&store, "other").await;
    for (key, workspace) in [("a", &ws), ("x", &other), ("b", &ws), ("c", &ws)] {
        store
            .insert_usage_event(&event(key, workspace))
            .await
            .unwrap();
    }
    let read = store.usage_events_after(&ws, 0, 100).await.unwrap();
    let keys: Vec<&str> = read
        .iter()
        .map(|(_, e)| e.idempotency_key.as_str())
        .collect();
    assert_eq!(keys, ["a", "b", "c"]);
    assert!(read.windows(2).all(|w| w[0].0 < w[1].0));
    assert_eq!(read[0].1, event("a", &ws));
    let after_a = store.usage_events_after(&ws, read[0].0, 1).await.unwrap();
    assert_eq!(after_a.len(), 1);
    assert_eq!(after_a[0].1.idempotency_key, "b");
    assert!(store
        .usage_events_after(&ws, read[2].0, 100)
        .await
        .unwrap()
        .is_empty());
}

pub async fn cutting_a_batch_is_a_compare_and_set_on_the_cursor(store: Arc<dyn Store>) {
    let ws = workspace(&store, "acme").await;
    let cursor = endpoint(&store, &ws, "wh_1").await;
    for key in ["a", "b", "c"] {
        store.insert_usage_event(&event(key, &ws)).await.unwrap();
    }
    let s = seqs(&store, &ws).await;
    assert!(store
        .cut_webhook_batch(delivery("dlv_1", "wh_1", s[0], s[1], T0), cursor)
        .await
        .unwrap());
    assert_eq!(
        store
            .webhook_endpoint("wh_1")
            .await
            .unwrap()
            .unwrap()
            .cursor,
        s[1]
    );
    // From the old cursor again: refused, nothing written.
    assert!(!store
        .cut_webhook_batch(delivery("dlv_2", "wh_1", s[0], s[2], T0), cursor)
        .await
        .unwrap());
    assert!(store.webhook_delivery("dlv_2").await.unwrap().is_none());
    let stored = store.webhook_delivery("dlv_1").await.unwrap().unwrap();
    assert_eq!(stored.body, "body of dlv_1 Équipe".as_bytes());
    assert_eq!(
        (
            stored.event_count,
            stored.first_event_seq,
            stored.last_event_seq
        ),
        (2, s[0], s[1])
    );
    assert_eq!(stored.status, DeliveryStatus::Pending);
    assert_eq!((stored.attempts, stored.retry_step), (0, 0));
    assert_eq!(stored.next_attempt_at, Some(T0));
    assert_eq!(stored.last_attempt_at, None);
    assert_eq!(stored.lease_until, None);
    // A deleted endpoint cuts nothing.
    store.delete_webhook_endpoint("wh_1", at(1)).await.unwrap();
    assert!(!store
        .cut_webhook_batch(delivery("dlv_3", "wh_1", s[2], s[2], T0), s[1])
        .await
        .unwrap());
}

pub async fn concurrent_cuts_from_one_cursor_cut_once(store: Arc<dyn Store>) {
    let ws = workspace(&store, "acme").await;
    let cursor = endpoint(&store, &ws, "wh_1").await;
    store.insert_usage_event(&event("a", &ws)).await.unwrap();
    let seq = seqs(&store, &ws).await[0];
    let cuts = (0..8).map(|n| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .cut_webhook_batch(delivery(&format!("dlv_{n}"), "wh_1", seq, seq, T0), cursor)
                .await
                .unwrap()
        })
    });
    let won: Vec<bool> = futures_join(cuts).await;
    assert_eq!(won.iter().filter(|w| **w).count(), 1);
    let listed = store.list_webhook_deliveries("wh_1", all()).await.unwrap();
    assert_eq!(listed.items.len(), 1);
}

async fn futures_join<T: Send + 'static>(
    tasks: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    let mut out = Vec::new();
    for task in tasks.collect::<Vec<_>>() {
        out.push(task.await.unwrap());
    }
    out
}

pub async fn due_deliveries_are_leased_and_attempts_recorded(store: Arc<dyn Store>) {
    let ws = workspace(&store, "acme").await;
    endpoint(&store, &ws, "wh_1").await;
    endpoint(&store, &ws, "wh_gone").await;
    for key in ["a", "b", "c", "d"] {
        store.insert_usage_event(&event(key, &ws)).await.unwrap();
    }
    let s = seqs(&store, &ws).await;
    let cursor = store
        .webhook_endpoint("wh_1")
        .await
        .unwrap()
        .unwrap()
        .cursor;
    assert!(store
        .cut_webhook_batch(delivery("dlv_1", "wh_1", s[0], s[0], at(0)), cursor)
        .await
        .unwrap());
    assert!(store
        .cut_webhook_batch(delivery("dlv_2", "wh_1", s[1], s[1], at(10)), s[0])
        .await
        .unwrap());
    assert!(store
        .cut_webhook_batch(delivery("dlv_later", "wh_1", s[2], s[2], at(60_000)), s[1])
        .await
        .unwrap());
    assert!(store
        .cut_webhook_batch(delivery("dlv_gone", "wh_gone", s[0], s[3], at(0)), cursor)
        .await
        .unwrap());
    store
        .delete_webhook_endpoint("wh_gone", at(1))
        .await
        .unwrap();

    // Due now, live endpoint, oldest first; leased.
    let claimed = store
        .claim_due_webhook_deliveries(at(100), at(15_100), 10)
        .await
        .unwrap();
    let ids: Vec<&str> = claimed.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["dlv_1", "dlv_2"]);
    assert!(claimed.iter().all(|d| d.lease_until == Some(at(15_100))));
    assert!(store
        .claim_due_webhook_deliveries(at(200), at(15_200), 10)
        .await
        .unwrap()
        .is_empty());
    // The limit, and a lease that ran out.
    let again = store
        .claim_due_webhook_deliveries(at(15_100), at(30_100), 1)
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].id, "dlv_1");

    // A failed attempt: pending again, due later, one step further, lease dropped.
    let after_failure = store
        .record_webhook_attempt(
            "dlv_1",
            WebhookAttempt {
                at: at(15_200),
                http_status: Some(503),
                error: Some("HTTP 503".into()),
                status: DeliveryStatus::Pending,
                next_attempt_at: Some(at(20_200)),
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after_failure.status, DeliveryStatus::Pending);
    assert_eq!((after_failure.attempts, after_failure.retry_step), (1, 1));
    assert_eq!(after_failure.next_attempt_at, Some(at(20_200)));
    assert_eq!(after_failure.last_attempt_at, Some(at(15_200)));
    assert_eq!(after_failure.last_http_status, Some(503));
    assert_eq!(after_failure.last_error.as_deref(), Some("HTTP 503"));
    assert_eq!(after_failure.lease_until, None);
    assert!(store
        .claim_due_webhook_deliveries(at(20_199), at(40_000), 10)
        .await
        .unwrap()
        .iter()
        .all(|d| d.id != "dlv_1"));

    // Delivered: no next attempt, never claimed again.
    let delivered = store
        .record_webhook_attempt(
            "dlv_1",
            WebhookAttempt {
                at: at(20_300),
                http_status: Some(200),
                error: None,
                status: DeliveryStatus::Delivered,
                next_attempt_at: Some(at(99_999)),
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(delivered.status, DeliveryStatus::Delivered);
    assert_eq!((delivered.attempts, delivered.retry_step), (2, 1));
    assert_eq!(delivered.next_attempt_at, None);
    assert_eq!(delivered.last_error, None);

    // A released lease makes the delivery claimable at once.
    store.release_webhook_delivery("dlv_2").await.unwrap();
    let released = store
        .claim_due_webhook_deliveries(at(20_400), at(35_400), 10)
        .await
        .unwrap();
    let ids: Vec<&str> = released.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["dlv_2"]);

    // Manual retry: pending, due now, schedule restarted, attempts kept, bytes kept.
    let retried = store
        .retry_webhook_delivery("dlv_1", at(30_000))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(retried.status, DeliveryStatus::Pending);
    assert_eq!(retried.next_attempt_at, Some(at(30_000)));
    assert_eq!((retried.attempts, retried.retry_step), (2, 0));
    assert_eq!(retried.body, "body of dlv_1 Équipe".as_bytes());
    assert!(store
        .retry_webhook_delivery("dlv_nope", T0)
        .await
        .unwrap()
        .is_none());
    assert!(store
        .record_webhook_attempt(
            "dlv_nope",
            WebhookAttempt {
                at: T0,
                http_status: None,
                error: None,
                status: DeliveryStatus::Failed,
                next_attempt_at: None,
            },
        )
        .await
        .unwrap()
        .is_none());

    // Listing pages in the order the batches were cut.
    let first = store
        .list_webhook_deliveries(
            "wh_1",
            PageRequest {
                limit: 2,
                after: None,
            },
        )
        .await
        .unwrap();
    let ids: Vec<&str> = first.items.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["dlv_1", "dlv_2"]);
    let rest = store
        .list_webhook_deliveries(
            "wh_1",
            PageRequest {
                limit: 2,
                after: first.next_after,
            },
        )
        .await
        .unwrap();
    let ids: Vec<&str> = rest.items.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["dlv_later"]);
    assert_eq!(rest.next_after, None);
}
