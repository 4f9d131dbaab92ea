//! Limits enforced on the data plane end to end (SPEC §1.3, §2; CASES C01–C03, C05, C07,
//! C09, C11, C13–C15, C20): a real server, the real limiter, the mock upstream.
//!
//! Rolling-window cases run on a server whose clock is a `ManualClock`, so a minute is
//! exact and nothing sleeps; DAY cases read the counters through the usage API.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use reqwest::header::HeaderMap;
use serde_json::{json, Value};
use tollgate_core::clock::ManualClock;
use tollgate_core::Timestamp;
use tollgate_store::UsageStatus;

use crate::chat::{all_events, events_of, sse_data, wait_for_event};
use crate::support::{ok_json, TestServer};

const M: &str = "acme/m";

/// Limits on [`M`] in the API's shape, `(type, unit, threshold)`: DAY entries are usage
/// limits, the others rate limits.
fn on_m(limits: &[(&str, &str, u64)]) -> Value {
    let entry = |(kind, unit, threshold): &(&str, &str, u64)| json!({"type": kind, "unit": unit, "threshold": threshold});
    let rate: Vec<Value> = limits.iter().filter(|l| l.1 != "DAY").map(entry).collect();
    let usage: Vec<Value> = limits.iter().filter(|l| l.1 == "DAY").map(entry).collect();
    json!([{"slug": M, "rate_limits": rate, "usage_limits": usage}])
}

/// A server on the system clock with endpoint [`M`] on the mock scripted by
/// `target_model`.
async fn gateway(target_model: &str) -> TestServer {
    let server = TestServer::start().await;
    server.create_endpoint(M, target_model).await;
    server
}

fn utc(text: &str) -> Timestamp {
    Timestamp::parse_rfc3339(text).unwrap()
}

/// A server whose clock stands at `at` until the test moves it.
async fn gateway_at(target_model: &str, at: &str) -> (TestServer, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(utc(at)));
    let server = TestServer::start_with_clock(clock.clone()).await;
    server.create_endpoint(M, target_model).await;
    (server, clock)
}

/// A group (and a key of it) with `models`; `parent` sets the tree.
async fn member(
    server: &TestServer,
    ext: &str,
    mode: &str,
    parent: Option<&str>,
    models: Value,
) -> (String, String) {
    let id = server.group(ext, mode, parent, models).await;
    let key = server.create_key(&id).await;
    (id, key)
}

fn chat_body(stream: bool) -> Value {
    json!({
        "model": M,
        "messages": [{"role": "user", "content": "hello there world"}],
        "stream": stream,
    })
}

/// Request bytes / 4 (at least 1): the tokens reserved at admission.
fn estimate(body: &Value) -> u64 {
    (serde_json::to_vec(body).unwrap().len() as u64 / 4).max(1)
}

/// A whole answer: status, headers, body text (a stream read to its end).
struct Answer {
    status: u16,
    headers: HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    fn request_id(&self) -> String {
        self.header("x-request-id").unwrap().to_owned()
    }

