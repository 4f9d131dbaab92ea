//! Turning the upstream's answer into the client's.
//!
//! The upstream status is known before the client's: an error status is answered with
//! that status and the upstream's body (OpenAI-shaped bodies as they are, any other shape
//! wrapped in it), never as a 200 stream. An upstream 401/403 refuses the gateway's own
//! credentials, not the caller's: it is a 502. A complete 2xx body is metered and
//! committed before it is answered; an event stream goes through the metered body, but
//! only once its first event has arrived: a 200 stream whose first event is an error
//! (TGI does this) is answered as an error status, like any other failed request.
//! Every path ends the request's token reservation: settled where the usage event is
//! stored, refunded where nothing is billed.

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::StreamExt;
use serde_json::Value;
use tollgate_store::UsageStatus;

use crate::error::{error_response, ProxyError};
use crate::metering::{CancelGuard, Meter, Metered, MeteredBody};
use crate::tap::{summarize_body, StreamTap};

/// Largest upstream error body passed on.
const MAX_ERROR_BODY: usize = 1024 * 1024;
/// Largest complete (non-streamed) upstream body accepted.
const MAX_COMPLETE_BODY: usize = 64 * 1024 * 1024;
/// Longest upstream text kept in a wrapped error message.
const MAX_WRAPPED_TEXT: usize = 1000;

/// How the client asked for the answer.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Drop the upstream's usage-only chunk: the gateway asked for it, the client did not.
    pub strip_usage_chunk: bool,
}

/// `idle`: the longest silence allowed between two reads of the upstream's body.
pub async fn relay(
    upstream: reqwest::Response,
    shape: Shape,
    meter: Meter,
    idle: Duration,
) -> Result<Response, ProxyError> {
    let status = upstream.status();
    if !status.is_success() {
        // A failed request: nothing billed, the reserved tokens go back.
        meter.refund().await;
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            // The target's secret is wrong or lacks access: the operator's to fix. Passing
            // the 401 on would tell the caller its own key was refused.
            return Err(ProxyError::UpstreamAuthFailed(status.as_u16()));
        }
        if status.is_client_error() || status.is_server_error() {
            return Ok(error_status(upstream, idle).await);
        }
        return Err(ProxyError::UpstreamInvalid);
    }
    let content_type = upstream.headers().get(header::CONTENT_TYPE).cloned();
    let is_event_stream = content_type
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("text/event-stream")
        });
    if is_event_stream {
        return stream(upstream, status, content_type, shape, meter, idle).await;
    }
    complete(upstream, status, content_type, meter, idle).await
}

/// Why a complete body could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadFailure {
    TooLong,
    BrokenOff,
    /// No byte for the idle bound.
    Silent,
}

/// Reads at most `cap` bytes, waiting at most `idle` for each read.
async fn read_capped(
    upstream: reqwest::Response,
    cap: usize,
    idle: Duration,
) -> Result<Bytes, ReadFailure> {
    let mut body = BytesMut::new();
    let mut chunks = upstream.bytes_stream();
    loop {
        let next = tokio::time::timeout(idle, chunks.next())
            .await
            .map_err(|_| ReadFailure::Silent)?;
        let Some(chunk) = next else {
            return Ok(body.freeze());
        };
        let chunk = chunk.map_err(|_| ReadFailure::BrokenOff)?;
        if body.len().saturating_add(chunk.len()) > cap {
            return Err(ReadFailure::TooLong);
        }
        body.extend_from_slice(&chunk);
    }
}

/// An upstream 4xx/5xx, passed on with its status and `Retry-After`.
async fn error_status(upstream: reqwest::Response, idle: Duration) -> Response {
    let status = upstream.status();
    let retry_after = upstream.headers().get(header::RETRY_AFTER).cloned();
    let body = read_capped(upstream, MAX_ERROR_BODY, idle)
        .await
        .unwrap_or_default();
    let mut response = error_answer(status, body);
    if let Some(retry_after) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, retry_after);
    }
    response
}

