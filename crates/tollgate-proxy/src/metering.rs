//! Metering: one usage event per served request, committed before the client gets the
//! final bytes.
//!
//! Streams pass through [`MeteredBody`], which forwards upstream chunks as they arrive
//! (through the usage tap), holds back only the `[DONE]` event and the end of the body,
//! commits the event, then releases them. `[DONE]` (or the upstream's end) ends the
//! answer; an upstream silent for longer than the idle bound is treated as ended there (a
//! stall never holds a client forever). If the client goes away first, the body is
//! dropped: dropping it closes the upstream request, and the drop hook records the event
//! as `client_cancelled` from what the tap saw (or as `upstream_error_mid_stream` when the
//! upstream had already sent an error event).
//! [`record`] is the one place an event is stored — through the [`Outbox`], which groups
//! the events of concurrent requests into one transaction; [`Meter`] settles the
//! request's token reservation right after it, with the same total, or refunds it when
//! nothing is billed.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use http_body::{Body, Frame, SizeHint};
use tokio::task::JoinHandle;
use tollgate_core::ids::{new_id, IdKind};
use tollgate_core::Clock;
use tollgate_store::{UsageEvent, UsageStatus};

use crate::error::error_body;
use crate::limits::Settlement;
use crate::outbox::{CommitError, Outbox};
use crate::tap::{BodySummary, StreamEnd, StreamSummary, StreamTap, Usage};

/// Everything a usage event says besides its tokens and status.
#[derive(Debug, Clone)]
pub struct EventContext {
    pub request_id: String,
    pub request_metadata: Option<String>,
    pub model_slug: String,
    pub external_entity_id: String,
    pub api_key_prefix: String,
    pub group_id: String,
    pub workspace_id: String,
    /// Prompt tokens to bill when the upstream reports none: request bytes / 4, at least 1.
    pub prompt_estimate: u64,
}

/// Request bytes / 4, and never 0: a served request is never free.
pub fn prompt_estimate(body_len: usize) -> u64 {
    (u64::try_from(body_len).unwrap_or(u64::MAX) / 4).max(1)
}

impl EventContext {
    /// The event, with fresh gateway-made ids (never the upstream's `id`).
    pub fn event(&self, status: UsageStatus, tokens: Metered, clock: &dyn Clock) -> UsageEvent {
        UsageEvent {
            idempotency_key: new_id(IdKind::Event),
            timestamp: clock.now(),
            request_id: self.request_id.clone(),
            request_metadata: self.request_metadata.clone(),
            model_slug: self.model_slug.clone(),
            external_entity_id: self.external_entity_id.clone(),
            api_key_prefix: self.api_key_prefix.clone(),
            group_id: self.group_id.clone(),
            workspace_id: self.workspace_id.clone(),
            status,
            input_tokens: tokens.usage.prompt_tokens,
            output_tokens: tokens.usage.completion_tokens,
            cached_input_tokens: tokens.usage.cached_tokens,
            is_estimated: tokens.is_estimated,
        }
    }
}

/// Tokens to bill, and whether they are an estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metered {
    pub usage: Usage,
    pub is_estimated: bool,
}

impl Metered {
    /// `estimate` runs only when nothing usable was reported: for a complete body it
    /// parses the body a second time.
    fn reported_or(reported: Option<Usage>, estimate: impl FnOnce() -> Usage) -> Self {
        match reported {
            Some(usage) if usage.total() > 0 => Metered {
                usage,
                is_estimated: false,
            },
            _ => Metered {
                usage: estimate(),
                is_estimated: true,
            },
        }
    }

    /// A stream's tokens: the last usage reported, else the prompt estimate plus one
    /// completion token per content chunk delivered.
    pub fn of_stream(summary: &StreamSummary, prompt_estimate: u64) -> Self {
        Self::reported_or(summary.usage, || Usage {
            prompt_tokens: prompt_estimate,
            completion_tokens: summary.content_chunks,
            cached_tokens: 0,
        })
    }

    /// A complete body's tokens: the usage reported, else the prompt estimate plus the
    /// generated text's bytes / 4.
    pub fn of_body(summary: &BodySummary, body: &[u8], prompt_estimate: u64) -> Self {
        Self::reported_or(summary.usage, || Usage {
            prompt_tokens: prompt_estimate,
            completion_tokens: generated_bytes(body).div_ceil(4),
            cached_tokens: 0,
        })
    }
}

/// Bytes of generated text in a completion body (`message.content` or `text` of each
/// choice); 0 for anything else, such as embeddings.
fn generated_bytes(body: &[u8]) -> u64 {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return 0;
    };
    let Some(choices) = value.get("choices").and_then(|c| c.as_array()) else {
        return 0;
    };
    choices
        .iter()
        .filter_map(|choice| {
            choice
                .pointer("/message/content")
                .or_else(|| choice.get("text"))
                .and_then(|text| text.as_str())
        })
        .map(|text| u64::try_from(text.len()).unwrap_or(u64::MAX))
        .fold(0, u64::saturating_add)
}

