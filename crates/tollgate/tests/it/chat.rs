//! The data plane end to end: a real gateway, a real mock model server, real SSE.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use tollgate_store::{PageRequest, UsageEvent, UsageFilter, UsageStatus};

use crate::support::{ok_json, status_json, TestServer};

pub const SLUG: &str = "acme/m";
pub const EXTERNAL_ID: &str = "cust-42";

/// A server with endpoint [`SLUG`] on the mock scripted by `target_model`, a root group
/// `cust-42` allowed to call it, and a key of that group.
pub struct Plane {
    pub server: TestServer,
    pub group_id: String,
    pub key: String,
}

impl Plane {
    pub async fn start(target_model: &str) -> Self {
        Self::on(TestServer::start().await, target_model).await
    }

    pub async fn on(server: TestServer, target_model: &str) -> Self {
        server.create_endpoint(SLUG, target_model).await;
        let group_id = server
            .group(EXTERNAL_ID, "INDEPENDENT", None, json!([{"slug": SLUG}]))
            .await;
        let key = server.create_key(&group_id).await;
        Self {
            server,
            group_id,
            key,
        }
    }

    /// `POST path` with this plane's key as a Bearer token.
    pub fn call(&self, path: &str, body: &Value) -> reqwest::RequestBuilder {
        self.server
            .http
            .post(self.server.url(path))
            .bearer_auth(&self.key)
            .json(body)
    }
}

pub fn chat_body(stream: bool) -> Value {
    json!({
        "model": SLUG,
        "messages": [{"role": "user", "content": "hello there world"}],
        "stream": stream,
    })
}

/// Every usage event in the store, oldest first.
pub async fn all_events(server: &TestServer) -> Vec<UsageEvent> {
    let page = PageRequest {
        limit: 1000,
        after: None,
    };
    server
        .store
        .list_usage_events(&UsageFilter::default(), page)
        .await
        .unwrap()
        .items
}

pub async fn events_of(server: &TestServer, request_id: &str) -> Vec<UsageEvent> {
    let filter = UsageFilter {
        request_id: Some(request_id.to_owned()),
        ..UsageFilter::default()
    };
    let page = PageRequest {
        limit: 100,
        after: None,
    };
    server
        .store
        .list_usage_events(&filter, page)
        .await
        .unwrap()
        .items
}

/// Waits (at most 5 s) for the event of `request_id`, written after the response ended.
pub async fn wait_for_event(server: &TestServer, request_id: &str) -> UsageEvent {
    for _ in 0..100 {
        let mut events = events_of(server, request_id).await;
        if let Some(event) = events.pop() {
            assert!(events.is_empty(), "more than one event for {request_id}");
            return event;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no usage event for {request_id}");
}

fn request_id(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("x-request-id")
        .expect("x-request-id")
        .to_str()
        .unwrap()
        .to_owned()
}

/// The `data:` payloads of an LF-framed SSE body, in order.
pub fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|event| {
            let lines: Vec<&str> = event
                .lines()
                .filter_map(|line| line.strip_prefix("data:"))
                .map(|data| data.strip_prefix(' ').unwrap_or(data))
                .collect();
            (!lines.is_empty()).then(|| lines.join("\n"))
        })
        .collect()
}

fn json_payloads(data: &[String]) -> Vec<Value> {
    data.iter()
        .filter(|d| d.as_str() != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

fn assert_tokens(event: &UsageEvent, input: u64, output: u64) {
    assert_eq!(
        (event.input_tokens, event.output_tokens),
        (input, output),
        "{event:?}"
    );
}

async fn assert_unauthorized(response: reqwest::Response) {
    let (status, body) = status_json(response).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert_eq!(body["error"]["type"], "invalid_request_error");
}

fn closed_port_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}/v1")
}

fn target(base_url: &str, target_model: &str) -> Value {
    json!({
        "provider": "OPENAI_COMPATIBLE",
        "base_url": base_url,
        "target_model": target_model,
        "secret_id": null,
    })
}

/// A server with endpoint [`SLUG`] on the given targets.
async fn plane_with_targets(server: TestServer, targets: Value) -> Plane {
    let body = json!({"slug": SLUG, "targets": targets});
    ok_json(
        server
            .post("/v1/gateway/endpoints", &body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    let group_id = server
        .group(EXTERNAL_ID, "INDEPENDENT", None, json!([{"slug": SLUG}]))
        .await;
    let key = server.create_key(&group_id).await;
    Plane {
        server,
        group_id,
        key,
    }
}

// --- auth ----------------------------------------------------------------------------

#[tokio::test]
async fn bearer_and_api_key_both_authenticate() {
    let plane = Plane::start("echo?prompt_tokens=10&completion_tokens=5").await;
    let url = plane.server.url("/v1/chat/completions");
    let bearer = plane
        .server
        .http
        .post(&url)
        .header("Authorization", format!("Bearer {}", plane.key))
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), 200);
    let api_key = plane
        .server
        .http
        .post(&url)
        .header("Authorization", format!("Api-Key {}", plane.key))
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(api_key.status(), 200);
    assert_eq!(all_events(&plane.server).await.len(), 2);
}

