//! How a stream's first and last events shape the client's answer: `[DONE]` ends the
//! client's stream at once, and a 200 stream whose first event is an error is answered
//! as an error status.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_store::UsageStatus;

use crate::chat::{events_of, sse_data, EXTERNAL_ID};
use crate::support::{status_json, TestServer};

/// A server with endpoint `slug` per `(slug, target_model)`, a group allowed all of them
/// and its key.
async fn plane(scripts: &[(&str, &str)]) -> (TestServer, String) {
    let server = TestServer::start().await;
    for (slug, target_model) in scripts {
        server.create_endpoint(slug, target_model).await;
    }
    let models: Vec<Value> = scripts.iter().map(|(s, _)| json!({"slug": s})).collect();
    let group = server
        .group(EXTERNAL_ID, "INDEPENDENT", None, Value::Array(models))
        .await;
    let key = server.create_key(&group).await;
    (server, key)
}

fn request_id(response: &reqwest::Response) -> String {
    response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn done_ends_the_client_stream_even_when_the_upstream_stays_open() {
    // The upstream keeps the connection open after [DONE]; the idle bound is the default
    // 60 s, so waiting for the upstream to close would show.
    let (server, key) = plane(&[(
        "acme/open",
        "echo?prompt_tokens=10&completion_tokens=6&ending=done_stall",
    )])
    .await;
    let cases = [
        (
            "/v1/chat/completions",
            json!({"model": "acme/open", "messages": [{"role": "user", "content": "hi"}], "stream": true}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "acme/open", "messages": [{"role": "user", "content": "hi"}], "stream": true, "stream_options": {"include_usage": true}}),
        ),
        (
            "/v1/completions",
            json!({"model": "acme/open", "prompt": "hi", "stream": true}),
        ),
    ];
    for (i, (path, body)) in cases.into_iter().enumerate() {
        let started = Instant::now();
        let response = server
            .http
            .post(server.url(path))
            .bearer_auth(&key)
            .json(&body)
            .timeout(Duration::from_secs(20))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let id = request_id(&response);
        let text = response.text().await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{path}: the client waited {:?}",
            started.elapsed()
        );
        assert!(text.ends_with("data: [DONE]\n\n"), "{path}: {text}");
        let wants_usage = body.get("stream_options").is_some();
        let usage_chunks = sse_data(&text)
            .iter()
            .filter(|d| d.contains("\"choices\":[]"))
            .count();
        assert_eq!(usage_chunks, usize::from(wants_usage), "{path}");
        // The event was stored before [DONE] was released.
        let events = events_of(&server, &id).await;
        assert_eq!(events.len(), 1, "{path}");
        assert_eq!(events[0].status, UsageStatus::Completed);
        assert_eq!((events[0].input_tokens, events[0].output_tokens), (10, 6));
        // And the gateway let the open upstream connection go.
        assert!(
            server
                .mock
                .wait_for_disconnects(i as u64 + 1, Duration::from_secs(5))
                .await,
            "{path}: the upstream connection must be closed"
        );
    }
}

/// `(script, status, body)`: a body of `None` is the wrapped shape with the mock's text.
fn error_first_cases() -> Vec<(&'static str, u16, Option<Value>)> {
    let nested = json!({"error": {
        "message": "mock upstream: failure while generating",
        "type": "server_error",
        "param": null,
        "code": "internal_error",
    }});
    let nested_int = json!({"error": {
        "message": "mock upstream: failure while generating",
        "type": "server_error",
        "param": null,
        "code": 500,
    }});
    vec![
        // OpenAI-shaped, string code: passed as it is, 502.
        ("error_event=first", 502, Some(nested.clone())),
        ("error_event=first&then=eof", 502, Some(nested.clone())),
        // An upstream that stays silent after the error: answered at once all the same.
        ("error_event=first&then=nothing", 502, Some(nested.clone())),
        (
            "error_event=first&framing=event_id",
            502,
            Some(nested.clone()),
        ),
        (
            "error_event=first&framing=comments",
            502,
            Some(nested.clone()),
        ),
        (
            "error_event=first&framing=crlf&delivery=bytewise",
            502,
            Some(nested),
        ),
        // A numeric code that is an HTTP error is the status.
        (
            "error_event=first&error_shape=nested_int_code",
            500,
            Some(nested_int),
        ),
        ("error_event=first&error_shape=flat", 500, None),
        // TGI's `{"error": "<text>"}` and FastAPI's `detail`: wrapped, 502.
        ("error_event=first&error_shape=string", 502, None),
        ("error_event=first&error_shape=detail", 502, None),
    ]
}

#[tokio::test]
async fn a_stream_whose_first_event_is_an_error_is_an_error_status() {
    let cases = error_first_cases();
    let scripts: Vec<(String, String)> = cases
        .iter()
        .enumerate()
        .map(|(i, (script, _, _))| (format!("e/{i}"), format!("echo?{script}")))
        .collect();
    let borrowed: Vec<(&str, &str)> = scripts
        .iter()
        .map(|(s, t)| (s.as_str(), t.as_str()))
        .collect();
    let (server, key) = plane(&borrowed).await;
    let wrapped = json!({"error": {
        "message": "mock upstream: failure while generating",
        "type": "upstream_error",
        "param": null,
        "code": "upstream_error",
    }});
    for (i, (script, status, expected)) in cases.into_iter().enumerate() {
        for wants_usage in [false, true] {
            let mut body = json!({"model": format!("e/{i}"), "messages": [{"role": "user", "content": "hi"}], "stream": true});
            if wants_usage {
                body["stream_options"] = json!({"include_usage": true});
            }
            let started = Instant::now();
            let response = server
                .http
                .post(server.url("/v1/chat/completions"))
                .bearer_auth(&key)
                .json(&body)
                .timeout(Duration::from_secs(20))
                .send()
                .await
                .unwrap();
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "{script}: answered after {:?}",
                started.elapsed()
            );
            assert_eq!(
                response.headers()["content-type"],
                "application/json",
                "{script}"
            );
            let id = request_id(&response);
            let (got, answer) = status_json(response).await;
            assert_eq!(got, status, "{script}: {answer}");
            assert_eq!(
                answer,
                expected.clone().unwrap_or(wrapped.clone()),
                "{script}"
            );
            assert!(events_of(&server, &id).await.is_empty(), "{script}: billed");
        }
    }
}
