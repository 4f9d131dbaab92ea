//! The data plane at its edges: every upstream variant of UPSTREAMS.md compared byte for
//! byte with what the mock really sent, odd requests and headers, clients leaving at each
//! moment, concurrency, stalls, very large events and bodies.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use tollgate_store::{UsageEvent, UsageStatus};

use crate::chat::{all_events, events_of, wait_for_event, EXTERNAL_ID};
use crate::support::{status_json, TestServer};

/// A prompt of four words with multi-byte characters (for `delivery=split_utf8`).
const PROMPT: &str = "héllo wörld 🚀 ok";

/// The event the gateway appends to a stream that broke off, exactly as sent.
const TRUNCATION_EVENT: &str = "data: {\"error\":{\"code\":\"upstream_stream_truncated\",\
    \"message\":\"The model server ended the stream unexpectedly.\",\"param\":null,\
    \"type\":\"upstream_error\"}}\n\n";

/// A server with one endpoint per `(slug, target_model)`, a root group allowed to call
/// them all, and a key of that group.
struct Lab {
    server: TestServer,
    key: String,
}

impl Lab {
    async fn start(scripts: &[(&str, &str)]) -> Self {
        Self::on(TestServer::start().await, scripts).await
    }

    async fn on(server: TestServer, scripts: &[(&str, &str)]) -> Self {
        for (slug, target_model) in scripts {
            server.create_endpoint(slug, target_model).await;
        }
        let models: Vec<Value> = scripts.iter().map(|(s, _)| json!({"slug": s})).collect();
        let group_id = server
            .group(EXTERNAL_ID, "INDEPENDENT", None, Value::Array(models))
            .await;
        let key = server.create_key(&group_id).await;
        Self { server, key }
    }

    fn post(&self, path: &str, body: &Value) -> reqwest::RequestBuilder {
        self.server
            .http
            .post(self.server.url(path))
            .bearer_auth(&self.key)
            .json(body)
    }

    fn raw(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.server.http.request(method, self.server.url(path))
    }
}

fn request_id(response: &reqwest::Response) -> String {
    response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned()
}

/// Request bytes / 4: the prompt tokens billed when the upstream reports none.
fn prompt_estimate(body: &Value) -> u64 {
    (serde_json::to_vec(body).unwrap().len() as u64 / 4).max(1)
}

fn assert_event(event: &UsageEvent, status: UsageStatus, tokens: (u64, u64), estimated: bool) {
    assert_eq!(
        (
            event.status,
            event.input_tokens,
            event.output_tokens,
            event.is_estimated
        ),
        (status, tokens.0, tokens.1, estimated),
        "{event:?}"
    );
    assert!(event.request_id.starts_with("req_"), "{event:?}");
    assert!(event.idempotency_key.starts_with("evt_"), "{event:?}");
}

/// Reads a body to its end or to its first error; the bytes that arrived.
async fn bytes_until_end(response: reqwest::Response) -> Vec<u8> {
    let mut stream = response.bytes_stream();
    let mut out = Vec::new();
    while let Some(Ok(chunk)) = stream.next().await {
        out.extend_from_slice(&chunk);
    }
    out
}

/// What the mock answers to exactly the request the gateway sent it last.
async fn upstream_answer(server: &TestServer) -> Vec<u8> {
    let sent = server.mock.requests().pop().unwrap();
    let response = reqwest::Client::new()
        .post(format!("http://{}{}", server.mock.addr(), sent.path))
        .header("Content-Type", "application/json")
        .body(sent.raw_body.clone())
        .send()
        .await
        .unwrap();
    bytes_until_end(response).await
}

/// `bytes` with the per-request parts of the mock's output made equal: `"created"`
/// seconds and the request number in ids (`mock17` → `mock#`).
fn normalized(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    let mut rest: &str = &text;
    loop {
        let created = rest.find("\"created\":");
        let mock = rest.find("mock");
        let (at, marker) = match (created, mock) {
            (Some(c), Some(m)) if c < m => (c, "\"created\":"),
            (Some(c), None) => (c, "\"created\":"),
            (_, Some(m)) => (m, "mock"),
            (None, None) => {
                out.push_str(rest);
                return out;
            }
        };
        out.push_str(&rest[..at + marker.len()]);
        rest = &rest[at + marker.len()..];
        let spaces = rest.len() - rest.trim_start_matches(' ').len();
        out.push_str(&rest[..spaces]);
        rest = &rest[spaces..];
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits > 0 {
            out.push('#');
        }
        rest = &rest[digits..];
    }
}

/// `bytes` without the usage-only event (`choices: []` and a `usage` object), found by a
/// parser of this test's own: lines end in LF, CRLF or CR; a comment before an event's
/// first field is not part of the event.
fn without_usage_event(bytes: &[u8]) -> Vec<u8> {
    let mut lines: Vec<&[u8]> = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i < bytes.len() {
        let end = match bytes[i] {
            b'\n' => i + 1,
            b'\r' if bytes.get(i + 1) == Some(&b'\n') => i + 2,
            b'\r' => i + 1,
            _ => {
                i += 1;
                continue;
            }
        };
        lines.push(&bytes[start..end]);
        (start, i) = (end, end);
    }
    let mut out = Vec::new();
    let mut event: Vec<&[u8]> = Vec::new();
    for line in lines {
        let text = line
            .strip_suffix(b"\n")
            .unwrap_or(line)
            .strip_suffix(b"\r")
            .unwrap_or(line.strip_suffix(b"\n").unwrap_or(line));
        if text.is_empty() {
            event.push(line);
            if !is_usage_only(&event) {
                out.extend(event.concat());
            }
            event.clear();
        } else if text.starts_with(b":") && event.is_empty() {
            out.extend_from_slice(line);
        } else {
            event.push(line);
        }
    }
    event.push(&bytes[start..]);
    if !is_usage_only(&event) {
        out.extend(event.concat());
    }
    out
}

