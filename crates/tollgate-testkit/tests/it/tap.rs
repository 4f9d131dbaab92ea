//! The usage tap over bytes the mock really sent, read by read as the gateway gets them:
//! passing through must forward the exact bytes; stripping must remove exactly the
//! usage-only chunk; both must reach the same exact summary.

use bytes::Bytes;
use serde_json::json;
use tollgate_proxy::tap::{StreamEnd, StreamSummary, StreamTap, Usage};
use tollgate_testkit::MockUpstream;

use crate::support::{concat, stream, Stop};

struct Case {
    /// Script keys after `echo?prompt_tokens=10&completion_tokens=5&`.
    script: &'static str,
    expected: StreamSummary,
    /// The stream carries a usage-only chunk (`choices: []`) that stripping removes.
    has_usage_chunk: bool,
    stop: Stop,
    is_usage_asked: bool,
    choices: u64,
    api: &'static str,
}

fn case(script: &'static str, expected: StreamSummary) -> Case {
    Case {
        script,
        expected,
        has_usage_chunk: true,
        stop: Stop::End,
        is_usage_asked: true,
        choices: 1,
        api: "/chat/completions",
    }
}

impl Case {
    fn without_usage_chunk(mut self) -> Self {
        self.has_usage_chunk = false;
        self
    }
    fn stopping(mut self, stop: Stop) -> Self {
        self.stop = stop;
        self
    }
    fn unasked(mut self) -> Self {
        self.is_usage_asked = false;
        self
    }
}

fn usage(prompt: u64, completion: u64, cached: u64) -> Option<Usage> {
    Some(Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        cached_tokens: cached,
    })
}

fn summary(usage: Option<Usage>, end: StreamEnd, chunks: u64) -> StreamSummary {
    StreamSummary {
        usage,
        end,
        is_error_first: false,
        content_chunks: chunks,
    }
}

fn full() -> StreamSummary {
    summary(usage(10, 5, 0), StreamEnd::Done, 5)
}

fn error(first: bool, chunks: u64) -> StreamSummary {
    StreamSummary {
        usage: None,
        end: StreamEnd::ErrorEvent,
        is_error_first: first,
        content_chunks: chunks,
    }
}

fn tap(frames: &[Bytes], strip: bool) -> (Vec<u8>, StreamSummary) {
    let mut tap = StreamTap::new(strip);
    let mut out = Vec::new();
    for frame in frames {
        out.extend_from_slice(&tap.feed(frame.clone()));
    }
    out.extend_from_slice(&tap.finish());
    (out, tap.summary())
}

/// `stripped` is `raw` less one contiguous region holding the usage-only chunk.
fn assert_usage_chunk_removed(raw: &[u8], stripped: &[u8], script: &str) {
    assert!(stripped.len() < raw.len(), "{script}: nothing stripped");
    let prefix = raw.iter().zip(stripped).take_while(|(a, b)| a == b).count();
    let removed = raw.len() - stripped.len();
    assert_eq!(
        &raw[prefix + removed..],
        &stripped[prefix..],
        "{script}: more than one region differs"
    );
    let region = String::from_utf8_lossy(&raw[prefix..prefix + removed]).replace(' ', "");
    assert!(
        region.contains("\"choices\":[]") && region.contains("\"usage\":{"),
        "{script}: removed {region:?}"
    );
}

async fn run(mock: &MockUpstream, case: &Case) {
    let model = format!("echo?prompt_tokens=10&completion_tokens=5&{}", case.script);
    let mut body = json!({
        "model": model.trim_end_matches('&'),
        "messages": [{"role": "user", "content": "Équipe 🚀 Δ"}],
        "prompt": "Équipe 🚀 Δ",
        "stream": true,
        "n": case.choices,
    });
    if case.is_usage_asked {
        body["stream_options"] = json!({"include_usage": true});
    }
    let (frames, stop) = stream(mock, case.api, &body).await;
    assert_eq!(stop, case.stop, "{}: how the body stopped", case.script);
    let raw = concat(&frames);

    let (forwarded, got) = tap(&frames, false);
    assert_eq!(forwarded, raw, "{}: passing through", case.script);
    assert_eq!(got, case.expected, "{}: summary", case.script);

    let (stripped, got) = tap(&frames, true);
    assert_eq!(
        got, case.expected,
        "{}: summary when stripping",
        case.script
    );
    if case.has_usage_chunk {
        assert_usage_chunk_removed(&raw, &stripped, case.script);
    } else {
        assert_eq!(stripped, raw, "{}: nothing to strip", case.script);
    }

    let (_, whole) = tap(&[Bytes::from(raw)], true);
    assert_eq!(whole, case.expected, "{}: summary of one read", case.script);
}

async fn run_all(cases: Vec<Case>) {
    let mock = MockUpstream::start().await.unwrap();
    for case in &cases {
        run(&mock, case).await;
    }
}

