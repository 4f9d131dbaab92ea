//! Reading one JSON payload: usage, errors, finish and content, whatever the server.
//!
//! Nothing here indexes `choices[0]` or trusts a field's type: a field of an unexpected
//! shape counts as absent (UPSTREAMS.md rules 5, 6, 9). The payload is read in one pass
//! without building it: each field the tap needs is read for the one shape it expects
//! ([`Shape`]), every other field and every other shape is skipped unbuilt. A key given
//! twice counts as its last occurrence, as in any JSON object model.

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

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
    read_object(data).map_or(Payload::Other, Payload::Chunk)
}

/// The facts of `data` when it is one JSON object in valid UTF-8 (surrounding whitespace
/// allowed); `None` for anything else.
pub(super) fn read_object(data: &[u8]) -> Option<ChunkFacts> {
    // Validated whole, so that bad UTF-8 in a skipped field refuses the payload too.
    let text = std::str::from_utf8(data).ok()?;
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let top = Lenient(TopShape).deserialize(&mut deserializer).ok()?;
    deserializer.end().ok()?;
    top.map(Top::facts)
}

/// The top-level fields the tap reads.
#[derive(Debug, Default)]
struct Top {
    /// `error` is an object or a string.
    has_error: bool,
    /// `object` is `"error"`.
    is_error_object: bool,
    has_detail: bool,
    has_data: bool,
    /// `Some` when the key is present, whatever its value; `Some(Some(_))` for an array.
    choices: Option<Option<Choices>>,
    /// `Some` when `usage` is an object.
    usage: Option<UsageObject>,
}

impl Top {
    fn facts(self) -> ChunkFacts {
        // A top-level `error` (object or string), a flat `{"object": "error"}`, or a
        // FastAPI `{"detail": ...}` that is not a response.
        let is_error = self.has_error
            || self.is_error_object
            || (self.has_detail && self.choices.is_none() && !self.has_data);
        let choices = self.choices.flatten().unwrap_or_default();
        ChunkFacts {
            is_error,
            is_usage_only: choices.is_empty && self.usage.is_some() && !is_error,
            usage: self.usage.and_then(|usage| usage.0),
            content_choices: choices.content_choices,
            has_finish: choices.has_finish,
        }
    }
}

/// What a `choices` array holds.
#[derive(Debug, Default)]
struct Choices {
    is_empty: bool,
    content_choices: u64,
    has_finish: bool,
}

/// One element of `choices` (all false for an element that is not an object).
#[derive(Debug, Default)]
struct Choice {
    /// `finish_reason` is a non-empty string.
    has_finish: bool,
    /// `text` is a non-empty string.
    has_text: bool,
    /// `delta` is an object carrying text.
    has_delta_text: bool,
}

/// A `usage` object: its counts when it has at least one.
#[derive(Debug, Default)]
struct UsageObject(Option<ReportedUsage>);

/// The object keys the tap knows; any other is skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Error,
    Object,
    Detail,
    Data,
    Choices,
    Usage,
    PromptTokens,
    CompletionTokens,
    TotalTokens,
    PromptTokensDetails,
    CachedTokens,
    FinishReason,
    Text,
    Delta,
    Content,
    ReasoningContent,
    Reasoning,
    ToolCalls,
    Other,
}

impl Field {
    fn of(name: &str) -> Self {
        match name {
            "error" => Self::Error,
            "object" => Self::Object,
            "detail" => Self::Detail,
            "data" => Self::Data,
            "choices" => Self::Choices,
            "usage" => Self::Usage,
            "prompt_tokens" => Self::PromptTokens,
            "completion_tokens" => Self::CompletionTokens,
            "total_tokens" => Self::TotalTokens,
            "prompt_tokens_details" => Self::PromptTokensDetails,
            "cached_tokens" => Self::CachedTokens,
            "finish_reason" => Self::FinishReason,
            "text" => Self::Text,
            "delta" => Self::Delta,
            "content" => Self::Content,
            "reasoning_content" => Self::ReasoningContent,
            "reasoning" => Self::Reasoning,
            "tool_calls" => Self::ToolCalls,
            _ => Self::Other,
        }
    }
}

impl<'de> DeserializeSeed<'de> for Field {
    type Value = Self;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(FieldVisitor)
    }
}