fn is_usage_only(event: &[&[u8]]) -> bool {
    let data: Vec<String> = event
        .iter()
        .map(|line| {
            String::from_utf8_lossy(line)
                .trim_end_matches(['\r', '\n'])
                .to_owned()
        })
        .filter_map(|line| {
            line.strip_prefix("data:")
                .map(|d| d.strip_prefix(' ').unwrap_or(d).to_owned())
        })
        .collect();
    match serde_json::from_str::<Value>(&data.join("\n")) {
        Ok(chunk) => {
            chunk["choices"] == json!([])
                && chunk["usage"].is_object()
                && chunk.get("error").is_none()
        }
        Err(_) => false,
    }
}

// --- every upstream variant, byte for byte --------------------------------------------

/// What a variant must be billed.
#[derive(Debug, Clone, Copy)]
enum Bill {
    /// The upstream's own figures: (prompt, completion).
    Reported(u64, u64),
    /// Prompt estimate, and this many completion tokens (content chunks).
    Estimated(u64),
}

#[derive(Debug, Clone, Copy)]
struct Variant {
    /// Added to `echo?prompt_tokens=10&completion_tokens=6`.
    script: &'static str,
    route: &'static str,
    /// `n` of the request.
    n: u64,
    status: UsageStatus,
    bill: Bill,
    /// The upstream broke off: the gateway appends its truncation event.
    is_truncated: bool,
    cached: u64,
}

const fn variant(script: &'static str, bill: Bill) -> Variant {
    Variant {
        script,
        route: "/v1/chat/completions",
        n: 1,
        status: UsageStatus::Completed,
        bill,
        is_truncated: false,
        cached: 0,
    }
}

const COMPLETE: Bill = Bill::Reported(10, 6);

impl Variant {
    const fn failing(mut self, status: UsageStatus) -> Self {
        self.status = status;
        self
    }
    const fn truncated(mut self) -> Self {
        self.is_truncated = true;
        self.status = UsageStatus::UpstreamErrorMidStream;
        self
    }
    const fn on(mut self, route: &'static str) -> Self {
        self.route = route;
        self
    }
    const fn choices(mut self, n: u64) -> Self {
        self.n = n;
        self
    }
    const fn cached(mut self, cached: u64) -> Self {
        self.cached = cached;
        self
    }

    fn body(&self, slug: &str, wants_usage: bool) -> Value {
        let mut body = if self.route == "/v1/completions" {
            json!({"model": slug, "prompt": PROMPT, "stream": true})
        } else {
            json!({"model": slug, "messages": [{"role": "user", "content": PROMPT}], "stream": true})
        };
        if self.n != 1 {
            body["n"] = json!(self.n);
        }
        if wants_usage {
            body["stream_options"] = json!({"include_usage": true});
        }
        body
    }
}

const MID: UsageStatus = UsageStatus::UpstreamErrorMidStream;

const VARIANTS: &[Variant] = &[
    // Framing.
    variant("framing=lf", COMPLETE),
    variant("framing=crlf", COMPLETE),
    variant("framing=cr", COMPLETE),
    variant("framing=nospace", COMPLETE),
    variant("framing=twospace", COMPLETE),
    variant("framing=bom", COMPLETE),
    variant("framing=multiline", COMPLETE),
    variant("framing=comments", COMPLETE),
    variant("framing=keepalive_data", COMPLETE),
    variant("framing=event_id", COMPLETE),
    variant("framing=trailing_spaces", COMPLETE),
    // Delivery.
    variant("delivery=bytewise", COMPLETE),
    variant("delivery=split_utf8", COMPLETE),
    variant("delivery=one_read", COMPLETE),
    variant("delivery=bytewise&framing=crlf", COMPLETE),
    variant("delivery=bytewise&framing=cr", COMPLETE),
    variant("delivery=split_utf8&framing=multiline", COMPLETE),
    // Endings.
    variant("ending=done_no_blank", COMPLETE),
    variant("ending=no_done", COMPLETE),
    // The usage chunk cut in half: the finish came, the figures did not.
    variant("ending=eof_mid_event", Bill::Estimated(6)),
    variant("ending=eof_mid_event&usage_on=every", COMPLETE),
    variant("ending=reset", Bill::Estimated(6)).truncated(),
    variant("ending=reset&usage_on=every", COMPLETE).truncated(),
    variant("ending=reset&framing=cr", Bill::Estimated(6)).truncated(),
    variant(
        "ending=reset&framing=crlf&delivery=bytewise",
        Bill::Estimated(6),
    )
    .truncated(),
    variant("drop_after=3", Bill::Estimated(3)).truncated(),
    variant("drop_after=3&framing=cr", Bill::Estimated(3)).truncated(),
    // Usage placement.
    variant("usage_on=final", COMPLETE),
    variant("usage_on=null_then_final", COMPLETE),
    variant("usage_on=every", COMPLETE),
    variant("usage_on=every", Bill::Reported(10, 18)).choices(3),
    variant("usage_on=final", Bill::Reported(10, 12)).choices(2),
    variant("usage_on=finish_chunk", COMPLETE),
    variant("usage_on=zeros_then_final", COMPLETE),
    variant("usage_on=none", Bill::Estimated(6)),
    variant("usage_on=none", Bill::Estimated(12)).choices(2),
    variant("include_usage=never", Bill::Estimated(6)),
    variant("include_usage=always", COMPLETE),
    variant("omit_total=true", COMPLETE),
    variant("omit_total=true&usage_on=every", COMPLETE),
    variant("cached_tokens=4", COMPLETE).cached(4),
    variant("cached_tokens=0", COMPLETE),
    variant("cached_tokens=4&usage_on=every", COMPLETE).cached(4),
    variant("reasoning_tokens=3", COMPLETE),
    variant("extras=true", COMPLETE),
    variant("extras=true&usage_on=every", COMPLETE),
    // Ids and shapes.
    variant("id=empty", COMPLETE),
    variant("id=per_chunk", COMPLETE),
    variant("id=fixed", COMPLETE),
    // Errors inside a 200 (a 200 whose first event is an error is an error status:
    // `stream_ends::a_stream_whose_first_event_is_an_error_is_an_error_status`).
    variant("error_event=after:2", Bill::Estimated(2)).failing(MID),
    variant("error_event=after:2&then=eof", Bill::Estimated(2)).failing(MID),
    variant("error_event=after:2&usage_on=every", Bill::Reported(10, 2)).failing(MID),
    variant("error_event=after:2&error_shape=flat", Bill::Estimated(2)).failing(MID),
    variant("error_event=after:2&error_shape=string", Bill::Estimated(2)).failing(MID),
    variant("error_event=after:2&error_shape=detail", Bill::Estimated(2)).failing(MID),
    variant(
        "error_event=after:2&error_shape=nested_int_code",
        Bill::Estimated(2),
    )
    .failing(MID),
    // Completions.
    variant("framing=lf", COMPLETE).on("/v1/completions"),
    variant("usage_on=zeros_then_final", COMPLETE).on("/v1/completions"),
    variant("usage_on=none", Bill::Estimated(6)).on("/v1/completions"),
    variant("ending=reset", Bill::Estimated(6))
        .on("/v1/completions")
        .truncated(),
];

