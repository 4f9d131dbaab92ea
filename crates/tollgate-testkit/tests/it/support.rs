//! Calling the mock and reading its streams frame by frame.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};
use tollgate_testkit::MockUpstream;

/// How reading a body stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The body ended cleanly.
    End,
    /// The connection failed mid-body.
    Error,
    /// Nothing arrived for the idle time.
    Idle,
}

pub fn chat(model: &str, stream: bool, include_usage: Option<bool>) -> Value {
    let mut body = json!({
        "model": model,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello big world"},
        ],
        "stream": stream,
    });
    if let Some(include) = include_usage {
        body["stream_options"] = json!({"include_usage": include});
    }
    body
}

pub async fn post(mock: &MockUpstream, path: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}{path}", mock.base_url()))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Reads the body frame by frame until it ends, fails, or stays silent for `idle`.
pub async fn frames(response: reqwest::Response, idle: Duration) -> (Vec<Bytes>, Stop) {
    let mut body = response.bytes_stream();
    let mut frames = Vec::new();
    loop {
        match tokio::time::timeout(idle, body.next()).await {
            Ok(Some(Ok(frame))) => frames.push(frame),
            Ok(Some(Err(_))) => return (frames, Stop::Error),
            Ok(None) => return (frames, Stop::End),
            Err(_) => return (frames, Stop::Idle),
        }
    }
}

/// Streams `body` to `path` and returns the frames and how the body stopped.
pub async fn stream(mock: &MockUpstream, path: &str, body: &Value) -> (Vec<Bytes>, Stop) {
    let response = post(mock, path, body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    frames(response, Duration::from_millis(400)).await
}

pub fn concat(frames: &[Bytes]) -> Vec<u8> {
    frames.concat()
}

/// The `data` of each event of an LF-framed body (`[DONE]` included, as a string).
pub fn events(body: &[u8]) -> Vec<Value> {
    String::from_utf8(body.to_vec())
        .unwrap()
        .split("\n\n")
        .filter(|event| !event.is_empty())
        .map(|event| {
            let data = event.strip_prefix("data: ").unwrap();
            serde_json::from_str(data).unwrap_or_else(|_| Value::String(data.to_owned()))
        })
        .collect()
}

/// The text each content chunk carried, in order.
pub fn contents(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| {
            let choice = e.get("choices")?.as_array()?.first()?;
            choice
                .pointer("/delta/content")
                .or_else(|| choice.get("text"))
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
        })
        .collect()
}