struct FieldVisitor;

impl Visitor<'_> for FieldVisitor {
    type Value = Field;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("an object key")
    }

    fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Field, E> {
        Ok(Field::of(name))
    }
}

/// Reads the fields of an object, each by `read`, skipping those `read` does not take.
fn read_fields<'de, A: MapAccess<'de>>(
    mut map: A,
    mut read: impl FnMut(Field, &mut A) -> Result<bool, A::Error>,
) -> Result<(), A::Error> {
    while let Some(field) = map.next_key_seed(Field::Other)? {
        if !read(field, &mut map)? {
            map.next_value::<IgnoredAny>()?;
        }
    }
    Ok(())
}

/// The value of the current field read as `shape`.
fn value<'de, A: MapAccess<'de>, S: Shape<'de>>(map: &mut A, shape: S) -> Result<S::Out, A::Error> {
    map.next_value_seed(Lenient(shape))
}

/// One expected shape of a JSON value. A value of any other shape is `Out::default()`,
/// skipped without being built; only malformed JSON is an error.
trait Shape<'de>: Sized {
    type Out: Default;

    fn string(self, _text: &str) -> Self::Out {
        Self::Out::default()
    }

    /// A number: `Some` when it is a count (see [`count`]).
    fn number(self, _count: Option<u64>) -> Self::Out {
        Self::Out::default()
    }

    fn array<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Out, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Self::Out::default())
    }

    fn object<A: MapAccess<'de>>(self, map: A) -> Result<Self::Out, A::Error> {
        read_fields(map, |_, _| Ok(false))?;
        Ok(Self::Out::default())
    }
}

/// Drives a [`Shape`] from any JSON value.
struct Lenient<S>(S);

impl<'de, S: Shape<'de>> DeserializeSeed<'de> for Lenient<S> {
    type Value = S::Out;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<S::Out, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de, S: Shape<'de>> Visitor<'de> for Lenient<S> {
    type Value = S::Out;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<S::Out, E> {
        Ok(S::Out::default())
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<S::Out, E> {
        Ok(S::Out::default())
    }

    fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<S::Out, E> {
        Ok(self.0.number(Some(n)))
    }

    fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<S::Out, E> {
        Ok(self.0.number(u64::try_from(n).ok()))
    }

    fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<S::Out, E> {
        Ok(self.0.number(count(n)))
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<S::Out, E> {
        Ok(self.0.string(text))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<S::Out, A::Error> {
        self.0.array(seq)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<S::Out, A::Error> {
        self.0.object(map)
    }
}

/// A whole number written as a float (`12.0`) counts; a fraction, a negative number or
/// one past `u64` does not.
fn count(n: f64) -> Option<u64> {
    let is_count = n.is_finite() && n >= 0.0 && n.fract() == 0.0 && n < 1.8e19;
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a finite whole number in 0..1.8e19 fits u64"
    )]
    is_count.then_some(n as u64)
}

/// The payload itself: an object, or nothing the tap reads.
struct TopShape;

impl<'de> Shape<'de> for TopShape {
    type Out = Option<Top>;

    fn object<A: MapAccess<'de>>(self, map: A) -> Result<Self::Out, A::Error> {
        let mut top = Top::default();
        read_fields(map, |field, map| {
            match field {
                Field::Error => top.has_error = value(map, ErrorShape)?,
                Field::Object => top.is_error_object = value(map, ErrorTag)?,
                Field::Choices => top.choices = Some(value(map, ChoicesShape)?),
                Field::Usage => top.usage = value(map, UsageShape)?,
                Field::Detail => {
                    top.has_detail = true;
                    return Ok(false);
                }
                Field::Data => {
                    top.has_data = true;
                    return Ok(false);
                }
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        Ok(Some(top))
    }
}

/// `error`: an object or a string.
struct ErrorShape;

impl<'de> Shape<'de> for ErrorShape {
    type Out = bool;

    fn string(self, _text: &str) -> bool {
        true
    }

    fn object<A: MapAccess<'de>>(self, map: A) -> Result<bool, A::Error> {
        read_fields(map, |_, _| Ok(false))?;
        Ok(true)
    }
}

/// `object`: the string `"error"`.
struct ErrorTag;

impl Shape<'_> for ErrorTag {
    type Out = bool;

    fn string(self, text: &str) -> bool {
        text == "error"
    }
}

/// A non-empty string.
struct Text;

impl Shape<'_> for Text {
    type Out = bool;

    fn string(self, text: &str) -> bool {
        !text.is_empty()
    }
}

/// A non-empty array (`tool_calls`).
struct NonEmptyArray;

impl<'de> Shape<'de> for NonEmptyArray {
    type Out = bool;

    fn array<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        let mut is_empty = true;
        while seq.next_element::<IgnoredAny>()?.is_some() {
            is_empty = false;
        }
        Ok(!is_empty)
    }
}