/// The status of a stream that reached its end upstream.
pub fn status_of_end(end: StreamEnd) -> UsageStatus {
    match end {
        StreamEnd::Done | StreamEnd::FinishedWithoutDone => UsageStatus::Completed,
        StreamEnd::ErrorEvent | StreamEnd::Truncated => UsageStatus::UpstreamErrorMidStream,
    }
}

/// Stores a request's usage event and resolves once it is committed: where a served
/// request is billed (and, in [`Meter`], its token reservation settled).
pub async fn record(outbox: &Outbox, event: UsageEvent) -> Result<(), CommitError> {
    let request_id = event.request_id.clone();
    let result = outbox.commit(event).await;
    if let Err(e) = &result {
        tracing::error!(%request_id, error = %e, "storing a usage event failed");
    }
    result
}

/// What a request needs to end its accounting: where to store, what time it is, what to
/// say, and the token reservation to settle (billed) or refund (not billed).
pub struct Meter {
    pub outbox: Outbox,
    pub clock: Arc<dyn Clock>,
    pub context: EventContext,
    pub settlement: Settlement,
}

impl Meter {
    /// Stores the event and settles the reservation with its tokens, on their own task,
    /// so that a caller which is dropped meanwhile (the client left) cannot cancel them
    /// halfway; resolves to whether the event was committed.
    pub async fn commit(self, status: UsageStatus, tokens: Metered) -> bool {
        match self.spawn_record(status, tokens) {
            Some(handle) => handle.await.unwrap_or(false),
            None => false,
        }
    }

    /// Nothing billable: gives the reserved tokens back.
    pub async fn refund(self) {
        self.settlement.refund().await;
    }

    /// Stores the event, then settles the reservation to the billed total (the tokens
    /// were used whether or not the store took the event).
    fn spawn_record(self, status: UsageStatus, tokens: Metered) -> Option<JoinHandle<bool>> {
        let event = self.context.event(status, tokens, self.clock.as_ref());
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(
                request_id = %event.request_id,
                "no runtime to store a usage event on; the event is lost"
            );
            return None;
        };
        let (outbox, settlement) = (self.outbox, self.settlement);
        // A task the outbox tracks: graceful shutdown waits for it, so an event of a
        // client that just left is flushed too.
        let work = {
            let outbox = outbox.clone();
            async move {
                let is_stored = record(&outbox, event).await.is_ok();
                settlement.settle(tokens.usage.total()).await;
                is_stored
            }
        };
        Some(outbox.spawn_on(work, &runtime))
    }

    /// Refunds on a task of its own; resolves to `true` (nothing to store).
    fn spawn_refund(self) -> Option<JoinHandle<bool>> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let settlement = self.settlement;
        let work = async move {
            settlement.refund().await;
            true
        };
        Some(self.outbox.spawn_on(work, &runtime))
    }
}

/// Bills a complete (non-streamed) answer whose client left while the gateway was still
/// reading it: the upstream answered 2xx, so the request is billed `client_cancelled`
/// from the prompt estimate. Disarmed once the answer's own fate is known.
pub struct CancelGuard {
    meter: Option<Meter>,
}

impl CancelGuard {
    pub fn new(meter: Meter) -> Self {
        Self { meter: Some(meter) }
    }

    /// The meter back; the guard will not bill.
    pub fn disarm(mut self) -> Option<Meter> {
        self.meter.take()
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        let Some(meter) = self.meter.take() else {
            return;
        };
        let tokens = Metered {
            usage: Usage {
                prompt_tokens: meter.context.prompt_estimate,
                completion_tokens: 0,
                cached_tokens: 0,
            },
            is_estimated: true,
        };
        let _detached = meter.spawn_record(UsageStatus::ClientCancelled, tokens);
    }
}

/// How long a `[DONE]` whose read ended on a CR waits for the LF that may complete it.
const DONE_LF_GRACE: Duration = Duration::from_millis(250);

/// Where a metered stream is.
enum Phase {
    /// Forwarding upstream chunks.
    Streaming,
    /// `[DONE]` was read up to a CR: the next read, if it comes within the grace, may
    /// start with the LF of that CRLF (`DONE_LF_GRACE`).
    AwaitingLf(Pin<Box<tokio::time::Sleep>>),
    /// The upstream ended (or sent `[DONE]`); the event is being stored and the
    /// reservation settled — or, when nothing is billable, refunded — on its own task, so
    /// a client that leaves now cannot cancel the write.
    Committing(JoinHandle<bool>),
    /// Event stored: release what was held back.
    Releasing,
    Finished,
}

#[derive(Debug, thiserror::Error)]
#[error("the usage event of this response could not be stored")]
pub struct MeteringError;

/// The streamed response body. See the module comment.
pub struct MeteredBody {
    upstream: Option<BoxStream<'static, reqwest::Result<Bytes>>>,
    tap: StreamTap,
    /// `None` once the event is settled (stored, spawned, or not billable).
    meter: Option<Meter>,
    phase: Phase,
    /// Bytes after the start of `[DONE]`, released after the commit.
    held: BytesMut,
    /// The last bytes given to the client or held, to end a cut-off event cleanly.
    tail: Vec<u8>,
    /// Longest silence allowed between two upstream reads.
    idle: Duration,
    /// Fires when the upstream has been silent for `idle`; made on the first wait.
    silence: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The last poll of the upstream found nothing: `silence` is running.
    is_waiting: bool,
}

