//! `GET /metrics`: Prometheus text without a key, and the limiter's gauge saying whether
//! rate counters are shared in Redis (docs/limits.md, "Degraded mode"); `GET /readyz`
//! saying the same of the database and Redis.

use tollgate_testkit::RedisServer;

use crate::support::TestServer;

/// The body of an unauthenticated `GET /metrics`, after checking status and type.
async fn scrape(server: &TestServer) -> String {
    let response = reqwest::get(server.url("/metrics")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    response.text().await.unwrap()
}

/// The body of `GET /readyz`, after checking it is a 200 (it stays one while degraded).
async fn readiness(server: &TestServer) -> serde_json::Value {
    let response = reqwest::get(server.url("/readyz")).await.unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// The limiter's three values, in order: shared, fallback switches, Redis errors.
fn limiter_values(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|line| line.starts_with("tollgate_limiter_"))
        .collect()
}

#[tokio::test]
async fn metrics_need_no_key_and_say_counters_are_per_instance_without_redis() {
    let server = TestServer::start().await;
    let text = scrape(&server).await;
    assert_eq!(
        limiter_values(&text),
        [
            "tollgate_limiter_shared 0",
            "tollgate_limiter_fallback_switches_total 0",
            "tollgate_limiter_redis_errors_total 0",
        ]
    );
    assert!(
        text.lines().any(|line| line == "tollgate_database_up 1"),
        "{text}"
    );
    assert_eq!(
        readiness(&server).await,
        serde_json::json!({"status": "ready", "database": "up"})
    );
    server.shutdown().await;
}

#[tokio::test]
async fn the_shared_gauge_reads_1_with_redis_and_0_when_it_was_down_at_start() {
    let mut redis = RedisServer::start().await.unwrap();
    let url = redis.url();
    let shared = TestServer::start_with(|config| config.redis_url = Some(url.clone())).await;
    assert_eq!(
        limiter_values(&scrape(&shared).await),
        [
            "tollgate_limiter_shared 1",
            "tollgate_limiter_fallback_switches_total 0",
            "tollgate_limiter_redis_errors_total 0",
        ]
    );
    assert_eq!(
        readiness(&shared).await,
        serde_json::json!({"status": "ready", "database": "up", "redis": "up"})
    );
    shared.shutdown().await;

    // Redis down: the server starts anyway, counting per instance.
    redis.stop().await.unwrap();
    let degraded = TestServer::start_with(|config| config.redis_url = Some(url)).await;
    assert_eq!(
        limiter_values(&scrape(&degraded).await),
        [
            "tollgate_limiter_shared 0",
            "tollgate_limiter_fallback_switches_total 1",
            "tollgate_limiter_redis_errors_total 0",
        ]
    );
    assert_eq!(
        readiness(&degraded).await,
        serde_json::json!({"status": "degraded", "database": "up", "redis": "unavailable"})
    );
    degraded.shutdown().await;
}