/// `choices`: an array of choices.
struct ChoicesShape;

impl<'de> Shape<'de> for ChoicesShape {
    type Out = Option<Choices>;

    fn array<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Out, A::Error> {
        let mut choices = Choices {
            is_empty: true,
            ..Choices::default()
        };
        while let Some(choice) = seq.next_element_seed(Lenient(ChoiceShape))? {
            choices.is_empty = false;
            choices.has_finish |= choice.has_finish;
            if choice.has_text || choice.has_delta_text {
                choices.content_choices += 1;
            }
        }
        Ok(Some(choices))
    }
}

/// One choice: `finish_reason`, completions' `text`, chat's `delta`.
struct ChoiceShape;

impl<'de> Shape<'de> for ChoiceShape {
    type Out = Choice;

    fn object<A: MapAccess<'de>>(self, map: A) -> Result<Choice, A::Error> {
        let mut choice = Choice::default();
        read_fields(map, |field, map| {
            match field {
                Field::FinishReason => choice.has_finish = value(map, Text)?,
                Field::Text => choice.has_text = value(map, Text)?,
                Field::Delta => choice.has_delta_text = value(map, DeltaShape)?,
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        Ok(choice)
    }
}

/// A `delta` carrying generated text: content, reasoning or tool-call arguments.
struct DeltaShape;

impl<'de> Shape<'de> for DeltaShape {
    type Out = bool;

    fn object<A: MapAccess<'de>>(self, map: A) -> Result<bool, A::Error> {
        let (mut content, mut reasoning_content, mut reasoning, mut tool_calls) =
            (false, false, false, false);
        read_fields(map, |field, map| {
            match field {
                Field::Content => content = value(map, Text)?,
                Field::ReasoningContent => reasoning_content = value(map, Text)?,
                Field::Reasoning => reasoning = value(map, Text)?,
                Field::ToolCalls => tool_calls = value(map, NonEmptyArray)?,
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        Ok(content || reasoning_content || reasoning || tool_calls)
    }
}

/// `usage`: an object of token counts.
struct UsageShape;

impl<'de> Shape<'de> for UsageShape {
    type Out = Option<UsageObject>;

    fn object<A: MapAccess<'de>>(self, map: A) -> Result<Self::Out, A::Error> {
        let mut usage = ReportedUsage::default();
        read_fields(map, |field, map| {
            match field {
                Field::PromptTokens => usage.prompt = value(map, Count)?,
                Field::CompletionTokens => usage.completion = value(map, Count)?,
                Field::TotalTokens => usage.total = value(map, Count)?,
                Field::PromptTokensDetails => usage.cached = value(map, DetailsShape)?,
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        let has_counts =
            usage.prompt.is_some() || usage.completion.is_some() || usage.total.is_some();
        Ok(Some(UsageObject(has_counts.then_some(usage))))
    }
}

/// `prompt_tokens_details`: its `cached_tokens`.
struct DetailsShape;

impl<'de> Shape<'de> for DetailsShape {
    type Out = Option<u64>;

    fn object<A: MapAccess<'de>>(self, map: A) -> Result<Self::Out, A::Error> {
        let mut cached = None;
        read_fields(map, |field, map| {
            if field != Field::CachedTokens {
                return Ok(false);
            }
            cached = value(map, Count)?;
            Ok(true)
        })?;
        Ok(cached)
    }
}

/// A token count: a non-negative whole number, including one written as `12.0`.
struct Count;

impl Shape<'_> for Count {
    type Out = Option<u64>;

    fn number(self, count: Option<u64>) -> Option<u64> {
        count
    }
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

#[cfg(test)]
mod tests;
