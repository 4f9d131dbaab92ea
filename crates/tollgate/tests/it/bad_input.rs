//! Bad input on the data plane (issue: billing, point 7): an `X-Request-Metadata` that is
//! not a JSON object, or is over 4 KiB, is a 400 before any upstream call on every
//! inference route, streamed or not, and bills nothing. (`chat.rs` and `chat_edges.rs`
//! hold the chat-route cases and the exact 4096 / 4097-byte edge.)

use serde_json::json;

use crate::chat::{all_events, Plane, SLUG};
use crate::support::status_json;

#[tokio::test]
async fn bad_request_metadata_is_refused_on_every_route_before_the_upstream() {
    let plane = Plane::start("echo?prompt_tokens=3&completion_tokens=2").await;
    let server = &plane.server;
    let over = format!(r#"{{"k":"{}"}}"#, "x".repeat(4096 - 8 + 1));
    assert_eq!(over.len(), 4097);
    let refused = [
        ("[1, 2]", "X-Request-Metadata must be a JSON object."),
        ("42", "X-Request-Metadata must be a JSON object."),
        ("\"run-1\"", "X-Request-Metadata must be a JSON object."),
        ("run=1", "X-Request-Metadata must be valid JSON."),
        (
            over.as_str(),
            "X-Request-Metadata must be at most 4096 bytes.",
        ),
    ];
    let routes = [
        (
            "/v1/chat/completions",
            json!({"model": SLUG, "messages": [], "stream": true}),
        ),
        ("/v1/completions", json!({"model": SLUG, "prompt": "hi"})),
        (
            "/v1/completions",
            json!({"model": SLUG, "prompt": "hi", "stream": true}),
        ),
        ("/v1/embeddings", json!({"model": SLUG, "input": "hi"})),
    ];
    for (path, body) in &routes {
        for (value, message) in &refused {
            let response = plane
                .call(path, body)
                .header("X-Request-Metadata", *value)
                .send()
                .await
                .unwrap();
            assert_eq!(
                response.headers()["content-type"],
                "application/json",
                "{path} {value}"
            );
            let (status, answer) = status_json(response).await;
            assert_eq!(
                (status, answer["error"]["message"].as_str()),
                (400, Some(*message)),
                "{path} {value}"
            );
        }
    }
    assert!(server.mock.requests().is_empty());
    assert!(all_events(server).await.is_empty());

    // The same routes with a good object are served and billed with it.
    for (path, body) in &routes {
        let response = plane
            .call(path, body)
            .header("X-Request-Metadata", r#"{"route": "ok"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        response.bytes().await.unwrap();
    }
    let events = all_events(server).await;
    assert_eq!(events.len(), 4);
    assert!(events
        .iter()
        .all(|e| e.request_metadata.as_deref() == Some(r#"{"route": "ok"}"#)));
    assert_eq!(server.mock.requests().len(), 4);
}
