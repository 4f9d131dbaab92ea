//! The mock's HTTP surface: every request is recorded, then answered by route.
//!
//! One fallback handler instead of a route table, so requests to paths the mock does not
//! serve are recorded too (a test can assert the gateway never called upstream).

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Router;
use http::{header, HeaderValue, Method, StatusCode};
use serde_json::{json, Value};

use crate::journal::{AnswerGuard, RecordedRequest, Recorder};
use crate::net::ConnectionReset;
use crate::reply::{error_body, Api, Reply};
use crate::script::{ErrorShape, Script};
use crate::stream;

/// Largest request body the mock reads (beyond any gateway's limit).
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

pub(crate) fn router(recorder: Recorder) -> Router {
    Router::new().fallback(answer).with_state(recorder)
}

async fn answer(State(recorder): State<Recorder>, request: Request) -> Response {
    let reset = request
        .extensions()
        .get::<ConnectionReset>()
        .cloned()
        .unwrap_or_default();
    let (parts, body) = request.into_parts();
    let raw_body = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(bytes) => bytes,
        Err(_) => {
            return mock_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "mock upstream: body unreadable or over 64 MiB",
            )
        }
    };
    let body: Value = serde_json::from_slice(&raw_body).unwrap_or(Value::Null);
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), ToString::to_string);
    let mut guard = recorder.record(RecordedRequest {
        method: parts.method.clone(),
        path: path.clone(),
        headers: parts.headers,
        body: body.clone(),
        raw_body,
        is_cut_by_client: false,
    });
    let seq = guard.seq();
    let api = match (parts.method, parts.uri.path()) {
        (Method::POST, "/v1/chat/completions") => Some(Api::Chat),
        (Method::POST, "/v1/completions") => Some(Api::Completions),
        (Method::POST, "/v1/embeddings") => None,
        (Method::GET, "/v1/models") => {
            guard.finish();
            return models();
        }
        (_, "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings" | "/v1/models") => {
            guard.finish();
            return mock_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "mock upstream: method not allowed",
            );
        }
        (method, _) => {
            guard.finish();
            return mock_error(
                StatusCode::NOT_FOUND,
                &format!("mock upstream: no route for {method} {path}"),
            );
        }
    };
    let script = match read_script(&body) {
        Ok(script) => script,
        Err(message) => {
            guard.finish();
            return mock_error(StatusCode::BAD_REQUEST, &message);
        }
    };
    if !script.latency.is_zero() {
        tokio::time::sleep(script.latency).await;
    }
    if let Some(status) = script.status {
        guard.finish();
        return error_status(&script, status);
    }
    match api {
        Some(api) => completion(api, script, &body, seq, guard, reset),
        None => {
            guard.finish();
            embeddings(&script, &body)
        }
    }
}

fn read_script(body: &Value) -> Result<Script, String> {
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .ok_or("mock upstream: the body must be a JSON object with a string `model`")?;
    Script::parse(model).map_err(|e| e.0)
}

fn completion(
    api: Api,
    script: Script,
    body: &Value,
    seq: u64,
    mut guard: AnswerGuard,
    reset: ConnectionReset,
) -> Response {
    let (text, prompt_bytes) = match api {
        Api::Chat => chat_prompt(body),
        Api::Completions => completions_prompt(body),
    };
    let reply = Reply::new(api, script, body, &text, prompt_bytes, seq);
    let is_stream = body.get("stream").and_then(Value::as_bool) == Some(true);
    if !is_stream {
        guard.finish();
        let answer = reply.body();
        if reply.script.error_shape == ErrorShape::Text && reply.script.error_event.is_some() {
            return text_response(StatusCode::OK, answer.as_str().unwrap_or_default());
        }
        return axum::Json(answer).into_response();
    }
    let wire = stream::wire(
        &reply.stream(),
        reply.script.framing,
        reply.script.delivery,
        reply.script.interval,
    );
    let mut response = Body::from_stream(stream::body(wire, guard, reset)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// The last user message's text (what to echo) and the size of all messages' text.
fn chat_prompt(body: &Value) -> (String, usize) {
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let text_of = |message: &Value| -> String {
        match message.get("content") {
            Some(Value::String(text)) => text.clone(),
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|part| part.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(" "),
            _ => String::new(),
        }
    };
    let prompt_bytes = messages.iter().map(|m| text_of(m).len()).sum();
    let echo = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(text_of)
        .unwrap_or_default();
    (echo, prompt_bytes)
}

/// The prompt (the last one when several) and the size of all prompts.
fn completions_prompt(body: &Value) -> (String, usize) {
    let prompts: Vec<String> = match body.get("prompt") {
        Some(Value::String(text)) => vec![text.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|item| item.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    let bytes = prompts.iter().map(String::len).sum();
    (prompts.last().cloned().unwrap_or_default(), bytes)
}

fn embeddings(script: &Script, body: &Value) -> Response {
    let inputs: Vec<(String, usize)> = match body.get("input") {
        Some(Value::String(text)) => vec![(text.clone(), text.len())],
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => {
            vec![(Value::Array(items.clone()).to_string(), items.len() * 4)]
        }
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(text) => (text.clone(), text.len()),
                Value::Array(tokens) => (item.to_string(), tokens.len() * 4),
                other => (other.to_string(), other.to_string().len()),
            })
            .collect(),
        _ => Vec::new(),
    };
    let dimensions = body
        .get("dimensions")
        .and_then(Value::as_u64)
        .unwrap_or(8)
        .clamp(1, 4096);
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, (text, _))| {
            json!({"object": "embedding", "index": index, "embedding": vector(text, dimensions)})
        })
        .collect();
    let bytes: usize = inputs.iter().map(|(_, bytes)| bytes).sum();
    let tokens = script.prompt_tokens.unwrap_or((bytes as u64).div_ceil(4));
    axum::Json(json!({
        "object": "list",
        "data": data,
        "model": script.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response()
}

/// A deterministic unit-ish vector derived from the text (FNV-1a, then a xorshift walk).
fn vector(text: &str, dimensions: u64) -> Vec<f64> {
    let mut state = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    (0..dimensions)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 2001) as f64 / 1000.0 - 1.0
        })
        .collect()
}

fn models() -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{"id": "echo", "object": "model", "created": 0, "owned_by": "tollgate-testkit"}],
    }))
    .into_response()
}

fn error_status(script: &Script, status: u16) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let message = format!("mock upstream: scripted status {status}");
    let mut response = match script.error_shape {
        ErrorShape::Text => text_response(code, &message),
        shape => (code, axum::Json(error_body(shape, status, &message))).into_response(),
    };
    if let Some(seconds) = script.retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

fn text_response(status: StatusCode, text: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        text.to_owned(),
    )
        .into_response()
}

/// The mock's own complaints (a bad script, an unknown route): OpenAI-shaped.
fn mock_error(status: StatusCode, message: &str) -> Response {
    let body = json!({
        "error": {"message": message, "type": "mock_upstream_error", "param": null, "code": null},
    });
    (status, axum::Json(body)).into_response()
}
