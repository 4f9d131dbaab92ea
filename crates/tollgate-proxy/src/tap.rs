//! The usage tap: reads usage out of upstream bytes as they pass (UPSTREAMS.md rules).
//!
//! INTERFACE STUB — the bodies below are placeholders to be replaced by the real
//! incremental SSE parser; the signatures are the contract the proxy codes against.

use bytes::Bytes;

/// Token counts as reported by an upstream (or estimated).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// `prompt_tokens_details.cached_tokens`; part of `prompt_tokens`.
    pub cached_tokens: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

/// How a stream ended (rule 10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// `data: [DONE]` seen.
    Done,
    /// A choice finished (`finish_reason` set) but no `[DONE]` came.
    FinishedWithoutDone,
    /// The upstream sent an error event (a payload with a top-level `error`).
    ErrorEvent,
    /// EOF or reset with neither a finish nor `[DONE]`.
    Truncated,
}

/// What the tap learned from a whole stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSummary {
    /// The last usage the upstream reported (last wins, never summed); `None` when it
    /// reported none (null / absent / all-zero at the end).
    pub usage: Option<Usage>,
    pub end: StreamEnd,
    /// True when the very first event was an error (a failed request, nothing billable).
    pub is_error_first: bool,
    /// Content-bearing chunks seen (used to estimate completion tokens when the upstream
    /// reported no usage).
    pub content_chunks: u64,
}

/// Incremental tap over an SSE body.
#[derive(Debug)]
pub struct StreamTap {
    strip_usage_chunk: bool,
}

impl StreamTap {
    /// `strip_usage_chunk`: drop the usage-only chunk (`choices: []` + usage) from what
    /// is forwarded, because the gateway injected `include_usage` and the client did not
    /// ask for it.
    pub fn new(strip_usage_chunk: bool) -> Self {
        Self { strip_usage_chunk }
    }

    /// Feeds one read from the upstream; returns the bytes to forward now, unchanged and
    /// in order (except the stripped usage chunk). May hold back an incomplete event only
    /// when stripping.
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        let _ = self.strip_usage_chunk;
        chunk
    }

    /// At upstream EOF (or reset): the bytes still held back, to forward.
    pub fn finish(&mut self) -> Bytes {
        Bytes::new()
    }

    /// What was learned so far (callable at any time, e.g. on client disconnect).
    pub fn summary(&self) -> StreamSummary {
        StreamSummary {
            usage: None,
            end: StreamEnd::Truncated,
            is_error_first: false,
            content_chunks: 0,
        }
    }
}

/// Outcome of a non-streamed 2xx body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodySummary {
    pub usage: Option<Usage>,
    /// A 2xx whose JSON has a top-level `error`.
    pub is_error: bool,
}

/// Reads usage from a complete non-streamed JSON body.
pub fn summarize_body(body: &[u8]) -> BodySummary {
    let _ = body;
    BodySummary {
        usage: None,
        is_error: false,
    }
}