#[tokio::test]
async fn bad_keys_are_401_and_never_reach_the_upstream() {
    let plane = Plane::start("echo").await;
    let server = &plane.server;
    let url = server.url("/v1/chat/completions");
    let send = |auth: Option<String>| {
        let mut builder = server.http.post(&url).json(&chat_body(false));
        if let Some(auth) = auth {
            builder = builder.header("Authorization", auth);
        }
        builder.send()
    };

    // Missing.
    let (_, body) = status_json(send(None).await.unwrap()).await;
    assert_eq!(
        body["error"]["message"],
        "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
    );
    assert_unauthorized(send(None).await.unwrap()).await;
    // Malformed.
    for auth in ["Basic abc", "Bearer", "Bearer a b", plane.key.as_str()] {
        assert_unauthorized(send(Some(auth.to_owned())).await.unwrap()).await;
    }
    // Unknown prefix, short key, right prefix with a wrong secret.
    let unknown = format!("tg_0000000000000.{}", "x".repeat(32));
    let wrong_secret = format!("{}.{}", &plane.key[..16], "y".repeat(32));
    for key in [unknown, "tg_short".to_owned(), wrong_secret] {
        assert_unauthorized(send(Some(format!("Bearer {key}"))).await.unwrap()).await;
    }

    // Revoked.
    let revoked = server.create_key(&plane.group_id).await;
    let path = format!(
        "/v1/gateway/groups/{}/api_keys/{}",
        plane.group_id,
        &revoked[..16]
    );
    ok_json(server.delete(&path).send().await.unwrap()).await;
    assert_unauthorized(send(Some(format!("Bearer {revoked}"))).await.unwrap()).await;

    // Disabled workspace, then enabled again.
    assert!(server
        .store
        .set_workspace_enabled("default", false)
        .await
        .unwrap());
    assert_unauthorized(send(Some(format!("Bearer {}", plane.key))).await.unwrap()).await;
    assert!(server
        .store
        .set_workspace_enabled("default", true)
        .await
        .unwrap());

    // Deleted group.
    ok_json(
        server
            .delete(&format!("/v1/gateway/groups/{}", plane.group_id))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_unauthorized(send(Some(format!("Bearer {}", plane.key))).await.unwrap()).await;

    assert!(server.mock.requests().is_empty());
    assert!(all_events(server).await.is_empty());
}

// --- entitlement ---------------------------------------------------------------------

#[tokio::test]
async fn outside_the_group_and_without_endpoint_answer_the_same_404() {
    let plane = Plane::start("echo").await;
    let server = &plane.server;
    let other = server.create_endpoint("acme/x", "echo").await;
    let with_x = server
        .group(
            "with-x",
            "INDEPENDENT",
            None,
            json!([{"slug": SLUG}, {"slug": "acme/x"}]),
        )
        .await;
    let key_with_x = server.create_key(&with_x).await;
    let body = json!({"model": "acme/x", "messages": []});

    // plane.key's group does not list acme/x (the endpoint exists).
    let outside = server.chat(&plane.key, &body).send().await.unwrap();
    let (status, outside) = status_json(outside).await;
    assert_eq!(status, 404);
    assert_eq!(
        outside,
        json!({"error": {
            "message": "The model `acme/x` does not exist or you do not have access to it.",
            "type": "invalid_request_error",
            "param": null,
            "code": "model_not_found",
        }})
    );

    // with_x lists acme/x, but its endpoint is deleted.
    let id = other["id"].as_str().unwrap();
    ok_json(
        server
            .delete(&format!("/v1/gateway/endpoints/{id}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let (status, missing) =
        status_json(server.chat(&key_with_x, &body).send().await.unwrap()).await;
    assert_eq!(status, 404);
    assert_eq!(missing, outside);
    // A slug nobody ever created: the same answer again.
    let nowhere = json!({"model": "acme/x", "messages": [], "stream": true});
    let (status, never) =
        status_json(server.chat(&plane.key, &nowhere).send().await.unwrap()).await;
    assert_eq!((status, never), (404, outside));
    assert!(server.mock.requests().is_empty());
}

// --- malformed requests --------------------------------------------------------------

#[tokio::test]
async fn malformed_bodies_are_400_naming_the_problem() {
    let plane = Plane::start("echo").await;
    let server = &plane.server;
    let post_raw = |body: Vec<u8>| {
        server
            .http
            .post(server.url("/v1/chat/completions"))
            .bearer_auth(&plane.key)
            .header("Content-Type", "application/json")
            .body(body)
            .send()
    };
    let cases: Vec<(Vec<u8>, &str, Value)> = vec![
        (
            b"\xff\xfe{}".to_vec(),
            "The request body is not valid UTF-8 (at byte 0).",
            Value::Null,
        ),
        (
            b"[1, 2]".to_vec(),
            "The request body must be a JSON object.",
            Value::Null,
        ),
        (
            b"{}".to_vec(),
            "You must provide a model parameter.",
            json!("model"),
        ),
        (
            br#"{"model": 12}"#.to_vec(),
            "`model` must be a string.",
            json!("model"),
        ),
        (
            br#"{"model": "acme/m", "stream": "yes"}"#.to_vec(),
            "`stream` must be a boolean.",
            json!("stream"),
        ),
    ];
    for (body, message, param) in cases {
        let (status, answer) = status_json(post_raw(body).await.unwrap()).await;
        assert_eq!(status, 400, "{answer}");
        assert_eq!(answer["error"]["message"], message);
        assert_eq!(answer["error"]["param"], param);
        assert_eq!(answer["error"]["type"], "invalid_request_error");
    }
    let (status, answer) = status_json(post_raw(b"{\"model\": ".to_vec()).await.unwrap()).await;
    assert_eq!(status, 400);
    assert!(answer["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("The request body is not valid JSON ("));
    assert!(server.mock.requests().is_empty());
}

#[tokio::test]
async fn request_metadata_is_billed_and_never_forwarded() {
    let plane = Plane::start("echo?prompt_tokens=10&completion_tokens=5").await;
    let server = &plane.server;
    let metadata = r#"{"run": "r-1", "attempt": 2}"#;
    let response = plane
        .call("/v1/chat/completions", &chat_body(false))
        .header("X-Request-Metadata", metadata)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let id = request_id(&response);
    let event = events_of(server, &id).await.pop().unwrap();
    assert_eq!(event.request_metadata.as_deref(), Some(metadata));
    let upstream = server.mock.requests();
    assert_eq!(upstream.len(), 1);
    assert_eq!(upstream[0].header("x-request-metadata"), None);

    // Not an object, not JSON, over 4 KiB: 400 before any upstream call.
    server.mock.clear();
    let too_big = format!(r#"{{"k": "{}"}}"#, "x".repeat(4096));
    for (value, message) in [
        ("[1, 2]", "X-Request-Metadata must be a JSON object."),
        ("\"text\"", "X-Request-Metadata must be a JSON object."),
        ("{oops", "X-Request-Metadata must be valid JSON."),
        (
            too_big.as_str(),
            "X-Request-Metadata must be at most 4096 bytes.",
        ),
    ] {
        let response = plane
            .call("/v1/chat/completions", &chat_body(false))
            .header("X-Request-Metadata", value)
            .send()
            .await
            .unwrap();
        let (status, body) = status_json(response).await;
        assert_eq!(status, 400);
        assert_eq!(body["error"]["message"], message);
    }
    assert!(server.mock.requests().is_empty());
    assert_eq!(all_events(server).await.len(), 1);
}

// --- body size (C20) -----------------------------------------------------------------

const SMALL_LIMIT: usize = 64 * 1024;

/// A chat body of exactly `len` bytes, compact, `model` first.
fn body_of_len(len: usize) -> String {
    let shell = format!(r#"{{"model":"{SLUG}","messages":[{{"role":"user","content":""}}]}}"#);
    let filler = "a".repeat(len - shell.len());
    format!(r#"{{"model":"{SLUG}","messages":[{{"role":"user","content":"{filler}"}}]}}"#)
}

#[tokio::test]
async fn bodies_over_the_limit_are_413_with_or_without_content_length() {
    let server = TestServer::start_with(|config| config.max_body_bytes = SMALL_LIMIT).await;
    let plane = Plane::on(server, "echo?prompt_tokens=10&completion_tokens=2").await;
    let server = &plane.server;
    let url = server.url("/v1/chat/completions");
    let expected_message = format!("Request body exceeds the limit of {SMALL_LIMIT} bytes.");

    // Content-Length announced above the limit.
    let over = body_of_len(SMALL_LIMIT + 1024);
    let response = server
        .http
        .post(&url)
        .bearer_auth(&plane.key)
        .header("Content-Type", "application/json")
        .body(over.clone())
        .send()
        .await
        .unwrap();
    let (status, body) = status_json(response).await;
    assert_eq!(status, 413);
    assert_eq!(body["error"]["message"], expected_message.as_str());
    assert_eq!(body["error"]["code"], "request_too_large");

    // Chunked, no Content-Length, past the limit.
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> = over
        .as_bytes()
        .chunks(8 * 1024)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let response = server
        .http
        .post(&url)
        .bearer_auth(&plane.key)
        .header("Content-Type", "application/json")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(pieces)))
        .send()
        .await
        .unwrap();
    let (status, body) = status_json(response).await;
    assert_eq!(status, 413);
    assert_eq!(body["error"]["message"], expected_message.as_str());
    assert!(server.mock.requests().is_empty());
    assert!(all_events(server).await.is_empty());

    // Limit − 1 KiB: forwarded, every byte but `model` identical.
    let under = body_of_len(SMALL_LIMIT - 1024);
    let response = server
        .http
        .post(&url)
        .bearer_auth(&plane.key)
        .header("Content-Type", "application/json")
        .body(under.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let upstream = server.mock.requests();
    assert_eq!(upstream.len(), 1);
    let expected = under.replacen(
        &format!(r#""model":"{SLUG}""#),
        r#""model":"echo?prompt_tokens=10&completion_tokens=2""#,
        1,
    );
    assert_eq!(upstream[0].raw_body, expected.as_bytes());
}

// --- non-streamed --------------------------------------------------------------------

#[tokio::test]
async fn a_non_streamed_call_stores_one_exact_event_before_answering() {
    let plane = Plane::start("echo?prompt_tokens=10&completion_tokens=50&cached_tokens=4").await;
    let server = &plane.server;
    let metadata = r#"{"team":"é"}"#;
    let response = plane
        .call("/v1/chat/completions", &chat_body(false))
        .header("X-Request-Metadata", metadata)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let id = request_id(&response);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["usage"]["prompt_tokens"], 10);
    assert_eq!(
        body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .split(' ')
            .count(),
        50
    );

    // Stored before the answer was released: no waiting.
    let events = events_of(server, &id).await;
    assert_eq!(events.len(), 1);
    let event = &events[0];
    assert!(id.starts_with("req_"), "{id}");
    assert!(event.idempotency_key.starts_with("evt_"));
    assert_eq!(event.request_id, id);
    assert_eq!(event.model_slug, SLUG);
    assert_eq!(event.external_entity_id, EXTERNAL_ID);
    assert_eq!(event.group_id, plane.group_id);
    assert_eq!(event.api_key_prefix, plane.key[..16]);
    assert_eq!(event.status, UsageStatus::Completed);
    assert_tokens(event, 10, 50);
    assert_eq!(event.cached_input_tokens, 4);
    assert!(!event.is_estimated);
    assert_eq!(event.request_metadata.as_deref(), Some(metadata));

    // Only Content-Type and Accept reach the upstream; the client's key never does.
    let upstream = &server.mock.requests()[0];
    assert_eq!(upstream.path, "/v1/chat/completions");
    assert_eq!(upstream.header("authorization"), None);
    assert_eq!(upstream.header("content-type"), Some("application/json"));
    assert_eq!(
        upstream.body["model"],
        "echo?prompt_tokens=10&completion_tokens=50&cached_tokens=4"
    );
    assert_eq!(upstream.body.get("stream_options"), None);
}

#[tokio::test]
async fn a_non_streamed_answer_without_usage_is_estimated() {
    let plane = Plane::start("echo?completion_tokens=8&usage_on=none").await;
    let body = chat_body(false);
    let sent = serde_json::to_vec(&body).unwrap().len() as u64;
    let response = plane
        .call("/v1/chat/completions", &body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let id = request_id(&response);
    let answer: Value = response.json().await.unwrap();
    let text = answer["choices"][0]["message"]["content"].as_str().unwrap();
    let event = events_of(&plane.server, &id).await.pop().unwrap();
    assert!(event.is_estimated);
    assert_tokens(&event, sent / 4, (text.len() as u64).div_ceil(4));
}

#[tokio::test]
async fn completions_and_embeddings_go_through_the_same_path() {
    let plane = Plane::start("echo?prompt_tokens=7&completion_tokens=3").await;
    let server = &plane.server;

    let response = plane
        .call(
            "/v1/completions",
            &json!({"model": SLUG, "prompt": "one two three"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let event = events_of(server, &request_id(&response))
        .await
        .pop()
        .unwrap();
    assert_tokens(&event, 7, 3);

    let response = plane
        .call(
            "/v1/completions",
            &json!({"model": SLUG, "prompt": "one two three", "stream": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let id = request_id(&response);
    let text = response.text().await.unwrap();
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    assert!(json_payloads(&data)
        .iter()
        .all(|p| p["choices"] != json!([])));
    assert_tokens(&events_of(server, &id).await.pop().unwrap(), 7, 3);

    let response = plane
        .call(
            "/v1/embeddings",
            &json!({"model": SLUG, "input": "embed me"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let id = request_id(&response);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["data"][0]["object"], "embedding");
    let event = events_of(server, &id).await.pop().unwrap();
    assert_tokens(&event, 7, 0);
    assert!(!event.is_estimated);

    let paths: Vec<String> = server
        .mock
        .requests()
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(
        paths,
        ["/v1/completions", "/v1/completions", "/v1/embeddings"]
    );
}

// --- streamed (C01, C02) -------------------------------------------------------------

#[tokio::test]
async fn a_stream_without_include_usage_is_metered_and_the_usage_chunk_stripped() {
    let plane = Plane::start("echo?prompt_tokens=10&completion_tokens=50").await;
    let server = &plane.server;
    let response = plane
        .call("/v1/chat/completions", &chat_body(true))
        .header("Accept", "text/event-stream")
        .header("X-Custom", "not forwarded")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let id = request_id(&response);
    let text = response.text().await.unwrap();

    // The event is committed before [DONE] is released: no waiting here.
    let events = events_of(server, &id).await;
    assert_eq!(events.len(), 1);
    assert_tokens(&events[0], 10, 50);
    assert!(!events[0].is_estimated);
    assert_eq!(events[0].status, UsageStatus::Completed);

    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let payloads = json_payloads(&data);
    assert!(payloads.iter().all(|p| p["choices"] != json!([])), "{text}");
    assert!(payloads
        .iter()
        .all(|p| p.get("usage").is_none_or(Value::is_null)));
    let content = payloads
        .iter()
        .filter(|p| {
            p["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
        })
        .count();
    assert_eq!(content, 50);

    let upstream = &server.mock.requests()[0];
    assert_eq!(
        upstream.body["stream_options"],
        json!({"include_usage": true})
    );
    assert_eq!(upstream.header("accept"), Some("text/event-stream"));
    assert_eq!(upstream.header("x-custom"), None);
}

#[tokio::test]
async fn a_stream_with_include_usage_gets_exactly_one_usage_chunk_before_done() {
    let plane =
        Plane::start("echo?prompt_tokens=10&completion_tokens=50&usage_on=null_then_final").await;
    let mut body = chat_body(true);
    body["stream_options"] = json!({"include_usage": true, "vendor_flag": "kept"});
    let response = plane
        .call("/v1/chat/completions", &body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let id = request_id(&response);
    let text = response.text().await.unwrap();
    let data = sse_data(&text);
    let payloads = json_payloads(&data);
    let usage_chunks: Vec<&Value> = payloads
        .iter()
        .filter(|p| p["choices"] == json!([]))
        .collect();
    assert_eq!(usage_chunks.len(), 1, "{text}");
    assert_eq!(usage_chunks[0]["usage"]["prompt_tokens"], 10);
    assert_eq!(usage_chunks[0]["usage"]["completion_tokens"], 50);
    assert_eq!(data[data.len() - 1], "[DONE]");
    let before_done: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(before_done["choices"], json!([]));

    let events = events_of(&plane.server, &id).await;
    assert_eq!(events.len(), 1);
    assert_tokens(&events[0], 10, 50);
    assert_eq!(
        plane.server.mock.requests()[0].body["stream_options"],
        json!({"include_usage": true, "vendor_flag": "kept"})
    );
}

#[tokio::test]
async fn three_streams_and_three_plain_calls_bill_the_same_tokens() {
    let plane = Plane::start("echo?prompt_tokens=10&completion_tokens=50").await;
    for stream in [true, false] {
        for _ in 0..3 {
            let response = plane
                .call("/v1/chat/completions", &chat_body(stream))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            response.bytes().await.unwrap();
        }
    }
    let events = all_events(&plane.server).await;
    assert_eq!(events.len(), 6);
    assert!(events
        .iter()
        .all(|e| e.input_tokens + e.output_tokens == 60));
}

#[tokio::test]
async fn an_upstream_that_ignores_include_usage_is_estimated_never_zero() {
    let plane = Plane::start("echo?completion_tokens=12&usage_on=none").await;
    let body = chat_body(true);
    let sent = serde_json::to_vec(&body).unwrap().len() as u64;
    let response = plane
        .call("/v1/chat/completions", &body)
        .send()
        .await
        .unwrap();
    let id = request_id(&response);
    response.text().await.unwrap();
    let event = events_of(&plane.server, &id).await.pop().unwrap();
    assert!(event.is_estimated);
    assert_tokens(&event, sent / 4, 12);
    assert_eq!(event.status, UsageStatus::Completed);
}

// --- cancellation (C03) --------------------------------------------------------------

/// Reads the stream until `count` content chunks arrived, then drops it.
async fn read_content_chunks_then_leave(response: reqwest::Response, count: usize) {
    let mut stream = response.bytes_stream();
    let mut text = String::new();
    loop {
        let chunk = stream.next().await.expect("stream ended early").unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
        let seen = sse_data(&text)
            .iter()
            .filter(|d| d.contains("\"content\":\"") && !d.contains("\"content\":\"\""))
            .count();
        if seen >= count {
            return;
        }
    }
}

#[tokio::test]
async fn a_client_leaving_mid_stream_is_billed_and_the_upstream_stopped() {
    let plane =
        Plane::start("echo?prompt_tokens=10&completion_tokens=50&interval_ms=20&usage_on=every")
            .await;
    let server = &plane.server;
    let mut body = chat_body(true);
    body["stream_options"] = json!({"include_usage": true});
    let response = plane
        .call("/v1/chat/completions", &body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let id = request_id(&response);
    read_content_chunks_then_leave(response, 5).await;

    let event = wait_for_event(server, &id).await;
    assert_eq!(event.status, UsageStatus::ClientCancelled);
    assert_eq!(event.external_entity_id, EXTERNAL_ID);
    assert_eq!(event.input_tokens, 10);
    assert!((5..50).contains(&event.output_tokens), "{event:?}");
    assert!(!event.is_estimated);
    assert!(
        server
            .mock
            .wait_for_disconnects(1, Duration::from_secs(5))
            .await
    );
    assert!(server.mock.requests()[0].is_cut_by_client);
}

#[tokio::test]
async fn a_client_leaving_before_any_usage_is_billed_by_estimate() {
    let plane = Plane::start("echo?prompt_tokens=10&completion_tokens=50&interval_ms=20").await;
    let server = &plane.server;
    let body = chat_body(true);
    let sent = serde_json::to_vec(&body).unwrap().len() as u64;
    let response = plane
        .call("/v1/chat/completions", &body)
        .send()
        .await
        .unwrap();
    let id = request_id(&response);
    read_content_chunks_then_leave(response, 5).await;

    let event = wait_for_event(server, &id).await;
    assert_eq!(event.status, UsageStatus::ClientCancelled);
    assert!(event.is_estimated);
    assert_eq!(event.input_tokens, sent / 4);
    assert!((5..50).contains(&event.output_tokens), "{event:?}");
    assert!(
        server
            .mock
            .wait_for_disconnects(1, Duration::from_secs(5))
            .await
    );
}

// --- ids (C04) -----------------------------------------------------------------------

#[tokio::test]
async fn ids_come_from_the_gateway_whatever_the_upstream_sends() {
    for id_style in ["empty", "fixed"] {
        let plane = Plane::start(&format!(
            "echo?prompt_tokens=10&completion_tokens=50&id={id_style}"
        ))
        .await;
        let mut header_ids = Vec::new();
        for i in 0..10 {
            let response = plane
                .call("/v1/chat/completions", &chat_body(i % 2 == 0))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            header_ids.push(request_id(&response));
            response.bytes().await.unwrap();
        }
        let events = all_events(&plane.server).await;
        assert_eq!(events.len(), 10);
        let mut request_ids: Vec<&str> = events.iter().map(|e| e.request_id.as_str()).collect();
        let mut keys: Vec<&str> = events.iter().map(|e| e.idempotency_key.as_str()).collect();
        request_ids.sort_unstable();
        request_ids.dedup();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!((request_ids.len(), keys.len()), (10, 10));
        assert!(request_ids.iter().all(|id| id.starts_with("req_")));
        header_ids.sort_unstable();
        assert_eq!(request_ids, header_ids);
        let total: u64 = events
            .iter()
            .map(|e| e.input_tokens + e.output_tokens)
            .sum();
        assert_eq!(total, 600);
    }
}

// --- upstream status (C13, C19) ------------------------------------------------------

#[tokio::test]
async fn an_upstream_429_is_a_429_with_its_retry_after_and_no_stream() {
    let plane = Plane::start("echo?status=429&retry_after=7").await;
    let response = plane
        .call("/v1/chat/completions", &chat_body(true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "7");
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["error"]["message"],
        "mock upstream: scripted status 429"
    );
    assert!(all_events(&plane.server).await.is_empty());
}

#[tokio::test]
async fn upstream_error_bodies_are_openai_shaped_or_wrapped() {
    let plane = Plane::start("echo?status=400&error_shape=flat").await;
    let response = plane
        .call("/v1/chat/completions", &chat_body(false))
        .send()
        .await
        .unwrap();
    let (status, body) = status_json(response).await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        json!({"error": {
            "message": "mock upstream: scripted status 400",
            "type": "upstream_error",
            "param": null,
            "code": "upstream_error",
        }})
    );

    let plane = Plane::start("echo?status=500&error_shape=text").await;
    let response = plane
        .call("/v1/chat/completions", &chat_body(true))
        .send()
        .await
        .unwrap();
    let (status, body) = status_json(response).await;
    assert_eq!(status, 500);
    assert_eq!(
        body,
        json!({"error": {
            "message": "mock upstream: scripted status 500",
            "type": "upstream_error",
            "param": null,
            "code": "upstream_error",
        }})
    );
    assert!(all_events(&plane.server).await.is_empty());
}

#[tokio::test]
async fn a_200_that_is_an_error_is_not_billed() {
    let plane = Plane::start("echo?error_event=first").await;
    let response = plane
        .call("/v1/chat/completions", &chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert!(body.get("error").is_some(), "{body}");

    // Streamed, the error first event is known before the headers: an error status with
    // the upstream's OpenAI-shaped error as the body (its code is not numeric: 502).
    let response = plane
        .call("/v1/chat/completions", &chat_body(true))
        .send()
        .await
        .unwrap();
    let (status, body) = status_json(response).await;
    assert_eq!(status, 502);
    assert_eq!(
        body["error"]["message"],
        "mock upstream: failure while generating"
    );
    assert!(all_events(&plane.server).await.is_empty());
}

#[tokio::test]
async fn an_error_event_mid_stream_is_forwarded_and_billed_as_such() {
    let plane = Plane::start(
        "echo?prompt_tokens=10&completion_tokens=50&error_event=after:3&usage_on=every",
    )
    .await;
    let response = plane
        .call("/v1/chat/completions", &chat_body(true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let id = request_id(&response);
    let text = response.text().await.unwrap();
    let data = sse_data(&text);
    let payloads = json_payloads(&data);
    assert!(payloads.iter().any(|p| p.get("error").is_some()), "{text}");
    assert!(!text.contains("\"finish_reason\":\"stop\""), "{text}");
    let event = events_of(&plane.server, &id).await.pop().unwrap();
    assert_eq!(event.status, UsageStatus::UpstreamErrorMidStream);
    assert_tokens(&event, 10, 3);
}

#[tokio::test]
async fn a_dropped_upstream_stream_ends_with_an_explicit_error_event() {
    let plane =
        Plane::start("echo?prompt_tokens=10&completion_tokens=50&drop_after=3&usage_on=every")
            .await;
    let response = plane
        .call("/v1/chat/completions", &chat_body(true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let id = request_id(&response);
    let text = response.text().await.unwrap();
    let data = sse_data(&text);
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_stream_truncated", "{text}");
    assert!(!data.iter().any(|d| d == "[DONE]"));
    let event = events_of(&plane.server, &id).await.pop().unwrap();
    assert_eq!(event.status, UsageStatus::UpstreamErrorMidStream);
    assert_tokens(&event, 10, 3);
}

// --- failover, 502, 504 --------------------------------------------------------------

#[tokio::test]
async fn a_refused_connection_fails_over_to_the_next_target() {
    let server = TestServer::start().await;
    let mock_url = server.mock.base_url();
    let plane = plane_with_targets(
        server,
        json!([
            target(&closed_port_url(), "echo"),
            target(&mock_url, "echo?prompt_tokens=10&completion_tokens=5"),
        ]),
    )
    .await;
    let response = plane
        .call("/v1/chat/completions", &chat_body(true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let id = request_id(&response);
    response.text().await.unwrap();
    assert_tokens(&events_of(&plane.server, &id).await.pop().unwrap(), 10, 5);
}

#[tokio::test]
async fn a_503_fails_over_and_the_failed_target_goes_last() {
    let server = TestServer::start().await;
    let mock_url = server.mock.base_url();
    let plane = plane_with_targets(
        server,
        json!([
            target(&mock_url, "broken?status=503"),
            target(&mock_url, "echo?prompt_tokens=10&completion_tokens=5"),
        ]),
    )
    .await;
    for _ in 0..2 {
        let response = plane
            .call("/v1/chat/completions", &chat_body(false))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let models: Vec<String> = plane
        .server
        .mock
        .requests()
        .iter()
        .map(|r| r.body["model"].as_str().unwrap().to_owned())
        .collect();
    // The second call went straight to the healthy target.
    assert_eq!(
        models,
        [
            "broken?status=503",
            "echo?prompt_tokens=10&completion_tokens=5",
            "echo?prompt_tokens=10&completion_tokens=5"
        ]
    );
    assert_eq!(all_events(&plane.server).await.len(), 2);
}

#[tokio::test]
async fn the_last_targets_server_error_reaches_the_client() {
    let server = TestServer::start().await;
    let mock_url = server.mock.base_url();
    let plane = plane_with_targets(
        server,
        json!([
            target(&closed_port_url(), "echo"),
            target(&mock_url, "echo?status=503")
        ]),
    )
    .await;
    let (status, body) = status_json(
        plane
            .call("/v1/chat/completions", &chat_body(true))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 503);
    assert_eq!(
        body["error"]["message"],
        "mock upstream: scripted status 503"
    );
    assert!(all_events(&plane.server).await.is_empty());
}

#[tokio::test]
async fn unreachable_everywhere_is_502_and_not_billed() {
    let server = TestServer::start().await;
    let plane = plane_with_targets(
        server,
        json!([
            target(&closed_port_url(), "echo"),
            target(&closed_port_url(), "echo")
        ]),
    )
    .await;
    let response = plane
        .call("/v1/chat/completions", &chat_body(false))
        .send()
        .await
        .unwrap();
    assert!(response.headers().contains_key("x-request-id"));
    let (status, body) = status_json(response).await;
    assert_eq!(status, 502);
    assert_eq!(body["error"]["code"], "upstream_unreachable");
    assert_eq!(
        body["error"]["message"],
        "The model server could not be reached."
    );
    assert!(all_events(&plane.server).await.is_empty());
}

#[tokio::test]
async fn no_response_headers_in_time_is_504() {
    let server =
        TestServer::start_with(|config| config.upstream_timeout = Duration::from_millis(300)).await;
    let plane = Plane::on(server, "echo?latency_ms=3000").await;
    let started = std::time::Instant::now();
    let (status, body) = status_json(
        plane
            .call("/v1/chat/completions", &chat_body(true))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 504);
    assert_eq!(body["error"]["code"], "upstream_timeout");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(all_events(&plane.server).await.is_empty());
}

#[tokio::test]
async fn a_target_secret_is_sent_as_bearer() {
    let server = TestServer::start().await;
    let secret = ok_json(
        server
            .post(
                "/v1/gateway/secrets",
                &json!({"name": "upstream", "value": "sk-upstream-1"}),
            )
            .send()
            .await
            .unwrap(),
    )
    .await;
    let mut with_secret = target(&server.mock.base_url(), "echo");
    with_secret["secret_id"] = secret["id"].clone();
    let plane = plane_with_targets(server, json!([with_secret])).await;
    let response = plane
        .call("/v1/chat/completions", &chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        plane.server.mock.requests()[0].header("authorization"),
        Some("Bearer sk-upstream-1")
    );
}

// --- request ids, routes (C15) -------------------------------------------------------

#[tokio::test]
async fn every_answer_carries_the_events_request_id() {
    let plane = Plane::start("echo?prompt_tokens=10&completion_tokens=5").await;
    let server = &plane.server;
    let response = plane
        .call("/v1/chat/completions", &chat_body(true))
        .send()
        .await
        .unwrap();
    let id = request_id(&response);
    response.text().await.unwrap();
    assert_eq!(events_of(server, &id).await.pop().unwrap().request_id, id);

    let denied = server.chat("nope", &chat_body(false)).send().await.unwrap();
    assert_eq!(denied.status(), 401);
    assert!(request_id(&denied).starts_with("req_"));
}

#[tokio::test]
async fn path_variants_are_404_and_never_reach_the_upstream() {
    let plane = Plane::start("echo").await;
    let server = &plane.server;
    for path in [
        "//v1/chat/completions",
        "/V1/CHAT/COMPLETIONS",
        "/v1/chat/completions/",
        "/v1/chat%2Fcompletions",
        "/v1/%63hat/completions",
        "/v1//chat/completions",
        "/v1/completions/",
        "/v1/Embeddings",
    ] {
        let response = plane.call(path, &chat_body(false)).send().await.unwrap();
        assert_eq!(response.status(), 404, "{path}");
    }
    assert!(server.mock.requests().is_empty());
    assert!(all_events(server).await.is_empty());
}

// --- stream endings and framings -----------------------------------------------------

/// Streams `target_model` to the end; returns the client's text and the stored event.
async fn stream_through(target_model: &str, body: &Value) -> (String, UsageEvent) {
    let plane = Plane::start(target_model).await;
    let response = plane
        .call("/v1/chat/completions", body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let id = request_id(&response);
    let text = response.text().await.unwrap();
    let mut events = events_of(&plane.server, &id).await;
    assert_eq!(events.len(), 1, "{text}");
    (text, events.remove(0))
}

#[tokio::test]
async fn a_finished_stream_without_done_is_complete_and_gets_no_error_event() {
    let (text, event) = stream_through(
        "echo?prompt_tokens=10&completion_tokens=50&ending=no_done",
        &chat_body(true),
    )
    .await;
    assert!(!text.contains("[DONE]"));
    assert!(!text.contains("\"error\""), "{text}");
    assert_eq!(event.status, UsageStatus::Completed);
    assert_tokens(&event, 10, 50);
}

#[tokio::test]
async fn a_reset_stream_is_flagged_to_the_client_and_billed_partially() {
    let (text, event) = stream_through(
        "echo?prompt_tokens=10&completion_tokens=50&usage_on=every&ending=reset",
        &chat_body(true),
    )
    .await;
    assert!(text.ends_with("\n\n"), "{text}");
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let last: Value = serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_stream_truncated");
    assert_eq!(last["error"]["type"], "upstream_error");
    assert!(!text.contains("\"finish_reason\":\"stop\""), "{text}");
    assert_eq!(event.status, UsageStatus::UpstreamErrorMidStream);
    assert_tokens(&event, 10, 50);
}

#[tokio::test]
async fn a_stream_cut_after_its_finish_chunk_is_complete() {
    // The finish chunk came; only the trailing usage event is cut in half.
    let (text, event) = stream_through(
        "echo?prompt_tokens=10&completion_tokens=50&usage_on=every&ending=eof_mid_event",
        &chat_body(true),
    )
    .await;
    assert!(text.contains("\"finish_reason\":\"stop\""), "{text}");
    assert!(!text.contains("upstream_stream_truncated"), "{text}");
    assert_eq!(event.status, UsageStatus::Completed);
    assert_tokens(&event, 10, 50);
}

#[tokio::test]
async fn odd_framings_and_deliveries_are_metered_and_stripped() {
    for script in [
        "framing=crlf",
        "framing=comments",
        "framing=multiline",
        "delivery=bytewise",
        "delivery=split_utf8",
        "delivery=one_read",
        "ending=done_no_blank",
    ] {
        let (text, event) = stream_through(
            &format!("echo?prompt_tokens=10&completion_tokens=20&{script}"),
            &chat_body(true),
        )
        .await;
        assert_eq!(event.status, UsageStatus::Completed, "{script}: {text}");
        assert_tokens(&event, 10, 20);
        assert!(!event.is_estimated, "{script}");
        assert!(!text.contains("\"choices\":[]"), "{script}: {text}");
        assert!(text.contains("[DONE]"), "{script}: {text}");
    }
}

#[tokio::test]
async fn the_default_limit_is_ten_mib_and_bodies_under_it_pass_intact() {
    const LIMIT: usize = 10 * 1024 * 1024;
    let plane = Plane::start("echo?prompt_tokens=10&completion_tokens=2").await;
    let server = &plane.server;
    let url = server.url("/v1/chat/completions");

    let over = body_of_len(LIMIT + 1024);
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> = over
        .as_bytes()
        .chunks(256 * 1024)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let response = server
        .http
        .post(&url)
        .bearer_auth(&plane.key)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(pieces)))
        .send()
        .await
        .unwrap();
    let (status, body) = status_json(response).await;
    assert_eq!(status, 413);
    assert_eq!(
        body["error"]["message"],
        "Request body exceeds the limit of 10485760 bytes."
    );
    let response = server
        .http
        .post(&url)
        .bearer_auth(&plane.key)
        .body(over)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert!(server.mock.requests().is_empty());

    let under = body_of_len(LIMIT - 1024);
    let response = server
        .http
        .post(&url)
        .bearer_auth(&plane.key)
        .body(under.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let expected = under.replacen(
        &format!(r#""model":"{SLUG}""#),
        r#""model":"echo?prompt_tokens=10&completion_tokens=2""#,
        1,
    );
    assert!(server.mock.requests()[0].raw_body == expected.as_bytes());
    assert_eq!(all_events(server).await.len(), 1);
}