/// Streams `variant` through the gateway once; returns what the client read, what the
/// mock sends for the very same upstream request, and the request's events.
async fn run_variant(
    lab: &Lab,
    slug: &str,
    variant: &Variant,
    wants_usage: bool,
) -> (Vec<u8>, Vec<u8>, Vec<UsageEvent>, Value) {
    let body = variant.body(slug, wants_usage);
    let response = lab.post(variant.route, &body).send().await.unwrap();
    assert_eq!(response.status(), 200, "{variant:?}");
    assert_eq!(
        response.headers()["content-type"],
        "text/event-stream",
        "{variant:?}"
    );
    let id = request_id(&response);
    let client = response.bytes().await.unwrap().to_vec();
    let events = events_of(&lab.server, &id).await;
    let upstream = upstream_answer(&lab.server).await;
    (client, upstream, events, body)
}

#[tokio::test]
async fn every_upstream_variant_reaches_the_client_byte_for_byte_and_is_billed_exactly() {
    let scripts: Vec<(String, String)> = VARIANTS
        .iter()
        .enumerate()
        .map(|(i, v)| {
            (
                format!("v/{i}"),
                format!("echo?prompt_tokens=10&completion_tokens=6&{}", v.script),
            )
        })
        .collect();
    let borrowed: Vec<(&str, &str)> = scripts
        .iter()
        .map(|(s, t)| (s.as_str(), t.as_str()))
        .collect();
    let lab = Lab::start(&borrowed).await;
    let mut failures = Vec::new();
    for (i, variant) in VARIANTS.iter().enumerate() {
        let slug = format!("v/{i}");
        for wants_usage in [false, true] {
            let (client, upstream, events, body) =
                run_variant(&lab, &slug, variant, wants_usage).await;
            let mut expected = if wants_usage {
                upstream.clone()
            } else {
                without_usage_event(&upstream)
            };
            if variant.is_truncated {
                expected.extend_from_slice(TRUNCATION_EVENT.as_bytes());
            }
            let label = format!(
                "{} (n={}, {}, wants_usage={wants_usage})",
                variant.script, variant.n, variant.route
            );
            if normalized(&client) != normalized(&expected) {
                failures.push(format!(
                    "{label}: bytes differ\n--- client\n{:?}\n--- expected\n{:?}",
                    normalized(&client),
                    normalized(&expected)
                ));
            }
            let expected_event = match variant.bill {
                Bill::Reported(p, c) => Some(((p, c), false)),
                Bill::Estimated(c) => Some(((prompt_estimate(&body), c), true)),
            };
            match (expected_event, events.as_slice()) {
                (None, []) => {}
                (Some((tokens, estimated)), [event]) => {
                    let got = (
                        event.status,
                        event.input_tokens,
                        event.output_tokens,
                        event.is_estimated,
                        event.cached_input_tokens,
                    );
                    let want = (
                        variant.status,
                        tokens.0,
                        tokens.1,
                        estimated,
                        variant.cached,
                    );
                    if got != want {
                        failures.push(format!("{label}: event {got:?}, expected {want:?}"));
                    }
                }
                (want, got) => failures.push(format!("{label}: events {got:?}, expected {want:?}")),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

// --- upstream error statuses ----------------------------------------------------------

#[tokio::test]
async fn upstream_error_statuses_reach_the_client_openai_shaped_and_unbilled() {
    let statuses = [400_u16, 401, 403, 404, 413, 422, 429, 500, 503];
    let shapes = [
        "nested",
        "nested_int_code",
        "flat",
        "string",
        "detail",
        "text",
    ];
    let mut scripts = Vec::new();
    for status in statuses {
        for shape in shapes {
            scripts.push((
                format!("e/{status}-{shape}"),
                format!("echo?status={status}&error_shape={shape}&retry_after=7"),
            ));
        }
    }
    let borrowed: Vec<(&str, &str)> = scripts
        .iter()
        .map(|(s, t)| (s.as_str(), t.as_str()))
        .collect();
    let lab = Lab::start(&borrowed).await;
    let mut failures = Vec::new();
    for status in statuses {
        for shape in shapes {
            for stream in [false, true] {
                let slug = format!("e/{status}-{shape}");
                let body = json!({"model": slug, "messages": [], "stream": stream});
                let response = lab
                    .post("/v1/chat/completions", &body)
                    .send()
                    .await
                    .unwrap();
                let got_status = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_owned());
                let content_type = response.headers()["content-type"]
                    .to_str()
                    .unwrap()
                    .to_owned();
                let answer: Value = response.json().await.unwrap_or(Value::Null);
                let message = format!("mock upstream: scripted status {status}");
                // The upstream refusing the gateway's own credentials is not the caller's
                // doing: 502, whatever the body said.
                let (want_status, want_body) = match (status, shape) {
                    (401 | 403, _) => (
                        502,
                        json!({"error": {
                            "message": "The model server refused the gateway's credentials.",
                            "type": "upstream_error",
                            "param": null,
                            "code": "upstream_auth_failed",
                        }}),
                    ),
                    (_, "nested" | "nested_int_code") => {
                        let code = if shape == "nested" {
                            answer["error"]["code"].clone()
                        } else {
                            json!(status)
                        };
                        (
                            status,
                            json!({"error": {
                                "message": message,
                                "type": answer["error"]["type"].clone(),
                                "param": null,
                                "code": code,
                            }}),
                        )
                    }
                    _ => (
                        status,
                        json!({"error": {
                            "message": message,
                            "type": "upstream_error",
                            "param": null,
                            "code": "upstream_error",
                        }}),
                    ),
                };
                let want_retry = (want_status == status).then(|| "7".to_owned());
                let got = (
                    got_status,
                    &answer,
                    retry_after.as_deref(),
                    content_type.as_str(),
                );
                let want = (
                    want_status,
                    &want_body,
                    want_retry.as_deref(),
                    "application/json",
                );
                if got != want {
                    failures.push(format!(
                        "{status} {shape} stream={stream}: got {got:?}, want {want:?}"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(all_events(&lab.server).await.is_empty());
}

// --- methods ---------------------------------------------------------------------------

#[tokio::test]
async fn other_methods_on_data_routes_are_405_openai_shaped() {
    let lab = Lab::start(&[("acme/m", "echo")]).await;
    let cases = [
        ("GET", "/v1/chat/completions", "POST"),
        ("PUT", "/v1/chat/completions", "POST"),
        ("DELETE", "/v1/completions", "POST"),
        ("PATCH", "/v1/embeddings", "POST"),
        ("OPTIONS", "/v1/chat/completions", "POST"),
        ("POST", "/v1/models", "GET,HEAD"),
        ("DELETE", "/v1/models", "GET,HEAD"),
    ];
    for (method, path, allow) in cases {
        let response = lab
            .raw(method.parse().unwrap(), path)
            .bearer_auth(&lab.key)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 405, "{method} {path}");
        assert_eq!(response.headers()["allow"], allow, "{method} {path}");
        assert_eq!(response.headers()["content-type"], "application/json");
        assert!(response.headers().contains_key("x-request-id"));
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body,
            json!({"error": {
                "message": format!("Method {method} is not allowed on {path}."),
                "type": "invalid_request_error",
                "param": null,
                "code": "method_not_allowed",
            }}),
            "{method} {path}"
        );
    }
    assert!(lab.server.mock.requests().is_empty());
}

// --- odd request bodies ----------------------------------------------------------------

#[tokio::test]
async fn odd_request_fields_are_400_or_forwarded_verbatim() {
    let lab = Lab::start(&[("acme/m", "echo?prompt_tokens=3&completion_tokens=2")]).await;
    let send_raw = |body: &str| {
        lab.raw(reqwest::Method::POST, "/v1/chat/completions")
            .bearer_auth(&lab.key)
            .header("Content-Type", "application/json")
            .body(body.to_owned())
            .send()
    };
    let refused: &[(&str, &str, Value)] = &[
        (
            r#"{"model":"acme/m","stream":"yes"}"#,
            "`stream` must be a boolean.",
            json!("stream"),
        ),
        (
            r#"{"model":"acme/m","stream":1}"#,
            "`stream` must be a boolean.",
            json!("stream"),
        ),
        (
            r#"{"model":"acme/m","stream":"true"}"#,
            "`stream` must be a boolean.",
            json!("stream"),
        ),
        (
            r#"{"model":"acme/m","stream":true,"stream_options":"x"}"#,
            "`stream_options` must be an object.",
            json!("stream_options"),
        ),
        (
            r#"{"model":"acme/m","stream":true,"stream_options":[]}"#,
            "`stream_options` must be an object.",
            json!("stream_options"),
        ),
        (
            r#"{"model":5}"#,
            "`model` must be a string.",
            json!("model"),
        ),
        (
            r#"{"model":null}"#,
            "`model` must be a string.",
            json!("model"),
        ),
        (
            r#"{"model":["acme/m"]}"#,
            "`model` must be a string.",
            json!("model"),
        ),
        (
            r#"[{"model":"acme/m"}]"#,
            "The request body must be a JSON object.",
            Value::Null,
        ),
        (
            r#""acme/m""#,
            "The request body must be a JSON object.",
            Value::Null,
        ),
        (
            "null",
            "The request body must be a JSON object.",
            Value::Null,
        ),
        (
            "{\"model\":\"\\ud800\"}",
            "`model` must be a string.",
            json!("model"),
        ),
    ];
    for (body, message, param) in refused {
        let response = send_raw(body).await.unwrap();
        let (status, answer) = status_json(response).await;
        assert_eq!(
            (
                status,
                &answer["error"]["message"],
                &answer["error"]["param"]
            ),
            (400, &json!(message), param),
            "{body}: {answer}"
        );
        assert_eq!(answer["error"]["type"], "invalid_request_error");
    }
    for (body, slug) in [
        (r#"{"model":""}"#, ""),
        (r#"{"model":"ацме/м🚀"}"#, "ацме/м🚀"),
        (r#"{"model":" acme/m"}"#, " acme/m"),
        (r#"{"model":"ACME/M"}"#, "ACME/M"),
    ] {
        let (status, answer) = status_json(send_raw(body).await.unwrap()).await;
        assert_eq!(status, 404, "{body}");
        assert_eq!(
            answer["error"]["message"],
            format!("The model `{slug}` does not exist or you do not have access to it.")
        );
    }
    assert!(lab.server.mock.requests().is_empty());
    assert!(all_events(&lab.server).await.is_empty());

    // Not a stream: `stream_options` is the upstream's business and goes as sent.
    for body in [
        r#"{"model":"acme/m","stream":false,"stream_options":"x"}"#,
        r#"{"model":"acme/m","stream":false,"stream_options":{"include_usage":false}}"#,
        r#"{"model":"acme/m","stream":null,"stream_options":{"include_usage":true}}"#,
    ] {
        lab.server.mock.clear();
        let response = send_raw(body).await.unwrap();
        assert_eq!(response.status(), 200, "{body}");
        assert_eq!(response.headers()["content-type"], "application/json");
        let sent = lab.server.mock.requests().pop().unwrap();
        let expected = body.replace(
            r#""model":"acme/m""#,
            r#""model":"echo?prompt_tokens=3&completion_tokens=2""#,
        );
        assert_eq!(String::from_utf8_lossy(&sent.raw_body), expected);
    }

    // Duplicate keys: the last one wins, for the gateway and for the upstream alike, so
    // the slug checked is the slug called.
    lab.server.mock.clear();
    let body = r#"{"model":"other/x","messages":[],"model":"acme/m","stream":false,"stream":true}"#;
    let response = send_raw(body).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    response.bytes().await.unwrap();
    let sent = lab.server.mock.requests().pop().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&sent.raw_body),
        r#"{"model":"echo?prompt_tokens=3&completion_tokens=2","messages":[],"stream":true,"stream_options":{"include_usage":true}}"#
    );
    let body = r#"{"model":"acme/m","model":"other/x"}"#;
    assert_eq!(send_raw(body).await.unwrap().status(), 404);
    assert_eq!(all_events(&lab.server).await.len(), 4);
}

// --- headers ---------------------------------------------------------------------------

#[tokio::test]
async fn authorization_spellings_and_duplicates() {
    let lab = Lab::start(&[("acme/m", "echo?prompt_tokens=3&completion_tokens=2")]).await;
    let body = json!({"model": "acme/m", "messages": []});
    let send = |values: Vec<String>| {
        let mut builder = lab
            .raw(reqwest::Method::POST, "/v1/chat/completions")
            .json(&body);
        for value in values {
            builder = builder.header("Authorization", value);
        }
        builder.send()
    };
    let key = &lab.key;
    for accepted in [
        format!("bearer {key}"),
        format!("BEARER {key}"),
        format!("Bearer   {key}"),
        format!("api-key {key}"),
        format!("API-KEY {key}"),
        format!("Bearer {key}   "),
    ] {
        let response = send(vec![accepted.clone()]).await.unwrap();
        assert_eq!(response.status(), 200, "{accepted:?}");
    }
    let malformed = "The Authorization header must be 'Bearer <key>' or 'Api-Key <key>'.";
    let incorrect = "Incorrect API key provided.";
    let once = "Send exactly one Authorization header.";
    let cases = [
        (vec![format!("Bearer\t{key}")], malformed),
        (vec![format!("Token {key}")], malformed),
        (vec![format!("Bearer {key} extra")], malformed),
        (vec![format!("Bearer{key}")], malformed),
        (
            vec![format!("Bearer {}.{}", &key[..16], "A".repeat(32))],
            incorrect,
        ),
        (vec![format!("Bearer {}", &key[..16])], incorrect),
        (vec![format!("Bearer {key}x")], incorrect),
        (vec![format!("Bearer {}", key.to_uppercase())], incorrect),
        // Not visible ASCII: no key can look like this.
        (vec![format!("Bearer tg_é{}", &key[4..])], malformed),
        // Two credentials are ambiguous, even when one of them is good.
        (
            vec![format!("Bearer {key}"), "Bearer nope".to_owned()],
            once,
        ),
        (
            vec!["Bearer nope".to_owned(), format!("Bearer {key}")],
            once,
        ),
        (vec![format!("Bearer {key}"), format!("Bearer {key}")], once),
    ];
    for (values, message) in cases {
        let (status, answer) = status_json(send(values.clone()).await.unwrap()).await;
        assert_eq!(
            (status, answer["error"]["message"].as_str()),
            (401, Some(message)),
            "{values:?}"
        );
        assert_eq!(answer["error"]["code"], "invalid_api_key");
    }
    assert_eq!(all_events(&lab.server).await.len(), 6);
    assert_eq!(lab.server.mock.requests().len(), 6);
}

#[tokio::test]
async fn request_metadata_edges() {
    let lab = Lab::start(&[("acme/m", "echo?prompt_tokens=3&completion_tokens=2")]).await;
    let body = json!({"model": "acme/m", "messages": []});
    let send = |value: reqwest::header::HeaderValue| {
        lab.post("/v1/chat/completions", &body)
            .header("X-Request-Metadata", value)
            .send()
    };
    let exactly = |len: usize| {
        let shell = r#"{"k":""}"#.len();
        format!(r#"{{"k":"{}"}}"#, "x".repeat(len - shell))
    };
    let nested = r#"{"a":{"b":[1,{"c":null,"d":"é🚀"}],"e":{}},"f":-1.5e3}"#.to_owned();
    for accepted in [nested, exactly(4096), "{}".to_owned()] {
        let response = send(accepted.parse().unwrap()).await.unwrap();
        assert_eq!(response.status(), 200, "{accepted}");
        let event = events_of(&lab.server, &request_id(&response))
            .await
            .pop()
            .unwrap();
        assert_eq!(event.request_metadata.as_deref(), Some(accepted.as_str()));
    }
    let refused = [
        (
            exactly(4097),
            "X-Request-Metadata must be at most 4096 bytes.",
        ),
        (
            "{\"a\":\"\u{e9}\"".to_owned(),
            "X-Request-Metadata must be valid JSON.",
        ),
        (
            "null".to_owned(),
            "X-Request-Metadata must be a JSON object.",
        ),
    ];
    for (value, message) in refused {
        let value = reqwest::header::HeaderValue::from_bytes(value.as_bytes()).unwrap();
        let (status, answer) = status_json(send(value).await.unwrap()).await;
        assert_eq!(
            (status, answer["error"]["message"].as_str()),
            (400, Some(message))
        );
    }
    let invalid_utf8 = reqwest::header::HeaderValue::from_bytes(b"{\"a\":\"\xff\"}").unwrap();
    let (status, answer) = status_json(send(invalid_utf8).await.unwrap()).await;
    assert_eq!(
        (status, answer["error"]["message"].as_str()),
        (400, Some("X-Request-Metadata must be UTF-8."))
    );
    let twice = lab
        .post("/v1/chat/completions", &body)
        .header("X-Request-Metadata", r#"{"a":1}"#)
        .header("X-Request-Metadata", r#"{"b":2}"#)
        .send()
        .await
        .unwrap();
    let (status, answer) = status_json(twice).await;
    assert_eq!(
        (status, answer["error"]["message"].as_str()),
        (400, Some("X-Request-Metadata must be sent once."))
    );
    assert_eq!(lab.server.mock.requests().len(), 3);
    assert_eq!(all_events(&lab.server).await.len(), 3);
}

// --- concurrency -----------------------------------------------------------------------

#[tokio::test]
async fn fifty_concurrent_streams_are_each_billed_exactly_once() {
    let lab = Lab::start(&[(
        "acme/m",
        "echo?prompt_tokens=10&completion_tokens=20&interval_ms=5&usage_on=every",
    )])
    .await;
    let body = json!({"model": "acme/m", "messages": [{"role": "user", "content": PROMPT}], "stream": true});
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(50));
    let calls = (0..50).map(|_| {
        let request = lab.post("/v1/chat/completions", &body);
        let barrier = barrier.clone();
        async move {
            barrier.wait().await;
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            let id = request_id(&response);
            let text = response.text().await.unwrap();
            assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
            id
        }
    });
    let mut ids = futures::future::join_all(calls).await;
    ids.sort_unstable();
    let events = all_events(&lab.server).await;
    let mut billed: Vec<String> = events.iter().map(|e| e.request_id.clone()).collect();
    billed.sort_unstable();
    assert_eq!(billed, ids);
    for event in &events {
        assert_event(event, UsageStatus::Completed, (10, 20), false);
    }
    let mut keys: Vec<&str> = events.iter().map(|e| e.idempotency_key.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), 50);
}

// --- clients leaving ---------------------------------------------------------------------

#[tokio::test]
async fn a_client_leaving_before_the_upstream_answers_is_not_billed_and_the_upstream_is_closed() {
    let lab = Lab::start(&[(
        "acme/m",
        "echo?prompt_tokens=10&completion_tokens=6&latency_ms=1500",
    )])
    .await;
    for stream in [true, false] {
        lab.server.mock.clear();
        let body = json!({"model": "acme/m", "messages": [], "stream": stream});
        let sent = lab
            .post("/v1/chat/completions", &body)
            .timeout(Duration::from_millis(300))
            .send()
            .await;
        assert!(sent.unwrap_err().is_timeout());
        assert!(
            lab.server
                .mock
                .wait_for_disconnects(1, Duration::from_secs(5))
                .await,
            "stream={stream}"
        );
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(all_events(&lab.server).await.is_empty());
}

#[tokio::test]
async fn a_client_leaving_after_the_first_byte_is_billed_once_never_zero() {
    let lab = Lab::start(&[
        (
            "acme/plain",
            "echo?prompt_tokens=10&completion_tokens=50&interval_ms=50",
        ),
        (
            "acme/running",
            "echo?prompt_tokens=10&completion_tokens=50&interval_ms=50&usage_on=every",
        ),
    ])
    .await;
    for (slug, wants_usage) in [("acme/plain", false), ("acme/running", true)] {
        lab.server.mock.clear();
        let mut body = json!({"model": slug, "messages": [{"role": "user", "content": PROMPT}], "stream": true});
        if wants_usage {
            body["stream_options"] = json!({"include_usage": true});
        }
        let response = lab
            .post("/v1/chat/completions", &body)
            .send()
            .await
            .unwrap();
        let id = request_id(&response);
        let mut stream = response.bytes_stream();
        let first = stream.next().await.unwrap().unwrap();
        assert!(first.starts_with(b"data: {"), "{first:?}");
        drop(stream);
        let event = wait_for_event(&lab.server, &id).await;
        assert_eq!(event.status, UsageStatus::ClientCancelled, "{slug}");
        if wants_usage {
            // The opening chunk's running usage: the prompt, no completion yet.
            assert_eq!(
                (event.input_tokens, event.is_estimated),
                (10, false),
                "{event:?}"
            );
        } else {
            assert_eq!(
                (event.input_tokens, event.is_estimated),
                (prompt_estimate(&body), true)
            );
        }
        assert!(event.output_tokens < 50, "{event:?}");
        assert!(
            lab.server
                .mock
                .wait_for_disconnects(1, Duration::from_secs(5))
                .await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(events_of(&lab.server, &id).await.len(), 1);
    }
}

#[tokio::test]
async fn a_client_leaving_right_before_done_is_billed_once_with_the_reported_usage() {
    let lab = Lab::start(&[(
        "acme/m",
        "echo?prompt_tokens=10&completion_tokens=6&interval_ms=500",
    )])
    .await;
    let body = json!({
        "model": "acme/m",
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let response = lab
        .post("/v1/chat/completions", &body)
        .send()
        .await
        .unwrap();
    let id = request_id(&response);
    let mut stream = response.bytes_stream();
    let mut text = String::new();
    while !text.contains("\"choices\":[]") {
        text.push_str(&String::from_utf8_lossy(
            &stream.next().await.unwrap().unwrap(),
        ));
    }
    drop(stream);
    let event = wait_for_event(&lab.server, &id).await;
    assert_event(&event, UsageStatus::ClientCancelled, (10, 6), false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(events_of(&lab.server, &id).await.len(), 1);
}

// --- stalls --------------------------------------------------------------------------------

/// A server whose upstreams must send something at least every 400 ms.
async fn impatient_lab(scripts: &[(&str, &str)]) -> Lab {
    let server =
        TestServer::start_with(|config| config.upstream_timeout = Duration::from_millis(400)).await;
    Lab::on(server, scripts).await
}

#[tokio::test]
async fn a_stream_that_stalls_is_ended_with_an_error_event_and_billed_as_cut() {
    let lab = impatient_lab(&[
        (
            "acme/content",
            "echo?prompt_tokens=10&completion_tokens=6&ending=stall",
        ),
        ("acme/nothing", "echo?completion_tokens=0&ending=stall"),
    ])
    .await;
    // Completions have no opening chunk: nothing at all after the headers. The gateway
    // holds the headers until the first event, so this is a timeout, not billed.
    let body = json!({"model": "acme/nothing", "prompt": PROMPT, "stream": true});
    let started = std::time::Instant::now();
    let response = lab
        .post("/v1/completions", &body)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    let id = request_id(&response);
    let (status, answer) = status_json(response).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(status, 504);
    assert_eq!(answer["error"]["code"], "upstream_timeout");
    assert!(events_of(&lab.server, &id).await.is_empty());
    assert!(
        lab.server
            .mock
            .wait_for_disconnects(1, Duration::from_secs(5))
            .await,
        "the silent upstream must be closed"
    );
    for (path, slug, body, completion) in [(
        "/v1/chat/completions",
        "acme/content",
        json!({"model": "acme/content", "messages": [{"role": "user", "content": PROMPT}], "stream": true}),
        6,
    )] {
        lab.server.mock.clear();
        let started = std::time::Instant::now();
        let response = lab
            .post(path, &body)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let id = request_id(&response);
        let text = response.text().await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(3), "{slug}");
        assert!(text.ends_with(TRUNCATION_EVENT), "{slug}: {text}");
        let upstream =
            upstream_answer_prefix(&lab.server, text.len() - TRUNCATION_EVENT.len()).await;
        assert_eq!(
            normalized(text.strip_suffix(TRUNCATION_EVENT).unwrap().as_bytes()),
            normalized(&upstream),
            "{slug}"
        );
        let event = events_of(&lab.server, &id).await.pop().unwrap();
        assert_event(
            &event,
            UsageStatus::UpstreamErrorMidStream,
            (prompt_estimate(&body), completion),
            true,
        );
        assert!(
            lab.server
                .mock
                .wait_for_disconnects(1, Duration::from_secs(5))
                .await,
            "{slug}: the stalled upstream must be closed"
        );
    }
}

/// The first `len` bytes the mock sends for the gateway's last request (for answers that
/// never end).
async fn upstream_answer_prefix(server: &TestServer, len: usize) -> Vec<u8> {
    let sent = server.mock.requests().pop().unwrap();
    let response = reqwest::Client::new()
        .post(format!("http://{}{}", server.mock.addr(), sent.path))
        .body(sent.raw_body.clone())
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    let mut out = Vec::new();
    while out.len() < len {
        match tokio::time::timeout(Duration::from_secs(2), stream.next()).await {
            Ok(Some(Ok(chunk))) => out.extend_from_slice(&chunk),
            _ => break,
        }
    }
    out
}

#[tokio::test]
async fn an_error_event_followed_by_silence_ends_the_stream() {
    let lab = impatient_lab(&[
        (
            "acme/mid",
            "echo?prompt_tokens=10&completion_tokens=6&error_event=after:2&then=nothing",
        ),
        ("acme/first", "echo?error_event=first&then=nothing"),
    ])
    .await;
    // A first event that is an error is answered at once as an error status, whatever
    // the upstream does next.
    let body = json!({"model": "acme/first", "messages": [{"role": "user", "content": PROMPT}], "stream": true});
    let response = lab
        .post("/v1/chat/completions", &body)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    let id = request_id(&response);
    let (status, answer) = status_json(response).await;
    assert_eq!(status, 502);
    assert_eq!(
        answer["error"]["message"],
        "mock upstream: failure while generating"
    );
    assert!(events_of(&lab.server, &id).await.is_empty());
    for (slug, billed) in [("acme/mid", true)] {
        let body = json!({"model": slug, "messages": [{"role": "user", "content": PROMPT}], "stream": true});
        let response = lab
            .post("/v1/chat/completions", &body)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap();
        let id = request_id(&response);
        let text = response.text().await.unwrap();
        // The error event is the last thing the client sees: no truncation event on top.
        let last = text.trim_end().rsplit("\n\n").next().unwrap();
        assert_eq!(
            last,
            "data: {\"error\":{\"code\":\"internal_error\",\"message\":\"mock upstream: failure while generating\",\"param\":null,\"type\":\"server_error\"}}",
            "{slug}"
        );
        let events = events_of(&lab.server, &id).await;
        if billed {
            assert_eq!(events.len(), 1);
            assert_event(
                &events[0],
                UsageStatus::UpstreamErrorMidStream,
                (prompt_estimate(&body), 2),
                true,
            );
        } else {
            assert!(events.is_empty());
        }
    }
}

#[tokio::test]
async fn a_client_leaving_after_an_error_event_bills_the_upstream_error() {
    let lab = Lab::start(&[(
        "acme/m",
        "echo?prompt_tokens=10&completion_tokens=6&error_event=after:2&then=nothing",
    )])
    .await;
    let body = json!({"model": "acme/m", "messages": [{"role": "user", "content": PROMPT}], "stream": true});
    let response = lab
        .post("/v1/chat/completions", &body)
        .send()
        .await
        .unwrap();
    let id = request_id(&response);
    let mut stream = response.bytes_stream();
    let mut text = String::new();
    while !text.contains("\"error\"") {
        text.push_str(&String::from_utf8_lossy(
            &stream.next().await.unwrap().unwrap(),
        ));
    }
    drop(stream);
    let event = wait_for_event(&lab.server, &id).await;
    assert_event(
        &event,
        UsageStatus::UpstreamErrorMidStream,
        (prompt_estimate(&body), 2),
        true,
    );
}

// --- sizes -----------------------------------------------------------------------------------

#[tokio::test]
async fn events_over_a_mebibyte_pass_whole_and_usage_is_still_read() {
    let lab = Lab::start(&[("acme/m", "echo?prompt_tokens=10&completion_tokens=3")]).await;
    let word = "w".repeat(3 * 1024 * 1024);
    for wants_usage in [false, true] {
        let mut body = json!({"model": "acme/m", "messages": [{"role": "user", "content": word}], "stream": true});
        if wants_usage {
            body["stream_options"] = json!({"include_usage": true});
        }
        let response = lab
            .post("/v1/chat/completions", &body)
            .send()
            .await
            .unwrap();
        let id = request_id(&response);
        let client = response.bytes().await.unwrap();
        let upstream = upstream_answer(&lab.server).await;
        let expected = if wants_usage {
            upstream
        } else {
            without_usage_event(&upstream)
        };
        assert!(client.len() > 9 * 1024 * 1024);
        assert!(
            normalized(&client) == normalized(&expected),
            "wants_usage={wants_usage}"
        );
        let event = events_of(&lab.server, &id).await.pop().unwrap();
        assert_event(&event, UsageStatus::Completed, (10, 3), false);
    }
}

#[tokio::test]
async fn a_long_stream_passes_every_byte() {
    let lab = Lab::start(&[("acme/m", "echo?prompt_tokens=10&completion_tokens=20000")]).await;
    let word = "x".repeat(1000);
    let body =
        json!({"model": "acme/m", "messages": [{"role": "user", "content": word}], "stream": true});
    let response = lab
        .post("/v1/chat/completions", &body)
        .send()
        .await
        .unwrap();
    let id = request_id(&response);
    let client = response.bytes().await.unwrap();
    let upstream = upstream_answer(&lab.server).await;
    assert!(client.len() > 20_000_000);
    assert!(normalized(&client) == normalized(&without_usage_event(&upstream)));
    let event = events_of(&lab.server, &id).await.pop().unwrap();
    assert_event(&event, UsageStatus::Completed, (10, 20000), false);
}

#[tokio::test]
async fn a_complete_answer_over_64_mib_is_502_and_not_billed() {
    let lab = Lab::start(&[("acme/m", "echo?prompt_tokens=10&completion_tokens=70000")]).await;
    let word = "x".repeat(1000);
    let body = json!({"model": "acme/m", "messages": [{"role": "user", "content": word}]});
    let response = lab
        .post("/v1/chat/completions", &body)
        .send()
        .await
        .unwrap();
    let (status, answer) = status_json(response).await;
    assert_eq!(status, 502);
    assert_eq!(answer["error"]["code"], "upstream_invalid_response");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(all_events(&lab.server).await.is_empty());
}

#[tokio::test]
async fn a_one_megabyte_header_is_refused_before_any_route() {
    let lab = Lab::start(&[("acme/m", "echo")]).await;
    let body = json!({"model": "acme/m", "messages": []});
    let huge = "a".repeat(1024 * 1024);
    for (name, value) in [
        ("Authorization", format!("Bearer {huge}")),
        ("X-Request-Metadata", format!(r#"{{"k":"{huge}"}}"#)),
        ("X-Padding", huge.clone()),
    ] {
        let response = lab
            .post("/v1/chat/completions", &body)
            .header(name, value)
            .send()
            .await
            .unwrap();
        // hyper answers before any handler runs: no body, never a 5xx.
        assert_eq!(response.status(), 431, "{name}");
    }
    assert!(lab.server.mock.requests().is_empty());
    assert!(all_events(&lab.server).await.is_empty());
}

#[tokio::test]
async fn fifty_concurrent_streams_half_abandoned_are_each_billed_once_never_zero() {
    let lab = Lab::start(&[(
        "acme/m",
        "echo?prompt_tokens=10&completion_tokens=30&interval_ms=20",
    )])
    .await;
    let body = json!({"model": "acme/m", "messages": [{"role": "user", "content": PROMPT}], "stream": true});
    let calls = (0..50_usize).map(|i| {
        let request = lab.post("/v1/chat/completions", &body);
        async move {
            let response = request.send().await.unwrap();
            let id = request_id(&response);
            if i % 2 == 0 {
                response.bytes().await.unwrap();
                return (id, true);
            }
            // Leave after between 1 and 5 reads.
            let mut stream = response.bytes_stream();
            for _ in 0..=(i % 5) {
                stream.next().await.unwrap().unwrap();
            }
            (id, false)
        }
    });
    let outcomes = futures::future::join_all(calls).await;
    for (id, is_read_to_end) in outcomes {
        let event = wait_for_event(&lab.server, &id).await;
        // A client that left late may still have been sent everything first.
        if is_read_to_end || event.status == UsageStatus::Completed {
            assert_event(&event, UsageStatus::Completed, (10, 30), false);
        } else {
            assert_eq!(event.status, UsageStatus::ClientCancelled, "{event:?}");
            assert_eq!(event.input_tokens, prompt_estimate(&body), "{event:?}");
            assert!(event.is_estimated && event.output_tokens <= 30, "{event:?}");
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(all_events(&lab.server).await.len(), 50);
}