    /// The `error.code` of a refusal.
    fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    fn message(&self) -> String {
        self.json()["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    /// `(limit, remaining, reset)` of one type's `x-ratelimit-*` headers.
    fn rate(&self, kind: &str) -> Option<(u64, u64, String)> {
        let limit = self.header(&format!("x-ratelimit-limit-{kind}"))?;
        let remaining = self.header(&format!("x-ratelimit-remaining-{kind}"))?;
        let reset = self.header(&format!("x-ratelimit-reset-{kind}"))?;
        Some((
            limit.parse().unwrap(),
            remaining.parse().unwrap(),
            reset.to_owned(),
        ))
    }
}

async fn call(server: &TestServer, key: &str, path: &str, body: &Value) -> Answer {
    let response = server
        .http
        .post(server.url(path))
        .bearer_auth(key)
        .json(body)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    Answer {
        status,
        headers,
        text,
    }
}

async fn chat(server: &TestServer, key: &str, stream: bool) -> Answer {
    call(server, key, "/v1/chat/completions", &chat_body(stream)).await
}

/// `current_usage` of the usage API entry of `group` for (`kind`, DAY) declared by
/// `source`.
async fn day_usage(server: &TestServer, group: &str, kind: &str, source: &str) -> Option<u64> {
    let report = ok_json(
        server
            .get(&format!("/v1/gateway/groups/{group}/usage"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let entries = report["usage"][M].as_array().unwrap();
    let entry = entries
        .iter()
        .find(|e| e["type"] == kind && e["source_group"] == source)
        .unwrap_or_else(|| panic!("no {kind}/DAY entry from {source}: {report}"));
    entry["current_usage"].as_u64()
}

async fn patch_group(server: &TestServer, group: &str, body: Value) {
    ok_json(
        server
            .patch(&format!("/v1/gateway/groups/{group}"), &body)
            .send()
            .await
            .unwrap(),
    )
    .await;
}

fn statuses(answers: &[Answer]) -> Vec<u16> {
    answers.iter().map(|a| a.status).collect()
}

// --- tokens: C01, C02, C03 ---------------------------------------------------------------

#[tokio::test]
async fn c01_streamed_and_complete_calls_feed_a_token_limit_identically() {
    // The clock stands still: TOKEN/MINUTE 100 is exact without real-time waits. The
    // TOKEN/DAY counter beside it shows the count through the usage API.
    let (server, _clock) = gateway_at(
        "echo?prompt_tokens=10&completion_tokens=50",
        "2026-12-03T12:00:00Z",
    )
    .await;
    for stream in [true, false] {
        let (group, key) = member(
            &server,
            &format!("c01-{stream}"),
            "CASCADING",
            None,
            on_m(&[("TOKEN", "MINUTE", 100), ("TOKEN", "DAY", 1000)]),
        )
        .await;
        let mut answers = Vec::new();
        for _ in 0..3 {
            answers.push(chat(&server, &key, stream).await);
        }
        assert_eq!(statuses(&answers), [200, 200, 429], "stream={stream}");
        if stream {
            assert!(answers[1].text.ends_with("data: [DONE]\n\n"));
        }
        let refused = &answers[2];
        assert_eq!(refused.code(), "rate_limit_exceeded");
        assert!(
            refused.message().contains(&format!(
                "TOKEN/MINUTE 100 of group {group} (external id c01-{stream})"
            )),
            "{}",
            refused.message()
        );
        assert_eq!(day_usage(&server, &group, "TOKEN", &group).await, Some(120));
        for answer in &answers[..2] {
            let event = events_of(&server, &answer.request_id())
                .await
                .pop()
                .unwrap();
            assert_eq!((event.input_tokens, event.output_tokens), (10, 50));
        }
    }
}

#[tokio::test]
async fn c02_a_stream_without_include_usage_is_metered_and_limited() {
    let server = gateway("echo?prompt_tokens=10&completion_tokens=50").await;
    let (group, key) = member(
        &server,
        "c02",
        "CASCADING",
        None,
        on_m(&[("TOKEN", "DAY", 100)]),
    )
    .await;
    let first = chat(&server, &key, true).await;
    assert_eq!(first.status, 200);
    let sent = server.mock.requests().pop().unwrap();
    assert_eq!(sent.body["stream_options"], json!({"include_usage": true}));
    assert!(!first.text.contains("\"choices\":[]"), "{}", first.text);
    assert_eq!(day_usage(&server, &group, "TOKEN", &group).await, Some(60));
    let second = chat(&server, &key, true).await;
    assert_eq!(second.status, 200);
    assert_eq!(day_usage(&server, &group, "TOKEN", &group).await, Some(120));
    let third = chat(&server, &key, true).await;
    assert_eq!(third.status, 429);
    assert_eq!(third.code(), "usage_limit_exceeded");
    let events = all_events(&server).await;
    assert_eq!(events.len(), 2);
    for event in &events {
        assert_eq!((event.input_tokens, event.output_tokens), (10, 50));
        assert!(!event.is_estimated);
    }

    // A client that asks for usage gets exactly one usage chunk, right before [DONE].
    let (_, key) = member(
        &server,
        "c02-asks",
        "CASCADING",
        None,
        on_m(&[("TOKEN", "DAY", 100)]),
    )
    .await;
    let mut body = chat_body(true);
    body["stream_options"] = json!({"include_usage": true});
    let asked = call(&server, &key, "/v1/chat/completions", &body).await;
    let data = sse_data(&asked.text);
    let usage_chunks: Vec<usize> = data
        .iter()
        .enumerate()
        .filter(|(_, d)| d.contains("\"choices\":[]"))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(usage_chunks, [data.len() - 2], "{}", asked.text);
    assert_eq!(data.last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn c03_a_client_leaving_mid_stream_settles_the_day_counter_with_the_billed_tokens() {
    let server =
        gateway("echo?prompt_tokens=10&completion_tokens=50&interval_ms=20&usage_on=every").await;
    let (group, key) = member(
        &server,
        "cust-42",
        "CASCADING",
        None,
        on_m(&[("TOKEN", "DAY", 1000)]),
    )
    .await;
    let mut body = chat_body(true);
    body["stream_options"] = json!({"include_usage": true});
    let response = server
        .http
        .post(server.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let mut stream = response.bytes_stream();
    let mut text = String::new();
    while sse_data(&text)
        .iter()
        .filter(|d| d.contains("\"content\":\"") && !d.contains("\"content\":\"\""))
        .count()
        < 5
    {
        text.push_str(&String::from_utf8_lossy(
            &stream.next().await.unwrap().unwrap(),
        ));
    }
    drop(stream);

    let event = wait_for_event(&server, &id).await;
    assert_eq!(event.status, UsageStatus::ClientCancelled);
    assert_eq!(event.external_entity_id, "cust-42");
    assert_eq!(event.input_tokens, 10);
    assert!((5..50).contains(&event.output_tokens), "{event:?}");
    let total = event.input_tokens + event.output_tokens;
    assert_eq!(
        day_usage(&server, &group, "TOKEN", &group).await,
        Some(total)
    );
    assert!(
        server
            .mock
            .wait_for_disconnects(1, Duration::from_secs(5))
            .await,
        "the gateway closes the upstream"
    );
    // The limiter settled the reservation to the same total: the next admission sees
    // exactly `total` used before its own estimate. (The settlement runs right after the
    // event is written, on the same background task.)
    tokio::time::sleep(Duration::from_millis(200)).await;
    let next = chat(&server, &key, false).await;
    assert_eq!(next.status, 200);
    let (limit, remaining, _) = next.rate("tokens").unwrap();
    assert_eq!(limit, 1000);
    assert_eq!(remaining, 1000 - total - estimate(&chat_body(false)));
}

// --- requests: C05 -------------------------------------------------------------------------

/// `count` requests released together by a barrier; their statuses.
async fn burst(server: &TestServer, key: &str, count: usize) -> Vec<u16> {
    let barrier = Arc::new(tokio::sync::Barrier::new(count));
    let mut tasks = Vec::new();
    for _ in 0..count {
        let (barrier, http) = (barrier.clone(), server.http.clone());
        let (url, key) = (server.url("/v1/chat/completions"), key.to_owned());
        tasks.push(tokio::spawn(async move {
            let request = http.post(url).bearer_auth(key).json(&chat_body(false));
            barrier.wait().await;
            request.send().await.unwrap().status().as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    statuses
}

#[tokio::test]
async fn c05_concurrent_requests_never_overrun_a_request_limit() {
    let server = gateway("echo?latency_ms=500&prompt_tokens=10&completion_tokens=5").await;
    let (group, key) = member(
        &server,
        "c05",
        "CASCADING",
        None,
        on_m(&[("REQUEST", "DAY", 5)]),
    )
    .await;
    let statuses = burst(&server, &key, 20).await;
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 5);
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 15);
    assert_eq!(day_usage(&server, &group, "REQUEST", &group).await, Some(5));
    let events = all_events(&server).await;
    assert_eq!(events.iter().filter(|e| e.group_id == group).count(), 5);

    // A group created a moment before: its day starts under the same race.
    let (fresh, key) = member(
        &server,
        "c05-fresh",
        "CASCADING",
        None,
        on_m(&[("REQUEST", "DAY", 1)]),
    )
    .await;
    let statuses = burst(&server, &key, 8).await;
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 1);
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 7);
    assert_eq!(day_usage(&server, &fresh, "REQUEST", &fresh).await, Some(1));
}

// --- the tree: C07, the worked example, live changes ---------------------------------------

#[tokio::test]
async fn c07_an_ancestors_limit_holds_at_depth_five_and_names_the_ancestor() {
    let server = gateway("echo?prompt_tokens=10&completion_tokens=20").await;
    // Keys at D (depth 5), at A, and at O itself: the same pool, the same answers.
    for (run, key_at) in [(0, 4), (1, 1), (2, 0)] {
        let mut chain: Vec<String> = Vec::new();
        for (depth, name) in ["o", "a", "b", "c", "d"].iter().enumerate() {
            let models = if depth == 0 {
                on_m(&[("TOKEN", "DAY", 100)])
            } else {
                json!([{"slug": M}])
            };
            let parent = chain.last().map(String::as_str);
            let id = server
                .group(&format!("c07-{run}-{name}"), "CASCADING", parent, models)
                .await;
            chain.push(id);
        }
        let o = &chain[0];
        let key = server.create_key(&chain[key_at]).await;
        for before in [None, Some(30), Some(60), Some(90)] {
            assert_eq!(day_usage(&server, o, "TOKEN", o).await, before);
            assert_eq!(chat(&server, &key, false).await.status, 200);
        }
        let refused = chat(&server, &key, false).await;
        assert_eq!(refused.status, 429);
        assert_eq!(refused.code(), "usage_limit_exceeded");
        assert!(
            refused.message().contains(&format!(
                "TOKEN/DAY 100 of group {o} (external id c07-{run}-o)"
            )),
            "{}",
            refused.message()
        );
        assert_eq!(day_usage(&server, o, "TOKEN", o).await, Some(120));
        // The caller's own usage report shows O's pool.
        assert_eq!(
            day_usage(&server, &chain[key_at], "TOKEN", o).await,
            Some(120)
        );
    }
}

/// SPEC §1.3's tree on TOKEN/DAY (DAY instead of MINUTE so no window moves during the
/// test): O 100 › F 70, E 70; each call is 10 tokens.
async fn worked_example_tree(server: &TestServer, mode: &str) -> [(String, String); 3] {
    let (o, ko) = member(server, "o", mode, None, on_m(&[("TOKEN", "DAY", 100)])).await;
    let (f, kf) = member(server, "f", mode, Some(&o), on_m(&[("TOKEN", "DAY", 70)])).await;
    let (e, ke) = member(server, "e", mode, Some(&o), on_m(&[("TOKEN", "DAY", 70)])).await;
    [(o, ko), (f, kf), (e, ke)]
}

/// Calls until the first refusal (at most `max`); the number admitted and the refusal.
async fn admitted_until_refused(server: &TestServer, key: &str, max: usize) -> (usize, Answer) {
    for admitted in 0..max {
        let answer = chat(server, key, false).await;
        if answer.status != 200 {
            assert_eq!(answer.status, 429, "{}", answer.text);
            return (admitted, answer);
        }
    }
    panic!("never refused in {max} calls");
}

#[tokio::test]
async fn worked_example_cascading_siblings_share_the_parents_pool() {
    let server = gateway("echo?prompt_tokens=5&completion_tokens=5").await;
    let [(o, _), (f, kf), (e, ke)] = worked_example_tree(&server, "CASCADING").await;
    let (admitted, refused) = admitted_until_refused(&server, &kf, 20).await;
    assert_eq!(admitted, 7);
    assert!(refused
        .message()
        .contains(&format!("TOKEN/DAY 70 of group {f} (external id f)")));
    assert_eq!(day_usage(&server, &o, "TOKEN", &o).await, Some(70));

    // E is admitted only until O's pool reaches 100: after 30 tokens, its own 30/70.
    let (admitted, refused) = admitted_until_refused(&server, &ke, 20).await;
    assert_eq!(admitted, 3);
    assert!(
        refused
            .message()
            .contains(&format!("TOKEN/DAY 100 of group {o} (external id o)")),
        "{}",
        refused.message()
    );
    assert_eq!(day_usage(&server, &e, "TOKEN", &e).await, Some(30));
    assert_eq!(day_usage(&server, &e, "TOKEN", &o).await, Some(100));
    assert_eq!(day_usage(&server, &f, "TOKEN", &f).await, Some(70));
}

#[tokio::test]
async fn worked_example_independent_counts_each_group_on_its_own() {
    let server = gateway("echo?prompt_tokens=5&completion_tokens=5").await;
    let [(o, ko), (f, kf), (e, ke)] = worked_example_tree(&server, "INDEPENDENT").await;
    for (group, key, ext) in [(&f, &kf, "f"), (&e, &ke, "e")] {
        let (admitted, refused) = admitted_until_refused(&server, key, 20).await;
        assert_eq!(admitted, 7, "{ext}");
        assert!(refused.message().contains(&format!(
            "TOKEN/DAY 70 of group {group} (external id {ext})"
        )));
        assert_eq!(day_usage(&server, group, "TOKEN", group).await, Some(70));
    }
    let (admitted, _) = admitted_until_refused(&server, &ko, 20).await;
    assert_eq!(admitted, 10);
    assert_eq!(day_usage(&server, &o, "TOKEN", &o).await, Some(100));
}

#[tokio::test]
async fn live_changes_to_a_parents_threshold_reach_inheriting_children_on_the_next_request() {
    let server = gateway("echo?prompt_tokens=1&completion_tokens=1").await;
    for mode in ["CASCADING", "INDEPENDENT"] {
        let (p, _) = member(
            &server,
            &format!("live-{mode}-p"),
            mode,
            None,
            on_m(&[("REQUEST", "DAY", 10)]),
        )
        .await;
        let (_, kc) = member(
            &server,
            &format!("live-{mode}-c"),
            mode,
            Some(&p),
            json!([{"slug": M}]),
        )
        .await;
        for _ in 0..3 {
            assert_eq!(chat(&server, &kc, false).await.status, 200, "{mode}");
        }
        // Lowered to what the child already used: refused at once.
        patch_group(
            &server,
            &p,
            json!({"models": on_m(&[("REQUEST", "DAY", 3)])}),
        )
        .await;
        let refused = chat(&server, &kc, false).await;
        assert_eq!(refused.status, 429, "{mode}");
        assert!(
            refused
                .message()
                .contains(&format!("REQUEST/DAY 3 of group {p}")),
            "{mode}: {}",
            refused.message()
        );
        // Raised: admitted again, exactly up to the new threshold.
        patch_group(
            &server,
            &p,
            json!({"models": on_m(&[("REQUEST", "DAY", 5)])}),
        )
        .await;
        let (admitted, _) = admitted_until_refused(&server, &kc, 10).await;
        assert_eq!(admitted, 2, "{mode}");
    }
}

#[tokio::test]
async fn counters_survive_a_patch() {
    let server = gateway("echo?prompt_tokens=1&completion_tokens=1").await;
    let limits = on_m(&[("REQUEST", "DAY", 3)]);
    let (group, key) = member(&server, "patched", "CASCADING", None, limits.clone()).await;
    for _ in 0..2 {
        assert_eq!(chat(&server, &key, false).await.status, 200);
    }
    patch_group(&server, &group, json!({"metadata": {"name": "renamed"}})).await;
    let third = chat(&server, &key, false).await;
    assert_eq!(third.status, 200);
    assert_eq!(third.rate("requests").unwrap().1, 0);
    // The same limits written again are the same counters.
    patch_group(&server, &group, json!({"models": limits})).await;
    assert_eq!(chat(&server, &key, false).await.status, 429);
    assert_eq!(day_usage(&server, &group, "REQUEST", &group).await, Some(3));
}

// --- answers: C09, C11, C13, C14, headers --------------------------------------------------

#[tokio::test]
async fn c09_threshold_zero_blocks_and_removing_the_limit_unblocks() {
    let server = gateway("echo?prompt_tokens=1&completion_tokens=1").await;
    let (group, key) = member(
        &server,
        "c09",
        "CASCADING",
        None,
        on_m(&[("REQUEST", "DAY", 0)]),
    )
    .await;
    let refused = chat(&server, &key, false).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.code(), "usage_limit_exceeded");
    assert_eq!(refused.rate("requests"), Some((0, 0, "0s".to_owned())));
    assert!(server.mock.requests().is_empty());

    patch_group(&server, &group, json!({"models": [{"slug": M}]})).await;
    let admitted = chat(&server, &key, false).await;
    assert_eq!(admitted.status, 200);
    // No limit of either type: no x-ratelimit-* header at all.
    assert!(
        admitted
            .headers
            .keys()
            .all(|name| !name.as_str().starts_with("x-ratelimit-")),
        "{:?}",
        admitted.headers
    );

    let (_, key) = member(
        &server,
        "c09-rate",
        "CASCADING",
        None,
        on_m(&[("TOKEN", "MINUTE", 0)]),
    )
    .await;
    let refused = chat(&server, &key, false).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.code(), "rate_limit_exceeded");
    assert_eq!(refused.header("retry-after"), Some("60"));
    assert_eq!(refused.rate("tokens"), Some((0, 0, "0s".to_owned())));
    assert_eq!(refused.rate("requests"), None);
}

#[tokio::test]
async fn c11_the_day_is_a_utc_day() {
    let (server, clock) = gateway_at(
        "echo?prompt_tokens=10&completion_tokens=20",
        "2026-12-03T23:50:00Z",
    )
    .await;
    let (group, key) = member(
        &server,
        "c11",
        "CASCADING",
        None,
        on_m(&[("TOKEN", "DAY", 100)]),
    )
    .await;
    for _ in 0..4 {
        assert_eq!(chat(&server, &key, false).await.status, 200);
    }
    let refused = chat(&server, &key, false).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.header("retry-after"), Some("600"));
    clock.set(utc("2026-12-04T00:00:05Z"));
    assert_eq!(chat(&server, &key, false).await.status, 200);
    assert_eq!(day_usage(&server, &group, "TOKEN", &group).await, Some(30));
}

#[tokio::test]
async fn c13_a_refusal_says_when_to_come_back_and_a_retry_then_succeeds() {
    let (server, clock) = gateway_at(
        "echo?prompt_tokens=1&completion_tokens=1",
        "2026-12-03T12:00:00Z",
    )
    .await;
    let (group, key) = member(
        &server,
        "c13",
        "CASCADING",
        None,
        on_m(&[("REQUEST", "MINUTE", 2)]),
    )
    .await;
    assert_eq!(chat(&server, &key, false).await.status, 200);
    let second = chat(&server, &key, false).await;
    assert_eq!(second.rate("requests"), Some((2, 0, "1m0s".to_owned())));
    let refused = chat(&server, &key, false).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.code(), "rate_limit_exceeded");
    assert!(refused.message().contains(&format!(
        "REQUEST/MINUTE 2 of group {group} (external id c13). Retry after 60 s."
    )));
    let wait: i64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert_eq!(wait, 60, "both admissions were at the same instant");
    clock.advance_millis((wait - 1) * 1000);
    assert_eq!(
        chat(&server, &key, false).await.status,
        429,
        "one second early"
    );
    clock.advance_millis(1000);
    assert_eq!(
        chat(&server, &key, false).await.status,
        200,
        "exactly on time"
    );

    // A DAY limit hit at 22:00 UTC: until midnight.
    clock.set(utc("2026-12-03T22:00:00Z"));
    let (_, key) = member(
        &server,
        "c13-day",
        "CASCADING",
        None,
        on_m(&[("REQUEST", "DAY", 1)]),
    )
    .await;
    assert_eq!(chat(&server, &key, false).await.status, 200);
    let refused = chat(&server, &key, false).await;
    assert_eq!(refused.code(), "usage_limit_exceeded");
    assert_eq!(refused.header("retry-after"), Some("7200"));
    assert_eq!(refused.rate("requests"), Some((1, 0, "2h0m0s".to_owned())));
}

#[tokio::test]
async fn c14_a_refused_request_consumes_nothing() {
    let (server, clock) = gateway_at(
        "echo?prompt_tokens=1&completion_tokens=1",
        "2026-12-03T12:00:00Z",
    )
    .await;
    let (_, key) = member(
        &server,
        "c14",
        "CASCADING",
        None,
        on_m(&[("REQUEST", "SECOND", 1), ("REQUEST", "MINUTE", 3)]),
    )
    .await;
    let start = utc("2026-12-03T12:00:00Z").0;
    let mut outcomes = Vec::new();
    for at in [0, 100, 1200, 2400, 3500] {
        clock.set(Timestamp(start + at));
        let answer = chat(&server, &key, false).await;
        let limit = answer
            .message()
            .split(": ")
            .nth(1)
            .and_then(|rest| rest.split(" of ").next())
            .unwrap_or("")
            .to_owned();
        outcomes.push((at, answer.status, limit));
    }
    assert_eq!(
        outcomes,
        [
            (0, 200, String::new()),
            (100, 429, "REQUEST/SECOND 1".to_owned()),
            (1200, 200, String::new()),
            // The minute holds A, C and D: B consumed nothing.
            (2400, 200, String::new()),
            (3500, 429, "REQUEST/MINUTE 3".to_owned()),
        ]
    );
}

#[tokio::test]
async fn c14_a_parents_refusal_leaves_the_childs_counters_untouched() {
    let server = gateway("echo?prompt_tokens=1&completion_tokens=1").await;
    let (o, _) = member(
        &server,
        "c14-o",
        "CASCADING",
        None,
        on_m(&[("REQUEST", "DAY", 2)]),
    )
    .await;
    let (a, ka) = member(
        &server,
        "c14-a",
        "CASCADING",
        Some(&o),
        on_m(&[("REQUEST", "DAY", 2)]),
    )
    .await;
    let (_, kb) = member(
        &server,
        "c14-b",
        "CASCADING",
        Some(&o),
        on_m(&[("REQUEST", "DAY", 2)]),
    )
    .await;
    for _ in 0..2 {
        assert_eq!(chat(&server, &kb, false).await.status, 200);
    }
    // O's pool is spent by B: A is refused by O, three times.
    for _ in 0..3 {
        let refused = chat(&server, &ka, false).await;
        assert_eq!(refused.status, 429);
        assert!(refused.message().contains(&format!("of group {o}")));
    }
    assert_eq!(day_usage(&server, &a, "REQUEST", &a).await, None);
    assert_eq!(day_usage(&server, &a, "REQUEST", &o).await, Some(2));
    // With room in O again, A still has its whole 2: the refusals took nothing from it.
    patch_group(
        &server,
        &o,
        json!({"models": on_m(&[("REQUEST", "DAY", 10)])}),
    )
    .await;
    let (admitted, refused) = admitted_until_refused(&server, &ka, 10).await;
    assert_eq!(admitted, 2);
    assert!(refused.message().contains(&format!("of group {a}")));
    assert_eq!(day_usage(&server, &a, "REQUEST", &a).await, Some(2));
}

#[tokio::test]
async fn the_six_headers_on_a_200_and_on_a_429() {
    let (server, _clock) = gateway_at(
        "echo?prompt_tokens=10&completion_tokens=50",
        "2026-12-03T12:00:00Z",
    )
    .await;
    let (_, key) = member(
        &server,
        "headers",
        "CASCADING",
        None,
        on_m(&[("REQUEST", "DAY", 5), ("TOKEN", "DAY", 1000)]),
    )
    .await;
    let reserved = estimate(&chat_body(false));
    let day = "12h0m0s".to_owned();
    let first = chat(&server, &key, false).await;
    assert_eq!(first.rate("requests"), Some((5, 4, day.clone())));
    assert_eq!(
        first.rate("tokens"),
        Some((1000, 1000 - reserved, day.clone()))
    );
    let second = chat(&server, &key, true).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.rate("requests"), Some((5, 3, day.clone())));
    assert_eq!(
        second.rate("tokens"),
        Some((1000, 1000 - 60 - estimate(&chat_body(true)), day.clone()))
    );
    for _ in 0..3 {
        assert_eq!(chat(&server, &key, false).await.status, 200);
    }
    let refused = chat(&server, &key, false).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.header("retry-after"), Some("43200"));
    assert_eq!(refused.rate("requests"), Some((5, 0, day.clone())));
    assert_eq!(refused.rate("tokens"), Some((1000, 700, day)));
}

// --- failures and routes: refunds, C15, C20 -------------------------------------------------

#[tokio::test]
async fn failed_upstream_calls_give_back_their_tokens_and_keep_their_request() {
    let server = TestServer::start().await;
    let scripts = [
        ("f/429", "echo?status=429&retry_after=7"),
        ("f/503", "echo?status=503"),
        ("f/400", "echo?status=400&error_shape=flat"),
        ("f/first", "echo?error_event=first"),
    ];
    for (slug, script) in scripts {
        server.create_endpoint(slug, script).await;
    }
    // A target that refuses connections.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    ok_json(
        server
            .post(
                "/v1/gateway/endpoints",
                &json!({"slug": "f/down", "targets": [{
                    "provider": "OPENAI_COMPATIBLE",
                    "base_url": format!("http://127.0.0.1:{port}/v1"),
                    "target_model": "echo",
                    "secret_id": null,
                }]}),
            )
            .send()
            .await
            .unwrap(),
    )
    .await;
    let slugs = ["f/429", "f/503", "f/400", "f/first", "f/down"];
    let limits = |slug: &str| {
        json!({"slug": slug,
               "rate_limits": [],
               "usage_limits": [{"type": "TOKEN", "unit": "DAY", "threshold": 1000},
                                {"type": "REQUEST", "unit": "DAY", "threshold": 10}]})
    };
    let models: Vec<Value> = slugs.iter().map(|s| limits(s)).collect();
    let (_, key) = member(&server, "refunds", "CASCADING", None, Value::Array(models)).await;
    for (slug, status, code) in [
        ("f/429", 429, "rate_limit_exceeded"),
        ("f/503", 503, "internal_error"),
        ("f/400", 400, "upstream_error"),
        ("f/first", 502, "internal_error"),
        ("f/down", 502, "upstream_unreachable"),
    ] {
        let body =
            json!({"model": slug, "messages": [{"role": "user", "content": "hi"}], "stream": true});
        let reserved = estimate(&body);
        for attempt in 1..=2 {
            let answer = call(&server, &key, "/v1/chat/completions", &body).await;
            assert_eq!(answer.status, status, "{slug}: {}", answer.text);
            assert_eq!(answer.code(), code, "{slug}");
            // Only this call's own estimate is reserved: the first call's went back.
            assert_eq!(
                answer.rate("tokens").map(|r| r.1),
                Some(1000 - reserved),
                "{slug} attempt {attempt}"
            );
            // The request admission stays counted.
            assert_eq!(
                answer.rate("requests").map(|r| r.1),
                Some(10 - attempt),
                "{slug}"
            );
            if slug == "f/429" {
                assert_eq!(answer.header("retry-after"), Some("7"));
            }
        }
    }
    assert!(all_events(&server).await.is_empty(), "nothing billed");
}

#[tokio::test]
async fn c15_no_route_or_path_variant_reaches_the_upstream_unmetered() {
    let server = gateway("echo?prompt_tokens=10&completion_tokens=20").await;
    let (_, key) = member(
        &server,
        "c15",
        "CASCADING",
        None,
        on_m(&[("TOKEN", "DAY", 30)]),
    )
    .await;
    assert_eq!(chat(&server, &key, false).await.status, 200);
    assert_eq!(server.mock.requests().len(), 1);
    let routes = [
        ("/v1/chat/completions", chat_body(false)),
        ("/v1/chat/completions", chat_body(true)),
        ("/v1/completions", json!({"model": M, "prompt": "hello"})),
        (
            "/v1/completions",
            json!({"model": M, "prompt": "hello", "stream": true}),
        ),
        ("/v1/embeddings", json!({"model": M, "input": "hello"})),
    ];
    for (path, body) in &routes {
        let answer = call(&server, &key, path, body).await;
        assert_eq!(answer.status, 429, "{path}");
        assert_eq!(answer.code(), "usage_limit_exceeded", "{path}");
    }
    for path in [
        "//v1/chat/completions",
        "/V1/CHAT/COMPLETIONS",
        "/v1/Chat/Completions",
        "/v1/chat/completions/",
        "/v1/chat%2Fcompletions",
        "/v1/%63hat/completions",
        "/v1/chat/completions%20",
        "/v1//chat/completions",
        "/v1/chat/completions/.",
        "/v1/./chat/completions",
        "/v1/completions/",
        "/v1/embeddings/",
        "/v1/chat/completions?stream=true",
    ] {
        let answer = call(&server, &key, path, &chat_body(false)).await;
        assert!(
            [404, 429].contains(&answer.status),
            "{path}: {} {}",
            answer.status,
            answer.text
        );
    }
    assert_eq!(
        server.mock.requests().len(),
        1,
        "no unmetered upstream call"
    );
}

#[tokio::test]
async fn every_inference_route_is_counted_on_the_same_limits() {
    let server = gateway("echo?prompt_tokens=1&completion_tokens=1").await;
    let (group, key) = member(
        &server,
        "routes",
        "CASCADING",
        None,
        on_m(&[("REQUEST", "DAY", 3)]),
    )
    .await;
    let routes = [
        ("/v1/chat/completions", chat_body(false)),
        ("/v1/completions", json!({"model": M, "prompt": "hello"})),
        ("/v1/embeddings", json!({"model": M, "input": "hello"})),
    ];
    for (i, (path, body)) in routes.iter().enumerate() {
        let answer = call(&server, &key, path, body).await;
        assert_eq!(answer.status, 200, "{path}");
        assert_eq!(answer.rate("requests").unwrap().1, 2 - i as u64, "{path}");
    }
    for (path, body) in &routes {
        assert_eq!(call(&server, &key, path, body).await.status, 429, "{path}");
    }
    assert_eq!(day_usage(&server, &group, "REQUEST", &group).await, Some(3));
}

#[tokio::test]
async fn c20_refused_bodies_are_neither_counted_nor_billed() {
    let server = TestServer::start_with(|config| config.max_body_bytes = 4096).await;
    server
        .create_endpoint(M, "echo?prompt_tokens=1&completion_tokens=1")
        .await;
    let (group, key) = member(
        &server,
        "c20",
        "CASCADING",
        None,
        on_m(&[("REQUEST", "DAY", 1), ("TOKEN", "DAY", 100)]),
    )
    .await;
    let big = json!({"model": M, "messages": [{"role": "user", "content": "x".repeat(8192)}]});
    for _ in 0..3 {
        let answer = call(&server, &key, "/v1/chat/completions", &big).await;
        assert_eq!(answer.status, 413);
        assert_eq!(answer.rate("requests"), None, "never reached the limiter");
    }
    let malformed = server
        .http
        .post(server.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    let answer = call(
        &server,
        &key,
        "/v1/chat/completions",
        &json!({"messages": []}),
    )
    .await;
    assert_eq!(answer.status, 400);

    let admitted = chat(&server, &key, false).await;
    assert_eq!(admitted.status, 200);
    assert_eq!(admitted.rate("requests").unwrap().1, 0);
    assert_eq!(chat(&server, &key, false).await.status, 429);
    assert_eq!(day_usage(&server, &group, "REQUEST", &group).await, Some(1));
    assert_eq!(server.mock.requests().len(), 1);
}
