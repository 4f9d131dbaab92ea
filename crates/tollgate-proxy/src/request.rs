//! The client's request: the body read under a hard size cap, parsed just enough to find
//! `model`, `stream` and `stream_options`, and rewritten for the upstream.
//!
//! The top level is kept as an ordered map of raw JSON values, so every field the gateway
//! does not touch reaches the upstream byte-identical (`forwards_other_fields_verbatim`).

use axum::body::Body;
use axum::http::{header, HeaderMap};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use indexmap::IndexMap;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;

use crate::error::ProxyError;

/// Largest `X-Request-Metadata` header accepted.
pub const MAX_METADATA_BYTES: usize = 4096;

/// How much of an over-limit body is read and discarded before answering 413, so the
/// client sees the answer instead of a connection reset. Past this, the connection is
/// closed unread.
const DRAIN_BUDGET: usize = 32 * 1024 * 1024;

/// The inference routes; each is forwarded to the same path under the target's base URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InferenceRoute {
    ChatCompletions,
    Completions,
    Embeddings,
}

impl InferenceRoute {
    /// Path under the target's `base_url`.
    pub fn upstream_path(self) -> &'static str {
        match self {
            InferenceRoute::ChatCompletions => "chat/completions",
            InferenceRoute::Completions => "completions",
            InferenceRoute::Embeddings => "embeddings",
        }
    }

    fn can_stream(self) -> bool {
        self != InferenceRoute::Embeddings
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Reads the whole body, refusing it (413) as soon as it passes `limit` bytes, whether
/// or not a Content-Length announced it. Memory never exceeds `limit`.
pub async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, ProxyError> {
    let too_large = ProxyError::PayloadTooLarge { limit };
    let announced = content_length(headers);
    let mut stream = body.into_data_stream();
    if announced.is_some_and(|len| len > limit as u64) {
        // A client waiting for `100 Continue` has not sent the body: do not ask for it.
        if !expects_continue(headers) {
            drain(&mut stream).await;
        }
        return Err(too_large);
    }
    let capacity = announced.map_or(0, |len| usize::try_from(len).unwrap_or(0));
    let mut buffer = BytesMut::with_capacity(capacity.min(limit));
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ProxyError::bad_request(format!("The request body could not be read ({e})."), None)
        })?;
        if buffer.len().saturating_add(chunk.len()) > limit {
            drain(&mut stream).await;
            return Err(too_large);
        }
        buffer.extend_from_slice(&chunk);
    }
    Ok(buffer.freeze())
}

async fn drain(stream: &mut axum::body::BodyDataStream) {
    let mut discarded = 0_usize;
    while let Some(Ok(chunk)) = stream.next().await {
        discarded = discarded.saturating_add(chunk.len());
        if discarded > DRAIN_BUDGET {
            return;
        }
    }
}

/// `X-Request-Metadata`: one JSON object of at most 4 KiB, kept as sent. Two headers are
/// refused rather than one of them billed silently.
pub fn request_metadata(headers: &HeaderMap) -> Result<Option<String>, ProxyError> {
    let mut values = headers.get_all("x-request-metadata").iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let bad = |why: &str| ProxyError::bad_request(format!("X-Request-Metadata {why}."), None);
    if values.next().is_some() {
        return Err(bad("must be sent once"));
    }
    if value.len() > MAX_METADATA_BYTES {
        return Err(bad(&format!("must be at most {MAX_METADATA_BYTES} bytes")));
    }
    let text = std::str::from_utf8(value.as_bytes()).map_err(|_| bad("must be UTF-8"))?;
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(_)) => Ok(Some(text.to_owned())),
        Ok(_) => Err(bad("must be a JSON object")),
        Err(_) => Err(bad("must be valid JSON")),
    }
}