/// The event appended when the upstream stream breaks off: the client must not take a
/// cut stream for a complete one.
pub fn truncation_event() -> String {
    let body = error_body(
        "The model server ended the stream unexpectedly.",
        "upstream_error",
        None,
        Some("upstream_stream_truncated"),
    );
    format!("data: {body}\n\n")
}

/// What must precede a new event so that it starts on its own after `tail`.
fn event_separator(tail: &[u8]) -> &'static str {
    let ends_blank = tail.is_empty()
        || tail.ends_with(b"\n\n")
        || tail.ends_with(b"\r\r")
        || tail.ends_with(b"\r\n\r\n");
    if ends_blank {
        ""
    } else if tail.ends_with(b"\n") {
        "\n"
    } else if tail.ends_with(b"\r") {
        // A lone CR ended the line: an LF after it would join it as one CRLF, not make
        // the blank line (`a_cut_cr_framed_stream_gets_its_error_event_on_its_own`).
        "\r"
    } else {
        "\n\n"
    }
}

/// Splits `out` before the line holding `[DONE]`; the whole of `out` is held when the
/// marker itself came in an earlier read.
fn split_before_done(mut out: Bytes) -> (Bytes, Bytes) {
    let Some(at) = out.windows(6).rposition(|w| w == b"[DONE]") else {
        return (Bytes::new(), out);
    };
    let line_start = out[..at]
        .iter()
        .rposition(|&b| b == b'\n' || b == b'\r')
        .map_or(0, |i| i + 1);
    let later = out.split_off(line_start);
    (out, later)
}

impl MeteredBody {
    /// `idle`: how long the upstream may stay silent before the stream is treated as
    /// ended there (the configured upstream timeout).
    pub fn new(
        upstream: BoxStream<'static, reqwest::Result<Bytes>>,
        strip_usage_chunk: bool,
        meter: Meter,
        idle: Duration,
    ) -> Self {
        Self {
            upstream: Some(upstream),
            tap: StreamTap::new(strip_usage_chunk),
            meter: Some(meter),
            phase: Phase::Streaming,
            held: BytesMut::new(),
            tail: Vec::new(),
            idle,
            silence: None,
            is_waiting: false,
        }
    }