/// An upstream error with `status`: an OpenAI-shaped `body` as it is, any other shape
/// wrapped in one keeping its message.
fn error_answer(status: StatusCode, body: Bytes) -> Response {
    if is_openai_error(&body) {
        (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response()
    } else {
        let message = upstream_message(&body);
        let message = truncate_chars(message.trim(), MAX_WRAPPED_TEXT);
        let message = if message.is_empty() {
            format!("The model server answered {}.", status.as_u16())
        } else {
            message.to_owned()
        };
        error_response(
            status,
            &message,
            "upstream_error",
            None,
            Some("upstream_error"),
        )
    }
}

/// The HTTP status an error event asks for: its numeric `code` or `status` (nested under
/// `error` or flat) when that is a 4xx or 5xx.
fn error_event_status(data: &[u8]) -> Option<StatusCode> {
    let value = serde_json::from_slice::<Value>(data).ok()?;
    ["/error/code", "/error/status", "/code", "/status"]
        .iter()
        .filter_map(|pointer| value.pointer(pointer)?.as_u64())
        .filter_map(|code| u16::try_from(code).ok())
        .filter(|code| (400..=599).contains(code))
        .find_map(|code| StatusCode::from_u16(code).ok())
}

/// `{"error": {...}}`: the OpenAI shape, passed on as it is.
fn is_openai_error(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body)
        .is_ok_and(|value| value.get("error").is_some_and(Value::is_object))
}

/// The human message of an error body in any other shape: vLLM's flat `message`, TGI's
/// `{"error": "<text>"}`, FastAPI's `detail` (a string, or its JSON when structured);
/// else the body's text.
fn upstream_message(body: &[u8]) -> String {
    let value = serde_json::from_slice::<Value>(body).unwrap_or(Value::Null);
    let found = ["message", "error", "detail"]
        .iter()
        .find_map(|name| match value.get(name)? {
            Value::String(text) => Some(text.clone()),
            Value::Null => None,
            other => Some(other.to_string()),
        });
    found.unwrap_or_else(|| String::from_utf8_lossy(body).into_owned())
}

fn truncate_chars(text: &str, max: usize) -> &str {
    text.char_indices()
        .nth(max)
        .map_or(text, |(at, _)| &text[..at])
}

/// A complete 2xx body: metered and committed, then answered byte for byte.
async fn complete(
    upstream: reqwest::Response,
    status: StatusCode,
    content_type: Option<HeaderValue>,
    meter: Meter,
    idle: Duration,
) -> Result<Response, ProxyError> {
    // Bills the request if the client leaves while the body is being read.
    let guard = CancelGuard::new(meter);
    let read = read_capped(upstream, MAX_COMPLETE_BODY, idle).await;
    let meter = guard.disarm();
    let body = match read {
        Ok(body) => body,
        Err(failure) => {
            if let Some(meter) = meter {
                meter.refund().await;
            }
            return Err(match failure {
                ReadFailure::TooLong => ProxyError::UpstreamInvalid,
                ReadFailure::BrokenOff => ProxyError::UpstreamUnreachable,
                ReadFailure::Silent => ProxyError::UpstreamTimeout(idle),
            });
        }
    };
    let summary = summarize_body(&body);
    if let Some(meter) = meter {
        if summary.is_error {
            meter.refund().await;
        } else {
            let tokens = Metered::of_body(&summary, &body, meter.context.prompt_estimate);
            if !meter.commit(UsageStatus::Completed, tokens).await {
                return Err(ProxyError::Internal(
                    "the usage event of a complete answer could not be stored".into(),
                ));
            }
        }
    }
    let content_type = content_type.unwrap_or(HeaderValue::from_static("application/json"));
    Ok((status, [(header::CONTENT_TYPE, content_type)], body).into_response())
}

/// Bytes read ahead of a stream's first event before giving up waiting for it (an
/// event the tap cannot read, over its 1 MiB bound, is forwarded as it is).
const MAX_OPENING_BYTES: usize = 2 * 1024 * 1024;

