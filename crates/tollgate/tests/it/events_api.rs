//! `GET /v1/gateway/events` (SPEC §3): the webhook's event shape, filters, the time
//! range's edges, cursor paging that stays exact while requests are served, workspace
//! isolation and refused queries.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};
use tollgate_core::clock::ManualClock;
use tollgate_core::Timestamp;

use crate::admin_misc::{expect_error, other_workspace, with_key};
use crate::chat::{all_events, Plane, EXTERNAL_ID, SLUG};
use crate::support::{ok_json, TestServer};

const EVENTS: &str = "/v1/gateway/events";
const ECHO: &str = "echo?prompt_tokens=10&completion_tokens=5";

fn t0() -> Timestamp {
    Timestamp::parse_rfc3339("2026-12-03T17:53:24.123Z").unwrap()
}

/// A chat call with `key`; returns the gateway's request id once the answer is read in
/// full (by then its event is stored).
async fn call(server: &TestServer, key: &str, metadata: Option<&str>) -> String {
    let mut request = server.chat(
        key,
        &json!({"model": SLUG, "messages": [{"role": "user", "content": "hi"}]}),
    );
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

async fn events(server: &TestServer, query: &str) -> Value {
    ok_json(
        server
            .get(&format!("{EVENTS}?{query}"))
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// The `requestId`s of a page, in order.
fn request_ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["requestId"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn events_have_the_webhook_shape_with_request_metadata() {
    let clock = Arc::new(ManualClock::new(t0()));
    let plane = Plane::on(TestServer::start_with_clock(clock.clone()).await, ECHO).await;
    let server = &plane.server;
    let first = call(
        server,
        &plane.key,
        Some(r#"{"run": "r-1", "team": "Équipe 🚀"}"#),
    )
    .await;
    clock.advance_millis(1_500);
    let second = call(server, &plane.key, None).await;

    let stored = all_events(server).await;
    assert_eq!(stored.len(), 2);
    let page = events(server, "").await;
    let expected = |request_id: &str, key: &str, at: i64, metadata: Value| {
        json!({
            "idempotencyKey": key,
            "timestamp": at,
            "requestId": request_id,
            "requestMetadata": metadata,
            "modelSlug": SLUG,
            "externalEntityId": EXTERNAL_ID,
            "externalCustomerId": EXTERNAL_ID,
            "apiKeyPrefix": &plane.key[..16],
            "groupId": plane.group_id,
            "status": "completed",
            "tokens": {"inputTokens": 10, "outputTokens": 5, "cachedInputTokens": 0},
        })
    };
    assert_eq!(
        page,
        json!({
            "items": [
                expected(&first, &stored[0].idempotency_key, t0().0, json!({"run": "r-1", "team": "Équipe 🚀"})),
                expected(&second, &stored[1].idempotency_key, t0().0 + 1_500, Value::Null),
            ],
            "pagination": {"has_more": false, "cursor": null},
        })
    );

    // A view key may read events.
    let view = ok_json(
        server
            .post(
                "/v1/gateway/management_keys",
                &json!({"name": "finance", "scope": "view"}),
            )
            .send()
            .await
            .unwrap(),
    )
    .await["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let read = ok_json(
        with_key(server, reqwest::Method::GET, EVENTS, &view)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(read, page);
}

/// Metadata reaches the caller byte for byte, as in a webhook body: an integer no 64-bit
/// number holds keeps every digit.
#[tokio::test]
async fn request_metadata_is_returned_exactly_as_sent() {
    let plane = Plane::start(ECHO).await;
    let metadata = r#"{"n": 123456789012345678901234567890, "q": "\"\\"}"#;
    call(&plane.server, &plane.key, Some(metadata)).await;
    let text = plane
        .server
        .get(EVENTS)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(&format!(r#""requestMetadata":{metadata},"#)),
        "{text}"
    );
}

#[tokio::test]
async fn filters_select_by_customer_and_by_key() {
    let plane = Plane::start(ECHO).await;
    let server = &plane.server;
    let other_group = server
        .group("cust-b", "INDEPENDENT", None, json!([{"slug": SLUG}]))
        .await;
    let a1 = plane.key.clone();
    let a2 = server.create_key(&plane.group_id).await;
    let b = server.create_key(&other_group).await;
    let mut ids = Vec::new();
    for key in [&a1, &b, &a2, &a1] {
        ids.push(call(server, key, None).await);
    }
    let cases = [
        (format!("external_entity_id={EXTERNAL_ID}"), vec![0, 2, 3]),
        ("external_entity_id=cust-b".to_owned(), vec![1]),
        ("external_entity_id=nobody".to_owned(), vec![]),
        (format!("api_key_prefix={}", &a1[..16]), vec![0, 3]),
        (format!("api_key_prefix={}", &a2[..16]), vec![2]),
        (
            format!("external_entity_id=cust-b&api_key_prefix={}", &b[..16]),
            vec![1],
        ),
        (
            format!("external_entity_id=cust-b&api_key_prefix={}", &a1[..16]),
            vec![],
        ),
        ("limit=2&external_entity_id=cust-42".to_owned(), vec![0, 2]),
    ];
    for (query, expected) in cases {
        let page = events(server, &query).await;
        let want: Vec<String> = expected.iter().map(|&i| ids[i].clone()).collect();
        assert_eq!(request_ids(&page), want, "{query}");
    }
    // The filtered walk continues with the filter on the next page.
    let first = events(server, "limit=2&external_entity_id=cust-42").await;
    let cursor = first["pagination"]["cursor"].as_str().unwrap();
    let rest = events(
        server,
        &format!("limit=2&external_entity_id=cust-42&cursor={cursor}"),
    )
    .await;
    assert_eq!(request_ids(&rest), vec![ids[3].clone()]);
    assert_eq!(
        rest["pagination"],
        json!({"has_more": false, "cursor": null})
    );
}

#[tokio::test]
async fn the_time_range_includes_its_start_and_excludes_its_end() {
    let clock = Arc::new(ManualClock::new(t0()));
    let plane = Plane::on(TestServer::start_with_clock(clock.clone()).await, ECHO).await;
    let server = &plane.server;
    let mut ids = Vec::new();
    for offset in [0, 1_000, 2_000] {
        clock.set(Timestamp(t0().0 + offset));
        ids.push(call(server, &plane.key, None).await);
    }
    let all = events(server, "").await;
    let stamps: Vec<i64> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["timestamp"].as_i64().unwrap())
        .collect();
    assert_eq!(stamps, vec![t0().0, t0().0 + 1_000, t0().0 + 2_000]);

    // t0 = 17:53:24.123Z; the events are at .123, 25.123 and 26.123.
    let cases = [
        ("start_time=2026-12-03T17:53:25.123Z", vec![1, 2]),
        ("end_time=2026-12-03T17:53:26.123Z", vec![0, 1]),
        (
            "start_time=2026-12-03T17:53:25.123Z&end_time=2026-12-03T17:53:26.123Z",
            vec![1],
        ),
        // Sub-millisecond bounds: exact, never rounded onto an event.
        ("start_time=2026-12-03T17:53:25.1230001Z", vec![2]),
        ("start_time=2026-12-03T17:53:25.1229999Z", vec![1, 2]),
        ("end_time=2026-12-03T17:53:26.1230001Z", vec![0, 1, 2]),
        ("end_time=2026-12-03T17:53:24.1229999Z", vec![]),
        // Any offset; a '+' must be percent-encoded in a query string.
        ("start_time=2026-12-04T02:53:25.123%2B09:00", vec![1, 2]),
        ("end_time=2026-12-03T12:53:25.123-05:00", vec![0]),
        ("start_time=2026-12-03T17:53:27Z", vec![]),
        (
            "start_time=2026-12-03T17:53:24.123Z&end_time=2026-12-03T17:53:24.124Z",
            vec![0],
        ),
    ];
    for (query, expected) in cases {
        let page = events(server, query).await;
        let want: Vec<String> = expected.iter().map(|&i| ids[i].clone()).collect();
        assert_eq!(request_ids(&page), want, "{query}");
    }
}

#[tokio::test]
async fn pages_walk_every_event_once_in_storage_order() {
    let plane = Plane::start(ECHO).await;
    let server = &plane.server;
    let mut ids = Vec::new();
    for _ in 0..7 {
        ids.push(call(server, &plane.key, None).await);
    }
    let mut walked = Vec::new();
    let mut sizes = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let query = match &cursor {
            Some(c) => format!("limit=3&cursor={c}"),
            None => "limit=3".to_owned(),
        };
        let page = events(server, &query).await;
        sizes.push(page["items"].as_array().unwrap().len());
        walked.extend(request_ids(&page));
        cursor = page["pagination"]["cursor"].as_str().map(str::to_owned);
        assert_eq!(page["pagination"]["has_more"], cursor.is_some());
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(sizes, vec![3, 3, 1]);
    assert_eq!(walked, ids);
    let exact = events(server, "limit=7").await;
    assert_eq!(
        exact["pagination"],
        json!({"has_more": false, "cursor": null})
    );
    let empty = events(server, "external_entity_id=nobody").await;
    assert_eq!(
        empty,
        json!({"items": [], "pagination": {"has_more": false, "cursor": null}})
    );
}

/// The order is the store's commit order, so a walk while requests are being served
/// reads a prefix of the final order: no duplicate, no gap, whatever commits meanwhile.
#[tokio::test]
async fn paging_is_stable_while_requests_are_served() {
    let plane = Arc::new(Plane::start(ECHO).await);
    for _ in 0..20 {
        call(&plane.server, &plane.key, None).await;
    }
    let before: Vec<String> = all_events(&plane.server)
        .await
        .into_iter()
        .map(|e| e.idempotency_key)
        .collect();

    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for _ in 0..4 {
        let (plane, stop, served) = (plane.clone(), stop.clone(), served.clone());
        writers.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                call(&plane.server, &plane.key, None).await;
                served.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    let mut walked: Vec<String> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let query = match &cursor {
            Some(c) => format!("limit=3&cursor={c}"),
            None => "limit=3".to_owned(),
        };
        let page = events(&plane.server, &query).await;
        pages += 1;
        walked.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["idempotencyKey"].as_str().unwrap().to_owned()),
        );
        cursor = page["pagination"]["cursor"].as_str().map(str::to_owned);
        // Stop once the walk has passed the events made before it and a few pages more.
        if cursor.is_none() || (walked.len() > before.len() && pages > 12) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for writer in writers {
        writer.await.unwrap();
    }
    assert!(served.load(Ordering::SeqCst) > 0);
    let after: Vec<String> = all_events(&plane.server)
        .await
        .into_iter()
        .map(|e| e.idempotency_key)
        .collect();
    let unique: HashSet<&String> = walked.iter().collect();
    assert_eq!(unique.len(), walked.len(), "a duplicate across pages");
    // The walk read events committed while it ran, after the earlier ones.
    assert!(walked.len() > before.len());
    assert_eq!(&walked[..before.len()], before.as_slice());
    assert_eq!(walked.as_slice(), &after[..walked.len()]);
}

#[tokio::test]
async fn another_workspaces_events_are_invisible() {
    let plane = Plane::start(ECHO).await;
    let server = &plane.server;
    let mine = call(server, &plane.key, None).await;

    // Workspace `acme` serves its own customer through its own endpoint.
    let acme = other_workspace(server, "acme").await;
    let admin = |method, path: &str| with_key(server, method, path, &acme);
    ok_json(
        admin(reqwest::Method::POST, "/v1/gateway/endpoints")
            .json(&json!({
                "slug": "acme-co/m",
                "targets": [{"provider": "OPENAI_COMPATIBLE", "base_url": server.mock.base_url(),
                             "target_model": ECHO, "secret_id": null}],
            }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let group = ok_json(
        admin(reqwest::Method::POST, "/v1/gateway/groups")
            .json(&json!({
                "metadata": {"external_entity_id": EXTERNAL_ID},
                "models": [{"slug": "acme-co/m"}],
                "hierarchy": {"limit_enforcement": "INDEPENDENT", "parent_group_id": null},
            }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let key = ok_json(
        admin(
            reqwest::Method::POST,
            &format!(
                "/v1/gateway/groups/{}/api_keys",
                group["id"].as_str().unwrap()
            ),
        )
        .json(&json!({"name": null}))
        .send()
        .await
        .unwrap(),
    )
    .await["api_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let response = server
        .chat(&key, &json!({"model": "acme-co/m", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let theirs = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    response.bytes().await.unwrap();

    // The same external id in both workspaces: each sees only its own event.
    let page = events(server, &format!("external_entity_id={EXTERNAL_ID}")).await;
    assert_eq!(request_ids(&page), vec![mine.clone()]);
    let page = events(server, &format!("api_key_prefix={}", &key[..16])).await;
    assert_eq!(request_ids(&page), Vec::<String>::new());
    let their_page = ok_json(admin(reqwest::Method::GET, EVENTS).send().await.unwrap()).await;
    assert_eq!(request_ids(&their_page), vec![theirs]);
    assert_eq!(their_page["items"][0]["modelSlug"], "acme-co/m");

    // A cursor carries no workspace: used by `acme` it still shows only acme's events.
    call(server, &plane.key, None).await;
    let first = events(server, "limit=1").await;
    let cursor = first["pagination"]["cursor"].as_str().unwrap();
    let through = ok_json(
        admin(reqwest::Method::GET, &format!("{EVENTS}?cursor={cursor}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(through["items"].as_array().unwrap().len(), 1);
    assert_eq!(through["items"][0]["modelSlug"], "acme-co/m");
}

#[tokio::test]
async fn malformed_queries_are_400_naming_the_parameter() {
    let server = TestServer::start().await;
    let groups_cursor = {
        // Another list's cursor (two groups, one per page).
        server.create_endpoint(SLUG, ECHO).await;
        for ext in ["g1", "g2"] {
            server
                .group(ext, "INDEPENDENT", None, json!([{"slug": SLUG}]))
                .await;
        }
        let page = ok_json(
            server
                .get("/v1/gateway/groups?limit=1")
                .send()
                .await
                .unwrap(),
        )
        .await;
        page["pagination"]["cursor"].as_str().unwrap().to_owned()
    };
    let time_message = |name: &str| {
        format!(
            "{name}: must be an RFC 3339 time such as 2026-12-03T17:53:24Z \
             (send a '+' offset as %2B)"
        )
    };
    let cases = [
        (
            "start_time=yesterday".to_owned(),
            "invalid_query",
            time_message("start_time"),
        ),
        (
            "start_time=".to_owned(),
            "invalid_query",
            time_message("start_time"),
        ),
        (
            "end_time=2026-12-03".to_owned(),
            "invalid_query",
            time_message("end_time"),
        ),
        (
            "end_time=1796320404123".to_owned(),
            "invalid_query",
            time_message("end_time"),
        ),
        // An unencoded '+' arrives as a space.
        (
            "end_time=2026-12-04T02:53:24+09:00".to_owned(),
            "invalid_query",
            time_message("end_time"),
        ),
        (
            "start_time=2026-12-03T17:53:24Z&end_time=2026-12-03T17:53:24Z".to_owned(),
            "invalid_query",
            "end_time: must be after start_time".to_owned(),
        ),
        (
            "start_time=2026-12-03T17:53:25Z&end_time=2026-12-03T17:53:24Z".to_owned(),
            "invalid_query",
            "end_time: must be after start_time".to_owned(),
        ),
        (
            "since=2026-12-03T17:53:24Z".to_owned(),
            "invalid_query",
            "since: unknown query parameter (accepted: limit, cursor, start_time, end_time, \
             external_entity_id, api_key_prefix)"
                .to_owned(),
        ),
        (
            "start_time=2026-12-03T17:53:24Z&start_time=2026-12-03T17:53:25Z".to_owned(),
            "invalid_query",
            "start_time: query parameter given more than once".to_owned(),
        ),
        (
            "limit=0".to_owned(),
            "invalid_query",
            "limit: must be an integer in 1..=1000".to_owned(),
        ),
        (
            "limit=1001".to_owned(),
            "invalid_query",
            "limit: must be an integer in 1..=1000".to_owned(),
        ),
        (
            "cursor=garbage!".to_owned(),
            "invalid_cursor",
            "cursor: malformed cursor".to_owned(),
        ),
        (
            format!("cursor={groups_cursor}"),
            "invalid_cursor",
            "cursor: belongs to another list".to_owned(),
        ),
    ];
    for (query, code, message) in &cases {
        expect_error(
            server
                .get(&format!("{EVENTS}?{query}"))
                .send()
                .await
                .unwrap(),
            400,
            code,
            message,
        )
        .await;
    }
    // The largest page is fine.
    let page = events(&server, "limit=1000").await;
    assert_eq!(page["items"], json!([]));
}