    /// Whether the upstream has now been silent for the idle bound (registers the wake-up
    /// otherwise). The bound counts only time spent waiting on the upstream, from the
    /// first poll that found nothing: a client slow to read does not use it up.
    fn is_silent_too_long(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = tokio::time::Instant::now() + self.idle;
        let silence = match &mut self.silence {
            Some(silence) => silence,
            None => self
                .silence
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        if !std::mem::replace(&mut self.is_waiting, true) {
            silence.as_mut().reset(deadline);
        }
        std::future::Future::poll(silence.as_mut(), cx).is_ready()
    }

    fn note_tail(&mut self, bytes: &[u8]) {
        self.tail.extend_from_slice(bytes);
        let excess = self.tail.len().saturating_sub(4);
        self.tail.drain(..excess);
    }

    fn hold(&mut self, bytes: &[u8]) {
        self.note_tail(bytes);
        self.held.extend_from_slice(bytes);
    }

    /// One upstream read: returns the bytes to forward now (possibly empty).
    fn on_chunk(&mut self, chunk: Bytes) -> Bytes {
        let out = self.tap.feed(chunk);
        if self.tap.has_seen_done() {
            let (now, later) = split_before_done(out);
            self.note_tail(&now);
            self.hold(&later);
            // `[DONE]` ends the answer: commit and release now, whatever the upstream does
            // next (some keep the connection open after it, which would otherwise hold the
            // client until the idle bound — `done_ends_the_stream_at_once`). A read that
            // ends on a CR may be followed by the LF of its CRLF: wait a moment for it, so
            // the client gets the upstream's bytes exactly.
            if self.tail.ends_with(b"\r") {
                let grace = DONE_LF_GRACE.min(self.idle);
                self.phase = Phase::AwaitingLf(Box::pin(tokio::time::sleep(grace)));
            } else {
                self.on_upstream_end();
            }
            return now;
        }
        self.note_tail(&out);
        out
    }

    /// The upstream ended (EOF or error): settle and move on to committing.
    fn on_upstream_end(&mut self) {
        self.upstream = None;
        let rest = self.tap.finish();
        self.hold(&rest);
        let summary = self.tap.summary();
        if summary.end == StreamEnd::Truncated {
            let separator = event_separator(&self.tail);
            let event = truncation_event();
            self.hold(separator.as_bytes());
            self.hold(event.as_bytes());
        }
        let billable = !summary.is_error_first;
        let settling = match self.meter.take() {
            Some(meter) if billable => {
                let tokens = Metered::of_stream(&summary, meter.context.prompt_estimate);
                meter.spawn_record(status_of_end(summary.end), tokens)
            }
            Some(meter) => meter.spawn_refund(),
            None => None,
        };
        self.phase = match settling {
            Some(handle) => Phase::Committing(handle),
            None => Phase::Releasing,
        };
    }
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = MeteringError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, MeteringError>>> {
        let this = self.get_mut();
        loop {
            match &mut this.phase {
                Phase::Streaming => {
                    let Some(upstream) = this.upstream.as_mut() else {
                        this.on_upstream_end();
                        continue;
                    };
                    let next = match upstream.poll_next_unpin(cx) {
                        Poll::Ready(next) => next,
                        Poll::Pending => {
                            if !this.is_silent_too_long(cx) {
                                return Poll::Pending;
                            }
                            if let Some(meter) = &this.meter {
                                tracing::warn!(
                                    request_id = %meter.context.request_id,
                                    idle_secs = this.idle.as_secs_f64(),
                                    "upstream stream went silent; ending it"
                                );
                            }
                            this.on_upstream_end();
                            continue;
                        }
                    };
                    this.is_waiting = false;
                    match next {
                        Some(Ok(chunk)) => {
                            let now = this.on_chunk(chunk);
                            if !now.is_empty() {
                                return Poll::Ready(Some(Ok(Frame::data(now))));
                            }
                        }
                        Some(Err(e)) => {
                            if let Some(meter) = &this.meter {
                                tracing::warn!(
                                    request_id = %meter.context.request_id,
                                    error = %e,
                                    "upstream stream broke off"
                                );
                            }
                            this.on_upstream_end();
                        }
                        None => this.on_upstream_end(),
                    }
                }
                Phase::AwaitingLf(grace) => {
                    let next = match this.upstream.as_mut() {
                        Some(upstream) => upstream.poll_next_unpin(cx),
                        None => Poll::Ready(None),
                    };
                    match next {
                        Poll::Ready(Some(Ok(chunk))) => {
                            let out = this.tap.feed(chunk);
                            this.hold(&out);
                        }
                        Poll::Ready(_) => {}
                        Poll::Pending => {
                            if std::future::Future::poll(grace.as_mut(), cx).is_pending() {
                                return Poll::Pending;
                            }
                        }
                    }
                    this.on_upstream_end();
                }
                Phase::Committing(handle) => {
                    let is_stored = ready!(handle.poll_unpin(cx)).unwrap_or(false);
                    if !is_stored {
                        // Without a stored event the client must not see a complete
                        // response: end the body with an error instead.
                        this.phase = Phase::Finished;
                        return Poll::Ready(Some(Err(MeteringError)));
                    }
                    this.phase = Phase::Releasing;
                }
                Phase::Releasing => {
                    this.phase = Phase::Finished;
                    if !this.held.is_empty() {
                        let held = this.held.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(held))));
                    }
                }
                Phase::Finished => return Poll::Ready(None),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.phase, Phase::Finished)
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl Drop for MeteredBody {
    /// The client went away mid-stream: stop the upstream and bill what was used.
    fn drop(&mut self) {
        if matches!(self.phase, Phase::AwaitingLf(_)) {
            // The answer was complete: bill it as such (the write is detached).
            self.on_upstream_end();
            return;
        }
        if !matches!(self.phase, Phase::Streaming) {
            return;
        }
        // Dropping the response stream closes the upstream connection, which is what
        // makes the model server stop generating.
        self.upstream = None;
        let Some(meter) = self.meter.take() else {
            return;
        };
        let summary = self.tap.summary();
        if summary.is_error_first {
            let _detached = meter.spawn_refund();
            return;
        }
        let tokens = Metered::of_stream(&summary, meter.context.prompt_estimate);
        // An error event already decided the request's fate; the client leaving after it
        // (as SDKs do on an error event) does not make it a cancellation.
        let status = if summary.end == StreamEnd::ErrorEvent {
            UsageStatus::UpstreamErrorMidStream
        } else {
            UsageStatus::ClientCancelled
        };
        // The write runs on its own task; nobody waits for it.
        let _detached = meter.spawn_record(status, tokens);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_estimate_is_bytes_over_four_and_never_zero() {
        assert_eq!(prompt_estimate(0), 1);
        assert_eq!(prompt_estimate(3), 1);
        assert_eq!(prompt_estimate(41), 10);
        assert_eq!(prompt_estimate(4096), 1024);
    }

    #[test]
    fn reported_usage_wins_over_the_estimate() {
        let reported = Usage {
            prompt_tokens: 10,
            completion_tokens: 50,
            cached_tokens: 4,
        };
        let summary = StreamSummary {
            usage: Some(reported),
            end: StreamEnd::Done,
            is_error_first: false,
            content_chunks: 50,
        };
        assert_eq!(
            Metered::of_stream(&summary, 99),
            Metered {
                usage: reported,
                is_estimated: false
            }
        );
    }

    #[test]
    fn missing_usage_is_estimated_from_prompt_and_chunks() {
        let summary = StreamSummary {
            usage: None,
            end: StreamEnd::Truncated,
            is_error_first: false,
            content_chunks: 5,
        };
        assert_eq!(
            Metered::of_stream(&summary, 12),
            Metered {
                usage: Usage {
                    prompt_tokens: 12,
                    completion_tokens: 5,
                    cached_tokens: 0
                },
                is_estimated: true
            }
        );
        let zero = StreamSummary {
            usage: Some(Usage::default()),
            ..summary
        };
        assert!(Metered::of_stream(&zero, 12).is_estimated);
    }

    #[test]
    fn a_body_without_usage_is_estimated_from_its_text() {
        let body = br#"{"choices":[{"message":{"content":"abcdefghi"}},{"text":"abc"}]}"#;
        let summary = BodySummary {
            usage: None,
            is_error: false,
        };
        let metered = Metered::of_body(&summary, body, 7);
        assert_eq!(metered.usage.prompt_tokens, 7);
        assert_eq!(metered.usage.completion_tokens, 3);
        assert!(metered.is_estimated);
        let embeddings = br#"{"data":[{"embedding":[0.1]}]}"#;
        assert_eq!(
            Metered::of_body(&summary, embeddings, 7)
                .usage
                .completion_tokens,
            0
        );
    }

    #[test]
    fn stream_ends_map_to_statuses() {
        assert_eq!(status_of_end(StreamEnd::Done), UsageStatus::Completed);
        assert_eq!(
            status_of_end(StreamEnd::FinishedWithoutDone),
            UsageStatus::Completed
        );
        assert_eq!(
            status_of_end(StreamEnd::ErrorEvent),
            UsageStatus::UpstreamErrorMidStream
        );
        assert_eq!(
            status_of_end(StreamEnd::Truncated),
            UsageStatus::UpstreamErrorMidStream
        );
    }

    #[test]
    fn done_is_split_off_at_its_line() {
        let (now, later) =
            split_before_done(Bytes::from_static(b"data: {\"a\":1}\n\ndata: [DONE]\n\n"));
        assert_eq!(&now[..], b"data: {\"a\":1}\n\n");
        assert_eq!(&later[..], b"data: [DONE]\n\n");
        let (now, later) = split_before_done(Bytes::from_static(b"NE]\n\n"));
        assert_eq!(&now[..], b"");
        assert_eq!(&later[..], b"NE]\n\n");
    }

    #[test]
    fn the_truncation_event_starts_on_its_own() {
        assert_eq!(event_separator(b""), "");
        assert_eq!(event_separator(b"}\n\n"), "");
        assert_eq!(event_separator(b"\r\n\r\n"), "");
        assert_eq!(event_separator(b"}\n"), "\n");
        assert_eq!(event_separator(b"}\r\n"), "\n");
        assert_eq!(event_separator(b"}\r"), "\r");
        assert_eq!(event_separator(b"{\"a"), "\n\n");
        let event = truncation_event();
        let json = event
            .strip_prefix("data: ")
            .and_then(|rest| rest.strip_suffix("\n\n"))
            .unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(json).unwrap(),
            serde_json::json!({"error": {
                "message": "The model server ended the stream unexpectedly.",
                "type": "upstream_error",
                "param": null,
                "code": "upstream_stream_truncated",
            }})
        );
    }

    // --- the metered body against a real (in-memory) store -----------------------------

    use futures::channel::mpsc;
    use http_body_util::BodyExt;
    use tollgate_core::clock::ManualClock;
    use tollgate_core::hierarchy::EffectiveLimit;
    use tollgate_core::{LimitMode, LimitType, LimitUnit, SystemClock, Timestamp};
    use tollgate_limits::{
        AdmitRequest, CounterKey, Decision, InProcessLimiter, Limiter, NoStoredUsage,
    };
    use tollgate_store::{PageRequest, SqliteStore, Store, UsageFilter};

    type Upstream = mpsc::UnboundedSender<reqwest::Result<Bytes>>;

    async fn meter() -> (Meter, Arc<dyn Store>) {
        let (meter, store, _) = limited_meter().await;
        (meter, store)
    }

    /// grp_1's TOKEN/DAY counter on acme/m, which every test meter's reservation debits.
    fn day_tokens() -> CounterKey {
        CounterKey {
            group_id: "grp_1".into(),
            slug: "acme/m".into(),
            kind: LimitType::Token,
            unit: LimitUnit::Day,
        }
    }

    /// A meter whose settlement reserved the prompt estimate (11 tokens) on
    /// [`day_tokens`].
    async fn limited_meter() -> (Meter, Arc<dyn Store>, Arc<InProcessLimiter>) {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open("sqlite::memory:").await.unwrap());
        let limiter = Arc::new(InProcessLimiter::new(
            Arc::new(ManualClock::new(Timestamp(1_796_320_404_123))),
            Arc::new(NoStoredUsage),
        ));
        let limits = [EffectiveLimit {
            kind: LimitType::Token,
            unit: LimitUnit::Day,
            threshold: 1000,
            source_group: "grp_1".into(),
            counter_group: "grp_1".into(),
        }];
        let decision = limiter
            .admit(AdmitRequest {
                limits: &limits,
                slug: "acme/m",
                tree_root: "grp_1",
                mode: LimitMode::Cascading,
                estimated_tokens: 11,
            })
            .await
            .unwrap();
        let Decision::Admitted { reservation, .. } = decision else {
            panic!("refused");
        };
        assert_eq!(limiter.current_usage(&day_tokens()), Some(11));
        let shared: Arc<dyn Limiter> = limiter.clone();
        let meter = Meter {
            outbox: Outbox::start(Arc::clone(&store)).0,
            clock: Arc::new(SystemClock),
            context: EventContext {
                request_id: "req_test".into(),
                request_metadata: Some(r#"{"k":1}"#.into()),
                model_slug: "acme/m".into(),
                external_entity_id: "cust-42".into(),
                api_key_prefix: "tg_0123456789abc".into(),
                group_id: "grp_1".into(),
                workspace_id: "ws_1".into(),
                prompt_estimate: 11,
            },
            settlement: Settlement::new(shared, reservation),
        };
        (meter, store, limiter)
    }

    /// What [`day_tokens`] holds once pending settlements ran.
    async fn settled_tokens(limiter: &InProcessLimiter, expected: u64) -> Option<u64> {
        for _ in 0..100 {
            if limiter.current_usage(&day_tokens()) == Some(expected) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        limiter.current_usage(&day_tokens())
    }

    fn body(meter: Meter, strip: bool) -> (MeteredBody, Upstream) {
        body_idle(meter, strip, Duration::from_secs(60))
    }

    fn body_idle(meter: Meter, strip: bool, idle: Duration) -> (MeteredBody, Upstream) {
        let (sender, receiver) = mpsc::unbounded();
        (
            MeteredBody::new(receiver.boxed(), strip, meter, idle),
            sender,
        )
    }

    fn send(upstream: &Upstream, text: &str) {
        upstream
            .unbounded_send(Ok(Bytes::from(text.to_owned())))
            .unwrap();
    }

    async fn next_text(body: &mut MeteredBody) -> Option<String> {
        let frame = body.frame().await?.unwrap();
        Some(String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap())
    }

    async fn events(store: &Arc<dyn Store>) -> Vec<UsageEvent> {
        let page = PageRequest {
            limit: 10,
            after: None,
        };
        store
            .list_usage_events(&UsageFilter::default(), page)
            .await
            .unwrap()
            .items
    }

    async fn wait_for_events(store: &Arc<dyn Store>) -> Vec<UsageEvent> {
        for _ in 0..100 {
            let found = events(store).await;
            if !found.is_empty() {
                return found;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("no event stored");
    }

    const CONTENT: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n";
    const FINISH: &str =
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n";
    const USAGE: &str = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":2,\"total_tokens\":12}}\n\n";

    #[tokio::test]
    async fn done_is_released_only_after_the_event_is_stored() {
        let (meter, store, limiter) = limited_meter().await;
        let (mut body, upstream) = body(meter, false);
        send(&upstream, CONTENT);
        assert_eq!(next_text(&mut body).await.unwrap(), CONTENT);
        send(&upstream, CONTENT);
        send(&upstream, &format!("{FINISH}{USAGE}data: [DONE]\n\n"));
        drop(upstream);
        assert_eq!(next_text(&mut body).await.unwrap(), CONTENT);
        assert_eq!(
            next_text(&mut body).await.unwrap(),
            format!("{FINISH}{USAGE}")
        );
        assert!(events(&store).await.is_empty());
        assert_eq!(next_text(&mut body).await.unwrap(), "data: [DONE]\n\n");
        // The event was committed before the last bytes were handed out.
        let stored = events(&store).await;
        assert_eq!(stored.len(), 1);
        let event = &stored[0];
        assert_eq!(event.status, UsageStatus::Completed);
        assert_eq!((event.input_tokens, event.output_tokens), (10, 2));
        assert!(!event.is_estimated);
        assert_eq!(event.request_id, "req_test");
        assert_eq!(event.request_metadata.as_deref(), Some(r#"{"k":1}"#));
        assert!(event.idempotency_key.starts_with("evt_"));
        // ... and the reservation settled to the reported 10 + 2.
        assert_eq!(limiter.current_usage(&day_tokens()), Some(12));
        assert!(next_text(&mut body).await.is_none());
        assert!(body.is_end_stream());
    }

    #[tokio::test]
    async fn a_stream_whose_event_cannot_be_stored_ends_with_an_error_not_done() {
        let (mut meter, _store, limiter) = limited_meter().await;
        // A store that refuses every write: its pools are closed.
        let refusing = Arc::new(SqliteStore::open("sqlite::memory:").await.unwrap());
        refusing.close().await;
        meter.outbox = Outbox::start(refusing).0;
        let (mut body, upstream) = body(meter, false);
        send(
            &upstream,
            &format!("{CONTENT}{FINISH}{USAGE}data: [DONE]\n\n"),
        );
        assert_eq!(
            next_text(&mut body).await.unwrap(),
            format!("{CONTENT}{FINISH}{USAGE}")
        );
        // The held [DONE] is never released: the client sees a broken stream.
        assert!(matches!(body.frame().await, Some(Err(MeteringError))));
        assert!(body.frame().await.is_none());
        // The tokens were used all the same.
        assert_eq!(limiter.current_usage(&day_tokens()), Some(12));
    }

    #[tokio::test]
    async fn done_ends_the_stream_at_once() {
        let (meter, store, limiter) = limited_meter().await;
        let (mut body, upstream) = body(meter, false);
        // The upstream keeps its connection open after [DONE].
        send(
            &upstream,
            &format!("{CONTENT}{FINISH}{USAGE}data: [DONE]\n\n"),
        );
        let mut text = String::new();
        let read = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(piece) = next_text(&mut body).await {
                text.push_str(&piece);
            }
        });
        read.await.expect("the body must end at [DONE]");
        assert_eq!(text, format!("{CONTENT}{FINISH}{USAGE}data: [DONE]\n\n"));
        assert!(upstream.is_closed(), "the upstream is let go at [DONE]");
        let stored = events(&store).await;
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].status, UsageStatus::Completed);
        assert_eq!(limiter.current_usage(&day_tokens()), Some(12));
    }

    #[tokio::test]
    async fn the_injected_usage_chunk_is_stripped_for_a_client_that_did_not_ask() {
        let (meter, store) = meter().await;
        let (mut body, upstream) = body(meter, true);
        send(
            &upstream,
            &format!("{CONTENT}{FINISH}{USAGE}data: [DONE]\n\n"),
        );
        drop(upstream);
        let mut text = String::new();
        while let Some(piece) = next_text(&mut body).await {
            text.push_str(&piece);
        }
        assert_eq!(text, format!("{CONTENT}{FINISH}data: [DONE]\n\n"));
        let stored = events(&store).await;
        assert_eq!((stored[0].input_tokens, stored[0].output_tokens), (10, 2));
    }

    #[tokio::test]
    async fn a_done_read_up_to_a_cr_takes_the_lf_that_follows() {
        let crlf = |text: &str| text.replace("\n", "\r\n");
        for lf_follows in [true, false] {
            let (meter, store, limiter) = limited_meter().await;
            let (mut body, upstream) = body(meter, false);
            send(&upstream, &crlf(&format!("{CONTENT}{USAGE}")));
            send(&upstream, "data: [DONE]\r\n\r");
            if lf_follows {
                let late = upstream.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    send(&late, "\n");
                });
            }
            let started = tokio::time::Instant::now();
            let mut text = String::new();
            while let Some(piece) = next_text(&mut body).await {
                text.push_str(&piece);
            }
            let ending = if lf_follows { "\r\n\r\n" } else { "\r\n\r" };
            assert_eq!(
                text,
                format!("{}data: [DONE]{ending}", crlf(&format!("{CONTENT}{USAGE}")))
            );
            // The upstream stays open either way: the wait is the grace at most.
            assert!(started.elapsed() < Duration::from_secs(2));
            assert!(upstream.is_closed());
            assert_eq!(events(&store).await[0].status, UsageStatus::Completed);
            assert_eq!(limiter.current_usage(&day_tokens()), Some(12));
        }
    }

