//! Turning a stream's events into bytes on the wire: framing (line endings, `data:`
//! spacing, comments, BOM...), delivery (how bytes are cut into writes) and timing.
//!
//! The body is generated lazily as hyper polls it, so when the client goes away and
//! hyper drops the body, generation stops and the `AnswerGuard` records the disconnect.

use std::collections::VecDeque;
use std::io;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;

use crate::journal::AnswerGuard;
use crate::net::ConnectionReset;
use crate::reply::{Payload, StreamPlan, Tail};
use crate::script::{Delivery, Framing};

/// One thing the body does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    Write(Bytes),
    Sleep(Duration),
}

/// The bytes and pauses of a whole stream.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Wire {
    pub(crate) steps: VecDeque<Step>,
    pub(crate) tail: Tail,
}

/// Frames and cuts `plan` as `framing` and `delivery` say, pausing `interval` between
/// events.
pub(crate) fn wire(
    plan: &StreamPlan,
    framing: Framing,
    delivery: Delivery,
    interval: Duration,
) -> Wire {
    let count = plan.events.len();
    let mut framed: Vec<Vec<u8>> = plan
        .events
        .iter()
        .enumerate()
        .map(|(index, (payload, _))| {
            let is_unterminated = plan.is_done_unterminated && index + 1 == count;
            frame(framing, index, payload, is_unterminated)
        })
        .collect();
    if plan.tail == Tail::HalfLastThenEnd {
        if let Some(last) = framed.last_mut() {
            last.truncate(last.len() / 2);
        }
    }
    let mut steps = VecDeque::new();
    if delivery == Delivery::OneRead {
        steps.push_back(Step::Write(Bytes::from(framed.concat())));
        return Wire {
            steps,
            tail: plan.tail,
        };
    }
    for (index, bytes) in framed.into_iter().enumerate() {
        if index > 0 && !interval.is_zero() {
            steps.push_back(Step::Sleep(interval));
        }
        match delivery {
            Delivery::Bytewise => {
                steps.extend(
                    bytes
                        .iter()
                        .map(|b| Step::Write(Bytes::copy_from_slice(&[*b]))),
                );
            }
            Delivery::SplitUtf8 => {
                let cut = utf8_cut(&bytes);
                let mut bytes = Bytes::from(bytes);
                let head = bytes.split_to(cut);
                steps.extend(
                    [head, bytes]
                        .into_iter()
                        .filter(|b| !b.is_empty())
                        .map(Step::Write),
                );
            }
            Delivery::Normal | Delivery::OneRead => {
                steps.push_back(Step::Write(Bytes::from(bytes)))
            }
        }
    }
    Wire {
        steps,
        tail: plan.tail,
    }
}

/// Inside the first multi-byte character (after its first byte), else the middle.
fn utf8_cut(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .position(|b| *b >= 0xC0)
        .map_or(bytes.len() / 2, |lead| lead + 1)
}

/// One event's bytes. `index` is the event's position (some framings vary with it).
fn frame(framing: Framing, index: usize, payload: &Payload, is_unterminated: bool) -> Vec<u8> {
    let end = match framing {
        Framing::Crlf => "\r\n",
        Framing::Cr => "\r",
        _ => "\n",
    };
    let text = match payload {
        Payload::Json(value) if framing == Framing::Multiline => {
            serde_json::to_string_pretty(value).unwrap_or_default()
        }
        Payload::Json(value) => value.to_string(),
        Payload::Text(text) => text.clone(),
        Payload::Done => "[DONE]".to_owned(),
    };
    let mut out = String::new();
    match framing {
        Framing::Bom if index == 0 => out.push('\u{FEFF}'),
        Framing::Comments => {
            if index == 0 {
                out.push_str(":\n: keep-alive\n\n");
            }
            // A comment right before the event, with no blank line of its own.
            out.push_str(&format!(
                ": ping - 2025-01-01 00:00:{:02}.000000+00:00\n",
                index % 60
            ));
        }
        Framing::KeepaliveData => {
            out.push_str(if index % 2 == 1 {
                "data:\n\n"
            } else {
                "data: : keepalive\n\n"
            });
        }
        Framing::EventId => {
            let kind = match payload {
                Payload::Json(value) if value.get("error").is_some() => "error",
                _ => "message",
            };
            if index == 0 {
                out.push_str("retry: 3000\n");
            }
            out.push_str(&format!("event: {kind}\nid: {index}\n"));
        }
        _ => {}
    }
    let prefix = match framing {
        Framing::NoSpace => "data:",
        Framing::TwoSpace => "data:  ",
        _ => "data: ",
    };
    for line in text.split('\n') {
        out.push_str(prefix);
        out.push_str(line);
        if framing == Framing::TrailingSpaces {
            out.push_str("   ");
        }
        out.push_str(end);
    }
    if !is_unterminated {
        out.push_str(end);
    }
    if framing == Framing::Comments && index % 3 == 2 {
        out.push_str(": keep-alive\n\n");
    }
    out.into_bytes()
}

/// Pause before cutting a connection, so the bytes written before the cut reach the
/// client first (hyper flushes when the body is pending; a reset could otherwise
/// overtake them), as they would from a real server dying mid-stream.
const CUT_GRACE: Duration = Duration::from_millis(50);

/// The response body: plays the steps, then the tail; dropping it early (the client left)
/// drops the guard unfinished, which records the disconnect.
pub(crate) fn body(
    wire: Wire,
    guard: AnswerGuard,
    reset: ConnectionReset,
) -> impl Stream<Item = io::Result<Bytes>> + Send {
    struct State {
        steps: VecDeque<Step>,
        tail: Tail,
        guard: AnswerGuard,
        reset: ConnectionReset,
    }
    let state = State {
        steps: wire.steps,
        tail: wire.tail,
        guard,
        reset,
    };
    futures::stream::unfold(Some(state), |state| async move {
        let mut state = state?;
        while let Some(step) = state.steps.pop_front() {
            match step {
                Step::Sleep(pause) => tokio::time::sleep(pause).await,
                Step::Write(bytes) => return Some((Ok(bytes), Some(state))),
            }
        }
        match state.tail {
            Tail::End | Tail::HalfLastThenEnd => {
                state.guard.finish();
                None
            }
            Tail::Abort => {
                tokio::time::sleep(CUT_GRACE).await;
                state.guard.finish();
                Some((
                    Err(io::Error::other("mock upstream: connection dropped")),
                    None,
                ))
            }
            Tail::Reset => {
                tokio::time::sleep(CUT_GRACE).await;
                state.guard.finish();
                state.reset.arm();
                Some((
                    Err(io::Error::other("mock upstream: connection reset")),
                    None,
                ))
            }
            Tail::Stall => {
                std::future::pending::<()>().await;
                None
            }
        }
    })
}