/// A parsed inference request, ready to be rewritten for a target.
#[derive(Debug)]
pub struct ParsedRequest {
    /// The slug the client asked for.
    pub model: String,
    /// `stream: true` on a route that streams.
    pub is_stream: bool,
    /// The client set `stream_options.include_usage: true` itself.
    pub client_wants_usage: bool,
    /// Size of the client's body, for the prompt estimate.
    pub body_len: usize,
    fields: IndexMap<String, Box<RawValue>>,
}

impl ParsedRequest {
    pub fn parse(body: &[u8], route: InferenceRoute) -> Result<Self, ProxyError> {
        let text = std::str::from_utf8(body).map_err(|e| {
            ProxyError::bad_request(
                format!(
                    "The request body is not valid UTF-8 (at byte {}).",
                    e.valid_up_to()
                ),
                None,
            )
        })?;
        let mut fields: IndexMap<String, Box<RawValue>> = match serde_json::from_str(text) {
            Ok(fields) => fields,
            Err(e) => {
                let message = if serde_json::from_str::<IgnoredAny>(text).is_ok() {
                    "The request body must be a JSON object.".to_owned()
                } else {
                    format!("The request body is not valid JSON ({e}).")
                };
                return Err(ProxyError::bad_request(message, None));
            }
        };
        let model = match fields.get("model") {
            None => {
                return Err(ProxyError::bad_request(
                    "You must provide a model parameter.",
                    Some("model"),
                ))
            }
            Some(raw) => serde_json::from_str::<String>(raw.get())
                .map_err(|_| ProxyError::bad_request("`model` must be a string.", Some("model")))?,
        };
        let is_stream = match fields.get("stream") {
            None => false,
            Some(raw) => serde_json::from_str::<Option<bool>>(raw.get())
                .map_err(|_| {
                    ProxyError::bad_request("`stream` must be a boolean.", Some("stream"))
                })?
                .unwrap_or(false),
        } && route.can_stream();
        let mut client_wants_usage = false;
        if is_stream {
            let (options, wants) =
                stream_options_with_usage(fields.get("stream_options").map(|raw| &**raw))?;
            client_wants_usage = wants;
            fields.insert("stream_options".to_owned(), options);
        }
        Ok(Self {
            model,
            is_stream,
            client_wants_usage,
            body_len: body.len(),
            fields,
        })
    }

    /// The body to send to a target: `model` replaced by `target_model`, everything else
    /// as parsed (with `include_usage` already merged for streams).
    pub fn upstream_body(&self, target_model: &str) -> Result<Bytes, ProxyError> {
        let model = serde_json::value::to_raw_value(target_model)
            .map_err(|e| ProxyError::Internal(format!("encoding target_model: {e}")))?;
        let mut out = Vec::with_capacity(self.body_len.saturating_add(target_model.len()));
        out.push(b'{');
        for (i, (name, value)) in self.fields.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            serde_json::to_writer(&mut out, name)
                .map_err(|e| ProxyError::Internal(format!("encoding a field name: {e}")))?;
            out.push(b':');
            let value = if name == "model" { &model } else { value };
            out.extend_from_slice(value.get().as_bytes());
        }
        out.push(b'}');
        Ok(Bytes::from(out))
    }
}