    #[tokio::test]
    async fn dropping_mid_stream_closes_the_upstream_and_bills_client_cancelled() {
        let (meter, store, limiter) = limited_meter().await;
        let (mut body, upstream) = body(meter, false);
        for _ in 0..3 {
            send(&upstream, CONTENT);
            next_text(&mut body).await.unwrap();
        }
        drop(body);
        assert!(upstream.is_closed(), "the upstream stream must be dropped");
        let stored = wait_for_events(&store).await;
        assert_eq!(stored.len(), 1);
        let event = &stored[0];
        assert_eq!(event.status, UsageStatus::ClientCancelled);
        assert_eq!((event.input_tokens, event.output_tokens), (11, 3));
        assert!(event.is_estimated);
        // Settled with the event's own total.
        assert_eq!(settled_tokens(&limiter, 14).await, Some(14));
    }

    #[tokio::test]
    async fn a_cut_stream_ends_with_an_error_event_and_bills_what_passed() {
        let (meter, store) = meter().await;
        let (mut body, upstream) = body(meter, false);
        send(&upstream, CONTENT);
        send(&upstream, "data: {\"choices\":[{\"ind");
        drop(upstream);
        let mut text = String::new();
        while let Some(piece) = next_text(&mut body).await {
            text.push_str(&piece);
        }
        assert_eq!(
            text,
            format!(
                "{CONTENT}data: {{\"choices\":[{{\"ind\n\n{}",
                truncation_event()
            )
        );
        let event = &events(&store).await[0];
        assert_eq!(event.status, UsageStatus::UpstreamErrorMidStream);
        assert_eq!((event.input_tokens, event.output_tokens), (11, 1));
    }