#[tokio::test]
async fn tap_over_every_framing() {
    let framings = [
        "framing=lf",
        "framing=crlf",
        "framing=cr",
        "framing=nospace",
        "framing=twospace",
        "framing=bom",
        "framing=multiline",
        "framing=comments",
        "framing=keepalive_data",
        "framing=event_id",
        "framing=trailing_spaces",
    ];
    run_all(framings.into_iter().map(|f| case(f, full())).collect()).await;
}

#[tokio::test]
async fn tap_over_every_delivery() {
    run_all(vec![
        case("delivery=bytewise", full()),
        case("delivery=split_utf8", full()),
        case("delivery=one_read", full()),
        case("delivery=bytewise&framing=crlf", full()),
        case("delivery=split_utf8&framing=multiline", full()),
    ])
    .await;
}

#[tokio::test]
async fn tap_over_every_ending() {
    run_all(vec![
        case("ending=done", full()),
        case("ending=done_no_blank", full()),
        case(
            "ending=no_done",
            summary(usage(10, 5, 0), StreamEnd::FinishedWithoutDone, 5),
        ),
        case(
            "ending=eof_mid_event",
            summary(None, StreamEnd::FinishedWithoutDone, 5),
        )
        .without_usage_chunk(),
        case(
            "ending=eof_mid_event&include_usage=never",
            summary(None, StreamEnd::Truncated, 5),
        )
        .without_usage_chunk(),
        case("ending=reset", summary(None, StreamEnd::Truncated, 5))
            .without_usage_chunk()
            .stopping(Stop::Error),
        case("ending=stall", summary(None, StreamEnd::Truncated, 5))
            .without_usage_chunk()
            .stopping(Stop::Idle),
        case("drop_after=3", summary(None, StreamEnd::Truncated, 3))
            .without_usage_chunk()
            .stopping(Stop::Error),
        case(
            "drop_after=3&usage_on=every",
            summary(usage(10, 3, 0), StreamEnd::Truncated, 3),
        )
        .without_usage_chunk()
        .stopping(Stop::Error),
    ])
    .await;
}

#[tokio::test]
async fn tap_over_every_usage_placement() {
    let mut two_choices = case(
        "usage_on=every",
        summary(usage(10, 10, 0), StreamEnd::Done, 10),
    );
    two_choices.choices = 2;
    run_all(vec![
        case("usage_on=final", full()),
        case("usage_on=null_then_final", full()),
        case("usage_on=every", full()),
        two_choices,
        case("usage_on=finish_chunk", full()).without_usage_chunk(),
        case("usage_on=none", summary(None, StreamEnd::Done, 5)).without_usage_chunk(),
        case("usage_on=zeros_then_final", full()),
        case(
            "cached_tokens=4",
            summary(usage(10, 5, 4), StreamEnd::Done, 5),
        ),
        case("cached_tokens=0", full()),
        case("omit_total=true&reasoning_tokens=3&extras=true", full()),
        case("", summary(None, StreamEnd::Done, 5))
            .without_usage_chunk()
            .unasked(),
        case("include_usage=never", summary(None, StreamEnd::Done, 5)).without_usage_chunk(),
    ])
    .await;
}

#[tokio::test]
async fn tap_over_ids_and_completions() {
    let mut completions = case("", full());
    completions.api = "/completions";
    let mut completions_zeros = case("usage_on=zeros_then_final", full());
    completions_zeros.api = "/completions";
    run_all(vec![
        case("id=empty", full()),
        case("id=per_chunk", full()),
        case("id=fixed", full()),
        completions,
        completions_zeros,
    ])
    .await;
}

#[tokio::test]
async fn tap_over_error_events() {
    run_all(vec![
        case("error_event=first", error(true, 0)).without_usage_chunk(),
        case(
            "error_event=first&then=eof&error_shape=string",
            error(true, 0),
        )
        .without_usage_chunk(),
        case("error_event=after:2", error(false, 2)).without_usage_chunk(),
        case(
            "error_event=after:2&then=eof&error_shape=nested_int_code",
            error(false, 2),
        )
        .without_usage_chunk(),
        case(
            "error_event=after:2&then=nothing&error_shape=flat",
            error(false, 2),
        )
        .without_usage_chunk()
        .stopping(Stop::Idle),
        case("error_event=after:2&error_shape=detail", error(false, 2)).without_usage_chunk(),
        case("error_event=after:2&framing=event_id", error(false, 2)).without_usage_chunk(),
        case(
            "error_event=after:2&delivery=bytewise&framing=crlf",
            error(false, 2),
        )
        .without_usage_chunk(),
    ])
    .await;
}

#[tokio::test]
async fn plain_text_error_events_are_invisible_to_the_tap() {
    // A non-JSON error line cannot be told from a keep-alive: the tap skips it, and the
    // missing finish leaves the stream classed as ended by `[DONE]` with no usage.
    run_all(vec![case(
        "error_event=after:2&error_shape=text",
        summary(None, StreamEnd::Done, 2),
    )
    .without_usage_chunk()])
    .await;
}
