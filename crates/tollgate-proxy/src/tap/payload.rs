//! Reading one JSON payload: usage, errors, finish and content, whatever the server.
//!
//! Nothing here indexes `choices[0]` or trusts a field's type: a field of an unexpected
//! shape counts as absent (UPSTREAMS.md rules 5, 6, 9).

use serde_json::{Map, Value};

use super::Usage;

/// What a `data:` payload of a stream was.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Payload {
    /// `[DONE]`.
    Done,
    /// A JSON object.
    Chunk(ChunkFacts),
    /// Empty data, a disguised keep-alive, anything that is not a JSON object.
    Other,
}

/// What one JSON chunk says.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct ChunkFacts {
    pub(super) is_error: bool,
    /// `choices: []` and a `usage` object: the chunk `include_usage` adds.
    pub(super) is_usage_only: bool,
    /// Usage reported in this chunk (numbers only, all-zero included).
    pub(super) usage: Option<ReportedUsage>,
    /// Choices carrying generated text (content, reasoning, tool-call arguments).
    pub(super) content_choices: u64,
    /// A choice has a `finish_reason`.
    pub(super) has_finish: bool,
}

pub(super) fn read_payload(data: &[u8]) -> Payload {
    if data.trim_ascii() == b"[DONE]" {
        return Payload::Done;
    }
    match serde_json::from_slice::<Value>(data) {
        Ok(Value::Object(chunk)) => Payload::Chunk(read_chunk(&chunk)),
        _ => Payload::Other,
    }
}

pub(super) fn read_chunk(chunk: &Map<String, Value>) -> ChunkFacts {
    let choices = chunk.get("choices").and_then(Value::as_array);
    let usage = chunk.get("usage").and_then(ReportedUsage::from_json);
    let mut facts = ChunkFacts {
        is_error: is_error(chunk),
        is_usage_only: choices.is_some_and(|c| c.is_empty())
            && chunk.get("usage").is_some_and(Value::is_object),
        usage,
        ..ChunkFacts::default()
    };
    for choice in choices.into_iter().flatten().filter_map(Value::as_object) {
        if choice
            .get("finish_reason")
            .and_then(Value::as_str)
            .is_some_and(|r| !r.is_empty())
        {
            facts.has_finish = true;
        }
        if carries_text(choice) {
            facts.content_choices += 1;
        }
    }
    facts.is_usage_only &= !facts.is_error;
    facts
}

/// A top-level `error` (object or string), a flat `{"object": "error"}`, or a FastAPI
/// `{"detail": ...}` that is not a response.
pub(super) fn is_error(object: &Map<String, Value>) -> bool {
    matches!(
        object.get("error"),
        Some(Value::Object(_) | Value::String(_))
    ) || object.get("object").and_then(Value::as_str) == Some("error")
        || (object.contains_key("detail")
            && !object.contains_key("choices")
            && !object.contains_key("data"))
}

fn carries_text(choice: &Map<String, Value>) -> bool {
    let is_text = |v: Option<&Value>| v.and_then(Value::as_str).is_some_and(|s| !s.is_empty());
    let delta = choice.get("delta").and_then(Value::as_object);
    is_text(choice.get("text"))
        || delta.is_some_and(|d| {
            is_text(d.get("content"))
                || is_text(d.get("reasoning_content"))
                || is_text(d.get("reasoning"))
                || d.get("tool_calls")
                    .and_then(Value::as_array)
                    .is_some_and(|calls| !calls.is_empty())
        })
}

/// Usage as an upstream reported it, field by field (absent = `None`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct ReportedUsage {
    prompt: Option<u64>,
    completion: Option<u64>,
    total: Option<u64>,
    cached: Option<u64>,
}

impl ReportedUsage {
    /// `Some` only for an object carrying at least one token count.
    pub(super) fn from_json(usage: &Value) -> Option<Self> {
        let usage = usage.as_object()?;
        let reported = Self {
            prompt: count(usage.get("prompt_tokens")),
            completion: count(usage.get("completion_tokens")),
            total: count(usage.get("total_tokens")),
            cached: usage
                .get("prompt_tokens_details")
                .and_then(Value::as_object)
                .and_then(|details| count(details.get("cached_tokens"))),
        };
        let has_counts =
            reported.prompt.is_some() || reported.completion.is_some() || reported.total.is_some();
        has_counts.then_some(reported)
    }

    /// Every count reported is zero: a placeholder, not a measurement.
    pub(super) fn is_all_zero(&self) -> bool {
        [self.prompt, self.completion, self.total]
            .into_iter()
            .flatten()
            .all(|n| n == 0)
    }

    /// Later figures replace earlier ones field by field; a field the later report lacks
    /// keeps its earlier value (rules 7 and 8: last wins, never summed).
    pub(super) fn merge(&mut self, later: Self) {
        self.prompt = later.prompt.or(self.prompt);
        self.completion = later.completion.or(self.completion);
        self.total = later.total.or(self.total);
        self.cached = later.cached.or(self.cached);
    }

    /// The usage to bill, or `None` when nothing usable was reported. A missing prompt or
    /// completion count is derived from `total_tokens` when it can be.
    pub(super) fn resolve(&self) -> Option<Usage> {
        let (prompt, completion) = match (self.prompt, self.completion, self.total) {
            (Some(p), Some(c), _) => (p, c),
            (Some(p), None, total) => (p, total.map_or(0, |t| t.saturating_sub(p))),
            (None, Some(c), total) => (total.map_or(0, |t| t.saturating_sub(c)), c),
            (None, None, _) => return None,
        };
        if prompt == 0 && completion == 0 {
            return None;
        }
        Some(Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_tokens: self.cached.unwrap_or(0).min(prompt),
        })
    }
}

/// A non-negative whole number, including one written as `12.0`.
fn count(value: Option<&Value>) -> Option<u64> {
    let value = value?;
    value.as_u64().or_else(|| {
        value
            .as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0 && f.fract() == 0.0 && *f < 1.8e19)
            .map(|f| f as u64)
    })
}