    #[tokio::test]
    async fn a_cut_cr_framed_stream_gets_its_error_event_on_its_own() {
        let (meter, _store) = meter().await;
        let (mut body, upstream) = body(meter, false);
        let line = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\r";
        send(&upstream, line);
        drop(upstream);
        let mut text = String::new();
        while let Some(piece) = next_text(&mut body).await {
            text.push_str(&piece);
        }
        // CR ends the data line, the second CR is the blank line that dispatches it.
        assert_eq!(text, format!("{line}\r{}", truncation_event()));
    }

    #[tokio::test]
    async fn a_stream_that_opens_with_an_error_is_not_billed() {
        let (meter, store, limiter) = limited_meter().await;
        let (mut body, upstream) = body(meter, false);
        let error = "data: {\"error\":{\"message\":\"overloaded\"}}\n\ndata: [DONE]\n\n";
        send(&upstream, error);
        drop(upstream);
        let mut text = String::new();
        while let Some(piece) = next_text(&mut body).await {
            text.push_str(&piece);
        }
        assert_eq!(text, error);
        // Refunded before the body ended.
        assert_eq!(limiter.current_usage(&day_tokens()), Some(0));
        drop(body);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(events(&store).await.is_empty());
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_error_first_event_ends_is_refunded() {
        let (meter, store, limiter) = limited_meter().await;
        let (mut body, upstream) = body(meter, false);
        send(&upstream, "data: {\"error\":{\"message\":\"m\"}}\n\n");
        next_text(&mut body).await.unwrap();
        drop(body);
        assert_eq!(settled_tokens(&limiter, 0).await, Some(0));
        assert!(events(&store).await.is_empty());
    }

    #[tokio::test]
    async fn an_unused_meter_refunds_its_reservation() {
        let (meter, _store, limiter) = limited_meter().await;
        drop(meter);
        assert_eq!(settled_tokens(&limiter, 0).await, Some(0));
    }

    #[tokio::test]
    async fn a_complete_answer_left_by_its_client_is_billed_by_estimate() {
        let (first, store, limiter) = limited_meter().await;
        drop(CancelGuard::new(first));
        let stored = wait_for_events(&store).await;
        assert_eq!(stored[0].status, UsageStatus::ClientCancelled);
        assert_eq!((stored[0].input_tokens, stored[0].output_tokens), (11, 0));
        assert!(stored[0].is_estimated);
        assert_eq!(settled_tokens(&limiter, 11).await, Some(11));

        let (second, store) = meter().await;
        let guard = CancelGuard::new(second);
        assert!(guard.disarm().is_some());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(events(&store).await.is_empty());
    }

    #[tokio::test]
    async fn a_silent_upstream_is_ended_after_the_idle_bound_and_billed_as_cut() {
        let (meter, store) = meter().await;
        let (mut body, upstream) = body_idle(meter, false, Duration::from_millis(100));
        send(&upstream, CONTENT);
        assert_eq!(next_text(&mut body).await.unwrap(), CONTENT);
        // Bytes keep the stream alive: three reads 60 ms apart outlast the 100 ms bound.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(60)).await;
            send(&upstream, CONTENT);
            assert_eq!(next_text(&mut body).await.unwrap(), CONTENT);
        }
        let started = tokio::time::Instant::now();
        assert_eq!(next_text(&mut body).await.unwrap(), truncation_event());
        assert!(started.elapsed() >= Duration::from_millis(100));
        assert!(next_text(&mut body).await.is_none());
        assert!(upstream.is_closed(), "the silent upstream must be dropped");
        let stored = events(&store).await;
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].status, UsageStatus::UpstreamErrorMidStream);
        assert_eq!((stored[0].input_tokens, stored[0].output_tokens), (11, 4));
    }

    #[tokio::test]
    async fn time_the_client_takes_to_read_is_not_upstream_silence() {
        let (meter, store) = meter().await;
        let (mut body, upstream) = body_idle(meter, false, Duration::from_millis(100));
        send(&upstream, CONTENT);
        assert_eq!(next_text(&mut body).await.unwrap(), CONTENT);
        // The client reads again only after 150 ms; the upstream answers 50 ms later.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let late = upstream.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            send(&late, &format!("{FINISH}{USAGE}data: [DONE]\n\n"));
            late.close_channel();
        });
        let mut text = String::new();
        while let Some(piece) = next_text(&mut body).await {
            text.push_str(&piece);
        }
        assert_eq!(text, format!("{FINISH}{USAGE}data: [DONE]\n\n"));
        assert_eq!(events(&store).await[0].status, UsageStatus::Completed);
    }

    #[tokio::test]
    async fn an_error_event_then_silence_ends_without_a_second_error() {
        let (meter, store) = meter().await;
        let (mut body, upstream) = body_idle(meter, false, Duration::from_millis(100));
        let error = "data: {\"error\":{\"message\":\"m\"}}\n\n";
        send(&upstream, &format!("{CONTENT}{error}"));
        assert_eq!(
            next_text(&mut body).await.unwrap(),
            format!("{CONTENT}{error}")
        );
        assert!(next_text(&mut body).await.is_none());
        let stored = events(&store).await;
        assert_eq!(stored[0].status, UsageStatus::UpstreamErrorMidStream);
        assert_eq!((stored[0].input_tokens, stored[0].output_tokens), (11, 1));
        drop(upstream);
    }

    #[tokio::test]
    async fn a_client_leaving_after_an_error_event_is_billed_as_the_upstream_error() {
        let (meter, store) = meter().await;
        let (mut body, upstream) = body(meter, false);
        send(&upstream, CONTENT);
        send(&upstream, "data: {\"error\":{\"message\":\"m\"}}\n\n");
        next_text(&mut body).await.unwrap();
        next_text(&mut body).await.unwrap();
        drop(body);
        let stored = wait_for_events(&store).await;
        assert_eq!(stored[0].status, UsageStatus::UpstreamErrorMidStream);
        assert_eq!((stored[0].input_tokens, stored[0].output_tokens), (11, 1));
    }
}
