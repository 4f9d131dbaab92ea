//! Daily usage is durable: DAY counters start each day from the usage events already
//! stored, so a restart never resets a customer's day (SPEC §3, issue point 8).

use std::sync::Arc;

use serde_json::{json, Value};
use tollgate_core::clock::ManualClock;
use tollgate_core::Timestamp;

use crate::support::TestServer;

const M: &str = "acme/m";

fn chat_body() -> Value {
    json!({"model": M, "messages": [{"role": "user", "content": "hello there world"}]})
}

/// `(status, error code, x-ratelimit-remaining-requests, x-ratelimit-remaining-tokens)`.
async fn call(server: &TestServer, key: &str) -> (u16, String, Option<u64>, Option<u64>) {
    let response = server.chat(key, &chat_body()).send().await.unwrap();
    let status = response.status().as_u16();
    let remaining = |kind: &str| {
        response
            .headers()
            .get(format!("x-ratelimit-remaining-{kind}"))
            .map(|v| v.to_str().unwrap().parse().unwrap())
    };
    let (requests, tokens) = (remaining("requests"), remaining("tokens"));
    let body: Value = response.json().await.unwrap();
    let code = body["error"]["code"].as_str().unwrap_or("").to_owned();
    (status, code, requests, tokens)
}

#[tokio::test]
async fn a_restart_continues_the_day_from_stored_usage() {
    // A fixed day, so the test cannot straddle a real midnight; the restarted server
    // keeps the same clock.
    let clock = Arc::new(ManualClock::new(
        Timestamp::parse_rfc3339("2026-12-03T12:00:00Z").unwrap(),
    ));
    let server = TestServer::start_with_clock(clock).await;
    server
        .create_endpoint(M, "echo?prompt_tokens=10&completion_tokens=50")
        .await;
    let day =
        |kind: &str, threshold: u64| json!({"type": kind, "unit": "DAY", "threshold": threshold});
    let models = json!([{"slug": M, "usage_limits": [day("REQUEST", 5), day("TOKEN", 1000)]}]);
    let a = server
        .group("restart-a", "CASCADING", None, models.clone())
        .await;
    let ka = server.create_key(&a).await;
    // A CASCADING pool: the parent's counter is rebuilt from its child's events.
    let o = server.group("restart-o", "CASCADING", None, models).await;
    let child = server
        .group("restart-c", "CASCADING", Some(&o), json!([{"slug": M}]))
        .await;
    let kc = server.create_key(&child).await;
    for key in [&ka, &kc] {
        for used in 1..=3 {
            let (status, _, requests, _) = call(&server, key).await;
            assert_eq!((status, requests), (200, Some(5 - used)));
        }
    }

    let server = server.restart().await;
    let reserved = (serde_json::to_vec(&chat_body()).unwrap().len() as u64 / 4).max(1);
    for key in [&ka, &kc] {
        let (status, _, requests, tokens) = call(&server, key).await;
        assert_eq!((status, requests), (200, Some(1)));
        // 3 × 60 tokens were stored before the restart.
        assert_eq!(tokens, Some(1000 - 180 - reserved));
        let (status, _, requests, _) = call(&server, key).await;
        assert_eq!((status, requests), (200, Some(0)));
        let (status, code, requests, _) = call(&server, key).await;
        assert_eq!(
            (status, code.as_str(), requests),
            (429, "usage_limit_exceeded", Some(0))
        );
    }
}