/// How a 2xx stream opened.
enum Opening {
    /// Forward it: what was read ahead, then the rest.
    Stream(BoxStream<'static, reqwest::Result<Bytes>>),
    /// The first event was an error; its data.
    ErrorFirst(Vec<u8>),
    /// The upstream sent no event within the idle bound.
    Silent,
}

/// Reads until the stream's first event (comments and keep-alives before it do not
/// count), its end, or the idle bound. Holding the response headers this long delays
/// nothing the client could use, and lets a failure announced by the first event be
/// answered with an error status (`relay::tests::an_error_first_stream_is_an_error_status`).
async fn open_stream(
    mut chunks: BoxStream<'static, reqwest::Result<Bytes>>,
    idle: Duration,
) -> Opening {
    let mut probe = StreamTap::opening();
    let mut read: Vec<reqwest::Result<Bytes>> = Vec::new();
    let mut read_bytes = 0_usize;
    loop {
        let Ok(next) = tokio::time::timeout(idle, chunks.next()).await else {
            return Opening::Silent;
        };
        match next {
            Some(Ok(chunk)) => {
                read_bytes = read_bytes.saturating_add(chunk.len());
                probe.feed(chunk.clone());
                read.push(Ok(chunk));
                if let Some(error) = probe.first_error() {
                    return Opening::ErrorFirst(error.to_vec());
                }
                if probe.has_read_an_event() || read_bytes > MAX_OPENING_BYTES {
                    return Opening::Stream(futures::stream::iter(read).chain(chunks).boxed());
                }
            }
            Some(Err(e)) => {
                read.push(Err(e));
                return Opening::Stream(futures::stream::iter(read).boxed());
            }
            None => {
                probe.finish();
                if let Some(error) = probe.first_error() {
                    return Opening::ErrorFirst(error.to_vec());
                }
                return Opening::Stream(futures::stream::iter(read).boxed());
            }
        }
    }
}

/// A 2xx event stream: once its first event is known, forwarded through the metered body
/// — or, when that event is an error, answered as an error status and not billed.
async fn stream(
    upstream: reqwest::Response,
    status: StatusCode,
    content_type: Option<HeaderValue>,
    shape: Shape,
    meter: Meter,
    idle: Duration,
) -> Result<Response, ProxyError> {
    // Bills the request, as a stream cut by its client, if the client leaves meanwhile.
    let guard = CancelGuard::new(meter);
    let opening = open_stream(upstream.bytes_stream().boxed(), idle).await;
    let Some(meter) = guard.disarm() else {
        return Err(ProxyError::Internal("a stream's meter went missing".into()));
    };
    let chunks = match opening {
        Opening::Stream(chunks) => chunks,
        Opening::ErrorFirst(data) => {
            meter.refund().await;
            let status = error_event_status(&data).unwrap_or(StatusCode::BAD_GATEWAY);
            return Ok(error_answer(status, Bytes::from(data)));
        }
        Opening::Silent => {
            meter.refund().await;
            return Err(ProxyError::UpstreamTimeout(idle));
        }
    };
    let body = MeteredBody::new(chunks, shape.strip_usage_chunk, meter, idle);
    let content_type = content_type.unwrap_or(HeaderValue::from_static("text/event-stream"));
    Ok((
        status,
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ],
        Body::new(body),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_error_object_is_the_openai_shape() {
        assert!(is_openai_error(br#"{"error":{"message":"m","code":400}}"#));
        assert!(!is_openai_error(br#"{"error":"m"}"#));
        assert!(!is_openai_error(br#"{"object":"error","message":"m"}"#));
        assert!(!is_openai_error(b"[1]"));
        assert!(!is_openai_error(b"oops"));
    }

    #[test]
    fn the_message_of_every_other_shape_is_kept() {
        assert_eq!(
            upstream_message(br#"{"object":"error","message":"flat","code":400}"#),
            "flat"
        );
        assert_eq!(
            upstream_message(br#"{"error":"tgi","error_type":"validation"}"#),
            "tgi"
        );
        assert_eq!(upstream_message(br#"{"detail":"fastapi"}"#), "fastapi");
        assert_eq!(
            upstream_message(br#"{"detail":[{"loc":["body"],"msg":"bad"}]}"#),
            r#"[{"loc":["body"],"msg":"bad"}]"#
        );
        assert_eq!(
            upstream_message(br#"{"detail":null}"#),
            r#"{"detail":null}"#
        );
        assert_eq!(upstream_message(b"plain text"), "plain text");
        assert_eq!(upstream_message(b"\xff"), "\u{fffd}");
    }

    /// An upstream response whose body sends `first`, then nothing, connection open.
    fn stalling_after(first: &'static [u8]) -> reqwest::Response {
        let pieces = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(first))])
            .chain(futures::stream::pending());
        let body = reqwest::Body::wrap_stream(pieces);
        reqwest::Response::from(http::Response::new(body))
    }

    #[tokio::test]
    async fn a_complete_body_that_goes_silent_is_given_up() {
        let started = std::time::Instant::now();
        let read = read_capped(stalling_after(b"{\"cho"), 1024, Duration::from_millis(100)).await;
        assert_eq!(read, Err(ReadFailure::Silent));
        assert!(started.elapsed() < Duration::from_secs(2));
        let read = read_capped(
            reqwest::Response::from(http::Response::new(reqwest::Body::from("{}"))),
            1024,
            Duration::from_millis(100),
        )
        .await;
        assert_eq!(read, Ok(Bytes::from_static(b"{}")));
        let read = read_capped(
            reqwest::Response::from(http::Response::new(reqwest::Body::from("{}"))),
            1,
            Duration::from_millis(100),
        )
        .await;
        assert_eq!(read, Err(ReadFailure::TooLong));
    }

    #[test]
    fn an_error_event_names_its_status_when_it_is_an_http_error() {
        let cases: [(&[u8], Option<u16>); 8] = [
            (br#"{"error":{"message":"m","code":503}}"#, Some(503)),
            (br#"{"error":{"message":"m","status":429}}"#, Some(429)),
            (br#"{"object":"error","message":"m","code":400}"#, Some(400)),
            (br#"{"error":"m","status":500}"#, Some(500)),
            (
                br#"{"error":{"message":"m","code":"internal_error"}}"#,
                None,
            ),
            (br#"{"error":{"message":"m","code":200}}"#, None),
            (br#"{"error":"m","error_type":"validation"}"#, None),
            (b"not json", None),
        ];
        for (data, status) in cases {
            assert_eq!(
                error_event_status(data).map(|s| s.as_u16()),
                status,
                "{}",
                String::from_utf8_lossy(data)
            );
        }
    }

    /// Upstream reads, then silence with the connection open.
    fn reads_then_silence(reads: &[&'static str]) -> BoxStream<'static, reqwest::Result<Bytes>> {
        let reads: Vec<reqwest::Result<Bytes>> = reads
            .iter()
            .map(|read| Ok(Bytes::from_static(read.as_bytes())))
            .collect();
        futures::stream::iter(reads)
            .chain(futures::stream::pending())
            .boxed()
    }

    #[tokio::test]
    async fn an_error_first_stream_is_an_error_status() {
        let error = r#"{"error":{"message":"overloaded","type":"server_error","code":503}}"#;
        let reads = [": ping\n\ndata: : keepalive\n\n", "data: ", error, "\n\n"];
        let opening = open_stream(reads_then_silence(&reads), Duration::from_secs(5)).await;
        let Opening::ErrorFirst(data) = opening else {
            panic!("an error-first stream must be caught");
        };
        assert_eq!(data, error.as_bytes());
        let status = error_event_status(&data).unwrap_or(StatusCode::BAD_GATEWAY);
        let response = error_answer(status, Bytes::from(data));
        assert_eq!(response.status(), 503);
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(&body[..], error.as_bytes());

        // TGI's string shape: 502, wrapped with its message.
        let reads =
            ["data: {\"error\":\"Input validation error\",\"error_type\":\"validation\"}\n\n"];
        let Opening::ErrorFirst(data) =
            open_stream(reads_then_silence(&reads), Duration::from_secs(5)).await
        else {
            panic!("an error-first stream must be caught");
        };
        let status = error_event_status(&data).unwrap_or(StatusCode::BAD_GATEWAY);
        let response = error_answer(status, Bytes::from(data));
        assert_eq!(response.status(), 502);
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap(),
            serde_json::json!({"error": {
                "message": "Input validation error",
                "type": "upstream_error",
                "param": null,
                "code": "upstream_error",
            }})
        );
    }

    #[tokio::test]
    async fn a_stream_opening_with_content_is_replayed_whole() {
        let reads = [
            ": keep-alive\n\n",
            "data: {\"choices\":[]",
            "}\n\ndata: {\"a\":1}\n\n",
        ];
        let opening = open_stream(reads_then_silence(&reads), Duration::from_secs(5)).await;
        let Opening::Stream(mut replay) = opening else {
            panic!("a stream opening with content is forwarded");
        };
        let mut replayed = Vec::new();
        for _ in 0..reads.len() {
            replayed.extend_from_slice(&replay.next().await.unwrap().unwrap());
        }
        assert_eq!(replayed, reads.concat().as_bytes());

        // Ended before any event: forwarded (the metered body reports the cut).
        let ended = futures::stream::iter([Ok(Bytes::from_static(b": only a comment\n\n"))]);
        let opening = open_stream(ended.boxed(), Duration::from_secs(5)).await;
        assert!(matches!(opening, Opening::Stream(_)));
    }

    #[tokio::test]
    async fn a_stream_silent_before_its_first_event_is_a_timeout() {
        let started = std::time::Instant::now();
        let opening = open_stream(
            reads_then_silence(&[": ping\n\n"]),
            Duration::from_millis(100),
        )
        .await;
        assert!(matches!(opening, Opening::Silent));
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn wrapped_text_is_cut_on_a_character_boundary() {
        assert_eq!(truncate_chars("héllo", 2), "hé");
        assert_eq!(truncate_chars("abc", 10), "abc");
    }
}