/// The client's `stream_options` with `include_usage: true` merged in, and whether the
/// client had asked for usage itself.
fn stream_options_with_usage(
    current: Option<&RawValue>,
) -> Result<(Box<RawValue>, bool), ProxyError> {
    let invalid = || {
        ProxyError::bad_request(
            "`stream_options` must be an object.",
            Some("stream_options"),
        )
    };
    let mut options: IndexMap<String, Box<RawValue>> = match current {
        None => IndexMap::new(),
        Some(raw) if raw.get().trim() == "null" => IndexMap::new(),
        Some(raw) => serde_json::from_str(raw.get()).map_err(|_| invalid())?,
    };
    let wants = options
        .get("include_usage")
        .is_some_and(|raw| raw.get().trim() == "true");
    let flag = serde_json::value::to_raw_value(&true)
        .map_err(|e| ProxyError::Internal(format!("encoding include_usage: {e}")))?;
    options.insert("include_usage".to_owned(), flag);
    let merged = serde_json::value::to_raw_value(&options)
        .map_err(|e| ProxyError::Internal(format!("encoding stream_options: {e}")))?;
    Ok((merged, wants))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use serde_json::{json, Value};

    fn rewrite(body: &str, route: InferenceRoute) -> (ParsedRequest, String) {
        let parsed = ParsedRequest::parse(body.as_bytes(), route).unwrap();
        let out = parsed.upstream_body("upstream-model").unwrap();
        (parsed, String::from_utf8(out.to_vec()).unwrap())
    }

    fn message(error: ProxyError) -> String {
        error.to_string()
    }

    #[test]
    fn replaces_model_and_keeps_order() {
        let (parsed, out) = rewrite(
            r#"{"messages":[{"role":"user","content":"hi"}],"model":"acme/m","temperature":0.7}"#,
            InferenceRoute::ChatCompletions,
        );
        assert_eq!(parsed.model, "acme/m");
        assert!(!parsed.is_stream);
        assert_eq!(
            out,
            r#"{"messages":[{"role":"user","content":"hi"}],"model":"upstream-model","temperature":0.7}"#
        );
    }

    #[test]
    fn forwards_other_fields_verbatim() {
        // Spacing, escapes, number spelling and key order inside values survive untouched.
        let (_, out) = rewrite(
            "{ \"model\" : \"acme/m\", \"x\" : { \"b\" : 1.50e3 , \"a\":\"\\u00e9\\n\" }, \"n\": 12345678901234567890123 }",
            InferenceRoute::Completions,
        );
        assert_eq!(
            out,
            "{\"model\":\"upstream-model\",\"x\":{ \"b\" : 1.50e3 , \"a\":\"\\u00e9\\n\" },\"n\":12345678901234567890123}"
        );
    }

    #[test]
    fn stream_without_options_gets_include_usage() {
        let (parsed, out) = rewrite(
            r#"{"model":"acme/m","stream":true}"#,
            InferenceRoute::ChatCompletions,
        );
        assert!(parsed.is_stream);
        assert!(!parsed.client_wants_usage);
        assert_eq!(
            out,
            r#"{"model":"upstream-model","stream":true,"stream_options":{"include_usage":true}}"#
        );
    }

    #[test]
    fn stream_options_are_merged_not_replaced() {
        let (parsed, out) = rewrite(
            r#"{"model":"acme/m","stream":true,"stream_options":{"continuous_usage_stats":true,"include_usage":false}}"#,
            InferenceRoute::ChatCompletions,
        );
        assert!(!parsed.client_wants_usage);
        let value: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            value["stream_options"],
            json!({"continuous_usage_stats": true, "include_usage": true})
        );
        let (parsed, _) = rewrite(
            r#"{"model":"acme/m","stream":true,"stream_options":{"include_usage":true}}"#,
            InferenceRoute::Completions,
        );
        assert!(parsed.client_wants_usage);
        let (_, out) = rewrite(
            r#"{"model":"acme/m","stream":true,"stream_options":null}"#,
            InferenceRoute::ChatCompletions,
        );
        assert!(out.ends_with(r#""stream_options":{"include_usage":true}}"#));
    }

    #[test]
    fn non_streams_and_embeddings_are_not_touched_beyond_model() {
        let (parsed, out) = rewrite(
            r#"{"model":"acme/m","stream":false,"stream_options":{"x":1}}"#,
            InferenceRoute::ChatCompletions,
        );
        assert!(!parsed.is_stream);
        assert_eq!(
            out,
            r#"{"model":"upstream-model","stream":false,"stream_options":{"x":1}}"#
        );
        let (parsed, out) = rewrite(
            r#"{"model":"acme/m","input":"x","stream":true}"#,
            InferenceRoute::Embeddings,
        );
        assert!(!parsed.is_stream);
        assert_eq!(
            out,
            r#"{"model":"upstream-model","input":"x","stream":true}"#
        );
    }

    #[test]
    fn refuses_what_is_not_a_request() {
        let parse = |body: &[u8]| ParsedRequest::parse(body, InferenceRoute::ChatCompletions);
        assert_eq!(
            message(parse(b"\xff{}").unwrap_err()),
            "The request body is not valid UTF-8 (at byte 0)."
        );
        assert!(message(parse(b"{\"model\":").unwrap_err())
            .starts_with("The request body is not valid JSON ("));
        assert_eq!(
            message(parse(b"[1,2]").unwrap_err()),
            "The request body must be a JSON object."
        );
        assert_eq!(
            message(parse(b"{}").unwrap_err()),
            "You must provide a model parameter."
        );
        assert_eq!(
            message(parse(br#"{"model":7}"#).unwrap_err()),
            "`model` must be a string."
        );
        assert_eq!(
            message(parse(br#"{"model":"a/b","stream":"yes"}"#).unwrap_err()),
            "`stream` must be a boolean."
        );
        assert_eq!(
            message(parse(br#"{"model":"a/b","stream":true,"stream_options":3}"#).unwrap_err()),
            "`stream_options` must be an object."
        );
    }

    fn metadata_headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-request-metadata", HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn metadata_must_be_a_small_object() {
        assert_eq!(request_metadata(&HeaderMap::new()).unwrap(), None);
        assert_eq!(
            request_metadata(&metadata_headers(r#"{"run": "a-1"}"#)).unwrap(),
            Some(r#"{"run": "a-1"}"#.to_owned())
        );
        assert_eq!(
            message(request_metadata(&metadata_headers("[1]")).unwrap_err()),
            "X-Request-Metadata must be a JSON object."
        );
        assert_eq!(
            message(request_metadata(&metadata_headers("{nope")).unwrap_err()),
            "X-Request-Metadata must be valid JSON."
        );
        let mut twice = metadata_headers(r#"{"a":1}"#);
        twice.append("x-request-metadata", HeaderValue::from_static(r#"{"b":2}"#));
        assert_eq!(
            message(request_metadata(&twice).unwrap_err()),
            "X-Request-Metadata must be sent once."
        );
        let at_limit = format!(r#"{{"k":"{}"}}"#, "x".repeat(MAX_METADATA_BYTES - 8));
        assert_eq!(at_limit.len(), MAX_METADATA_BYTES);
        assert!(request_metadata(&metadata_headers(&at_limit))
            .unwrap()
            .is_some());
        let over = format!(r#"{{"k":"{}"}}"#, "x".repeat(MAX_METADATA_BYTES - 7));
        assert_eq!(
            message(request_metadata(&metadata_headers(&over)).unwrap_err()),
            "X-Request-Metadata must be at most 4096 bytes."
        );
    }

    #[tokio::test]
    async fn body_cap_applies_with_and_without_content_length() {
        let chunked = || {
            let parts: Vec<Result<Bytes, std::io::Error>> = vec![
                Ok(Bytes::from(vec![b'a'; 60])),
                Ok(Bytes::from(vec![b'b'; 60])),
            ];
            Body::from_stream(futures::stream::iter(parts))
        };
        let err = read_body(chunked(), &HeaderMap::new(), 100)
            .await
            .unwrap_err();
        assert!(matches!(err, ProxyError::PayloadTooLarge { limit: 100 }));
        assert_eq!(
            read_body(chunked(), &HeaderMap::new(), 120)
                .await
                .unwrap()
                .len(),
            120
        );

        let mut announced = HeaderMap::new();
        announced.insert(header::CONTENT_LENGTH, HeaderValue::from_static("101"));
        let err = read_body(Body::from(vec![0_u8; 101]), &announced, 100)
            .await
            .unwrap_err();
        assert!(matches!(err, ProxyError::PayloadTooLarge { limit: 100 }));
    }
}
