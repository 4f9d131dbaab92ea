//! What the mock saw: every request (any path), and which answers the client cut short.
//!
//! Kept in a `watch` channel so tests can read it synchronously and also await a change
//! (a disconnect is noticed asynchronously, after the client has gone).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method};
use serde_json::Value;
use tokio::sync::watch;

/// Requests kept in memory (oldest dropped first), so a long-running demo stays bounded.
const KEPT_REQUESTS: usize = 1024;

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: Method,
    /// Path and query, as sent.
    pub path: String,
    pub headers: HeaderMap,
    /// The body parsed as JSON (`Null` when empty or not JSON).
    pub body: Value,
    /// The body exactly as received.
    pub raw_body: Bytes,
    /// The client closed the connection before the mock finished answering.
    pub is_cut_by_client: bool,
}

impl RecordedRequest {
    /// A header's value, when present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Debug, Default)]
pub(crate) struct Journal {
    requests: VecDeque<(u64, RecordedRequest)>,
    next_seq: u64,
    disconnects: u64,
}

/// A shared handle on the journal.
#[derive(Debug, Clone)]
pub(crate) struct Recorder(Arc<watch::Sender<Journal>>);

impl Default for Recorder {
    fn default() -> Self {
        Self(Arc::new(watch::Sender::new(Journal::default())))
    }
}

impl Recorder {
    /// Records a request; the guard records a disconnect unless told the answer finished.
    pub(crate) fn record(&self, request: RecordedRequest) -> AnswerGuard {
        let mut seq = 0;
        self.0.send_modify(|journal| {
            seq = journal.next_seq;
            journal.next_seq += 1;
            if journal.requests.len() == KEPT_REQUESTS {
                journal.requests.pop_front();
            }
            journal.requests.push_back((seq, request));
        });
        AnswerGuard {
            recorder: self.clone(),
            seq,
            is_finished: false,
        }
    }

    pub(crate) fn requests(&self) -> Vec<RecordedRequest> {
        let journal = self.0.borrow();
        journal.requests.iter().map(|(_, r)| r.clone()).collect()
    }

    pub(crate) fn disconnects(&self) -> u64 {
        self.0.borrow().disconnects
    }

    pub(crate) fn clear(&self) {
        self.0.send_modify(|journal| {
            journal.requests.clear();
            journal.disconnects = 0;
        });
    }

    /// Waits until `ready` holds for the journal, at most `within`; returns whether it did.
    pub(crate) async fn wait_until(
        &self,
        within: Duration,
        ready: impl FnMut(&Journal) -> bool,
    ) -> bool {
        let mut receiver = self.0.subscribe();
        let waited = tokio::time::timeout(within, receiver.wait_for(ready)).await;
        matches!(waited, Ok(Ok(_)))
    }
}

impl Journal {
    pub(crate) fn disconnects(&self) -> u64 {
        self.disconnects
    }

    pub(crate) fn request_count(&self) -> u64 {
        self.next_seq
    }
}

/// Held while the mock answers one request; dropped early = the client went away.
#[derive(Debug)]
pub(crate) struct AnswerGuard {
    recorder: Recorder,
    seq: u64,
    is_finished: bool,
}

impl AnswerGuard {
    /// The request's position in arrival order (0 for the first).
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    /// The answer went out in full (or the mock itself chose to cut it).
    pub(crate) fn finish(&mut self) {
        self.is_finished = true;
    }
}

impl Drop for AnswerGuard {
    fn drop(&mut self) {
        if self.is_finished {
            return;
        }
        let seq = self.seq;
        self.recorder.0.send_modify(|journal| {
            journal.disconnects += 1;
            if let Some((_, request)) = journal.requests.iter_mut().find(|(s, _)| *s == seq) {
                request.is_cut_by_client = true;
            }
        });
    }
}
