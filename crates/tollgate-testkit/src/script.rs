//! The mock's script, read from the request's `model`: `name?key=value&key=value`.
//!
//! Tests put the script in an endpoint's `target_model`, so the gateway carries it to the
//! mock with no side channel. Parsing is strict: an unknown key, a repeated key or a bad
//! value is an HTTP 400 from the mock, so a typo in a test fails loudly.

use std::time::Duration;

/// How the mock answers one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    /// The model name before `?`, echoed in responses.
    pub name: String,
    /// Reported prompt tokens (default: ceil(prompt bytes / 4)).
    pub prompt_tokens: Option<u64>,
    /// Reported completion tokens per choice (default: the number of content chunks).
    pub completion_tokens: Option<u64>,
    /// Content chunks per choice (default: `completion_tokens`, else one per word).
    pub chunks: Option<u64>,
    /// Delay between stream events.
    pub interval: Duration,
    /// Delay before the response headers.
    pub latency: Duration,
    /// Answer with this HTTP error status (400..=599).
    pub status: Option<u16>,
    pub error_shape: ErrorShape,
    /// `Retry-After` header value (seconds) on an error status.
    pub retry_after: Option<u64>,
    pub include_usage: IncludeUsage,
    pub usage_on: UsageOn,
    pub framing: Framing,
    pub delivery: Delivery,
    pub ending: Ending,
    pub error_event: Option<ErrorEventAt>,
    /// What follows an error event.
    pub then: AfterError,
    /// Close the connection (no terminating chunk) after this many content chunks.
    pub drop_after: Option<u64>,
    pub id: IdStyle,
    /// `prompt_tokens_details.cached_tokens` (absent unless given; `0` is sent as 0).
    pub cached_tokens: Option<u64>,
    /// `completion_tokens_details.reasoning_tokens` (absent unless given).
    pub reasoning_tokens: Option<u64>,
    /// Leave `total_tokens` out of usage objects.
    pub omit_total: bool,
    /// Add vendor extras (`timings`, unknown keys) to chunks and usage.
    pub extras: bool,
}

/// Error body shapes of real servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorShape {
    /// OpenAI: `{"error": {"message", "type", "param", "code": "<string>"}}`.
    Nested,
    /// `{"error": {..., "code": <status as integer>}}`.
    NestedIntCode,
    /// vLLM: `{"object": "error", "message", "type", "param", "code": <int>}`.
    Flat,
    /// TGI: `{"error": "<text>", "error_type": "..."}`.
    String,
    /// FastAPI: `{"detail": "<text>"}`.
    Detail,
    /// Plain text, `text/plain`.
    Text,
}

/// When the stream carries usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncludeUsage {
    /// Only when the request has `stream_options.include_usage: true` (real servers).
    Asked,
    Always,
    Never,
}

/// Where usage appears in a stream (when it is included at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageOn {
    /// Key absent from ordinary chunks, then a `choices: []` usage chunk (vLLM).
    Final,
    /// `"usage": null` on ordinary chunks, then the usage chunk (OpenAI).
    NullThenFinal,
    /// Cumulative usage on every chunk (`continuous_usage_stats`), then the usage chunk.
    Every,
    /// Inside the finish chunk, whose `choices` is not empty; no usage chunk.
    FinishChunk,
    /// Never, even when asked.
    None,
    /// All-zero usage on every chunk, then the real usage chunk (Ollama completions).
    ZerosThenFinal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `data: <json>\n\n`.
    Lf,
    Crlf,
    Cr,
    /// `data:<json>`.
    NoSpace,
    /// `data:  <json>`.
    TwoSpace,
    /// A UTF-8 BOM before the first event.
    Bom,
    /// Each JSON pretty-printed over several `data:` lines.
    Multiline,
    /// Comment lines (`:`, `: keep-alive`, `: ping - <ts>`), some without a blank line.
    Comments,
    /// Keep-alives disguised as data (`data: : keepalive`, empty `data:`).
    KeepaliveData,
    /// `event:` and `id:` lines on every event.
    EventId,
    /// Spaces after the JSON.
    TrailingSpaces,
}

/// How framed bytes are cut into writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// One write per event.
    Normal,
    /// One write per byte.
    Bytewise,
    /// Each event in two writes, cut inside a multi-byte UTF-8 character when it has one.
    SplitUtf8,
    /// The whole body in one write (no intervals).
    OneRead,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Finish chunk, usage chunk (if any), `data: [DONE]` and its blank line.
    Done,
    /// As `Done`, without the blank line after `[DONE]`.
    DoneNoBlank,
    /// Finish chunk and usage chunk, no `[DONE]`.
    NoDone,
    /// As `NoDone`, but the last event (the usage chunk when usage is included, else the
    /// finish chunk) is cut in half, then a clean end of body.
    EofMidEvent,
    /// Content, then a TCP reset.
    Reset,
    /// Content, then silence with the connection open.
    Stall,
    /// As `Done`, then silence with the connection open (a server that does not close
    /// after `[DONE]`).
    DoneStall,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorEventAt {
    /// The first event of a 200 is an error.
    First,
    /// An error event after this many content chunks.
    After(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterError {
    /// `data: [DONE]`, then a clean end.
    Done,
    /// A clean end of body right after the error event.
    Eof,
    /// Silence with the connection open.
    Nothing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdStyle {
    /// One id per request, unique across requests.
    Unique,
    /// `""` everywhere (TGI).
    Empty,
    /// A new id on every chunk (TensorRT-LLM).
    PerChunk,
    /// The same id on every request (Ollama).
    Fixed,
}

/// Why a script was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptError(pub String);

impl std::fmt::Display for ScriptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ScriptError {}

const KEYS: &[&str] = &[
    "prompt_tokens",
    "completion_tokens",
    "chunks",
    "interval_ms",
    "latency_ms",
    "status",
    "error_shape",
    "retry_after",
    "include_usage",
    "usage_on",
    "framing",
    "delivery",
    "ending",
    "error_event",
    "then",
    "drop_after",
    "id",
    "cached_tokens",
    "reasoning_tokens",
    "omit_total",
    "extras",
];

impl Script {
    /// The defaults: echo, usage only when asked, LF framing, `[DONE]`.
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            prompt_tokens: None,
            completion_tokens: None,
            chunks: None,
            interval: Duration::ZERO,
            latency: Duration::ZERO,
            status: None,
            error_shape: ErrorShape::Nested,
            retry_after: None,
            include_usage: IncludeUsage::Asked,
            usage_on: UsageOn::Final,
            framing: Framing::Lf,
            delivery: Delivery::Normal,
            ending: Ending::Done,
            error_event: None,
            then: AfterError::Done,
            drop_after: None,
            id: IdStyle::Unique,
            cached_tokens: None,
            reasoning_tokens: None,
            omit_total: false,
            extras: false,
        }
    }

    /// Parses `name?key=value&...` (URL-query syntax, percent-decoding applies).
    pub fn parse(model: &str) -> Result<Self, ScriptError> {
        let (name, query) = model.split_once('?').unwrap_or((model, ""));
        let mut script = Self::named(name);
        let mut seen: Vec<String> = Vec::new();
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            if seen.iter().any(|k| *k == key) {
                return Err(ScriptError(format!("mock script: key `{key}` given twice")));
            }
            seen.push(key.to_string());
            script.set(&key, &value)?;
        }
        if script.then != AfterError::Done && script.error_event.is_none() {
            return Err(ScriptError(
                "mock script: `then` needs `error_event`".to_owned(),
            ));
        }
        Ok(script)
    }

    fn set(&mut self, key: &str, value: &str) -> Result<(), ScriptError> {
        match key {
            "prompt_tokens" => self.prompt_tokens = Some(number(key, value)?),
            "completion_tokens" => self.completion_tokens = Some(number(key, value)?),
            "chunks" => self.chunks = Some(number(key, value)?),
            "interval_ms" => self.interval = Duration::from_millis(number(key, value)?),
            "latency_ms" => self.latency = Duration::from_millis(number(key, value)?),
            "status" => {
                let status = number(key, value)?;
                if !(400..=599).contains(&status) {
                    return Err(bad(key, value, "400..=599"));
                }
                self.status = u16::try_from(status).ok();
            }
            "error_shape" => {
                self.error_shape = choose(
                    key,
                    value,
                    &[
                        ("nested", ErrorShape::Nested),
                        ("nested_int_code", ErrorShape::NestedIntCode),
                        ("flat", ErrorShape::Flat),
                        ("string", ErrorShape::String),
                        ("detail", ErrorShape::Detail),
                        ("text", ErrorShape::Text),
                    ],
                )?
            }
            "retry_after" => self.retry_after = Some(number(key, value)?),
            "include_usage" => {
                self.include_usage = choose(
                    key,
                    value,
                    &[
                        ("asked", IncludeUsage::Asked),
                        ("always", IncludeUsage::Always),
                        ("never", IncludeUsage::Never),
                    ],
                )?
            }
            "usage_on" => {
                self.usage_on = choose(
                    key,
                    value,
                    &[
                        ("final", UsageOn::Final),
                        ("null_then_final", UsageOn::NullThenFinal),
                        ("every", UsageOn::Every),
                        ("finish_chunk", UsageOn::FinishChunk),
                        ("none", UsageOn::None),
                        ("zeros_then_final", UsageOn::ZerosThenFinal),
                    ],
                )?
            }
            "framing" => {
                self.framing = choose(
                    key,
                    value,
                    &[
                        ("lf", Framing::Lf),
                        ("crlf", Framing::Crlf),
                        ("cr", Framing::Cr),
                        ("nospace", Framing::NoSpace),
                        ("twospace", Framing::TwoSpace),
                        ("bom", Framing::Bom),
                        ("multiline", Framing::Multiline),
                        ("comments", Framing::Comments),
                        ("keepalive_data", Framing::KeepaliveData),
                        ("event_id", Framing::EventId),
                        ("trailing_spaces", Framing::TrailingSpaces),
                    ],
                )?
            }
            "delivery" => {
                self.delivery = choose(
                    key,
                    value,
                    &[
                        ("normal", Delivery::Normal),
                        ("bytewise", Delivery::Bytewise),
                        ("split_utf8", Delivery::SplitUtf8),
                        ("one_read", Delivery::OneRead),
                    ],
                )?
            }
            "ending" => {
                self.ending = choose(
                    key,
                    value,
                    &[
                        ("done", Ending::Done),
                        ("done_no_blank", Ending::DoneNoBlank),
                        ("no_done", Ending::NoDone),
                        ("eof_mid_event", Ending::EofMidEvent),
                        ("reset", Ending::Reset),
                        ("stall", Ending::Stall),
                        ("done_stall", Ending::DoneStall),
                    ],
                )?
            }
            "error_event" => {
                self.error_event = Some(match value.strip_prefix("after:") {
                    Some(n) => ErrorEventAt::After(number(key, n)?),
                    None if value == "first" => ErrorEventAt::First,
                    None => return Err(bad(key, value, "first, after:N")),
                })
            }
            "then" => {
                self.then = choose(
                    key,
                    value,
                    &[
                        ("done", AfterError::Done),
                        ("eof", AfterError::Eof),
                        ("nothing", AfterError::Nothing),
                    ],
                )?
            }
            "drop_after" => self.drop_after = Some(number(key, value)?),
            "id" => {
                self.id = choose(
                    key,
                    value,
                    &[
                        ("unique", IdStyle::Unique),
                        ("empty", IdStyle::Empty),
                        ("per_chunk", IdStyle::PerChunk),
                        ("fixed", IdStyle::Fixed),
                    ],
                )?
            }
            "cached_tokens" => self.cached_tokens = Some(number(key, value)?),
            "reasoning_tokens" => self.reasoning_tokens = Some(number(key, value)?),
            "omit_total" => self.omit_total = flag(key, value)?,
            "extras" => self.extras = flag(key, value)?,
            _ => {
                return Err(ScriptError(format!(
                    "mock script: unknown key `{key}` (known: {})",
                    KEYS.join(", ")
                )))
            }
        }
        Ok(())
    }
}

fn bad(key: &str, value: &str, expected: &str) -> ScriptError {
    ScriptError(format!(
        "mock script: `{key}={value}` is not valid (expected {expected})"
    ))
}

fn number(key: &str, value: &str) -> Result<u64, ScriptError> {
    value
        .parse()
        .map_err(|_| bad(key, value, "a non-negative integer"))
}

fn flag(key: &str, value: &str) -> Result<bool, ScriptError> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(bad(key, value, "true, false")),
    }
}

fn choose<T: Copy>(key: &str, value: &str, options: &[(&str, T)]) -> Result<T, ScriptError> {
    options
        .iter()
        .find(|(name, _)| *name == value)
        .map(|(_, option)| *option)
        .ok_or_else(|| {
            let names: Vec<&str> = options.iter().map(|(name, _)| *name).collect();
            bad(key, value, &names.join(", "))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_name_is_the_defaults() {
        assert_eq!(Script::parse("echo").unwrap(), Script::named("echo"));
        assert_eq!(Script::parse("echo?").unwrap(), Script::named("echo"));
    }

    #[test]
    fn every_key_is_read() {
        let script = Script::parse(
            "m?prompt_tokens=10&completion_tokens=50&chunks=5&interval_ms=20&latency_ms=7\
             &status=429&error_shape=nested_int_code&retry_after=7&include_usage=always\
             &usage_on=every&framing=crlf&delivery=bytewise&ending=no_done\
             &error_event=after:3&then=eof&drop_after=4&id=per_chunk&cached_tokens=0\
             &reasoning_tokens=9&omit_total=true&extras=true",
        )
        .unwrap();
        assert_eq!(
            script,
            Script {
                name: "m".to_owned(),
                prompt_tokens: Some(10),
                completion_tokens: Some(50),
                chunks: Some(5),
                interval: Duration::from_millis(20),
                latency: Duration::from_millis(7),
                status: Some(429),
                error_shape: ErrorShape::NestedIntCode,
                retry_after: Some(7),
                include_usage: IncludeUsage::Always,
                usage_on: UsageOn::Every,
                framing: Framing::Crlf,
                delivery: Delivery::Bytewise,
                ending: Ending::NoDone,
                error_event: Some(ErrorEventAt::After(3)),
                then: AfterError::Eof,
                drop_after: Some(4),
                id: IdStyle::PerChunk,
                cached_tokens: Some(0),
                reasoning_tokens: Some(9),
                omit_total: true,
                extras: true,
            }
        );
    }

    #[test]
    fn names_may_hold_slashes_and_percent_escapes_decode() {
        let script = Script::parse("org/model-7b?error_event=after%3A2").unwrap();
        assert_eq!(script.name, "org/model-7b");
        assert_eq!(script.error_event, Some(ErrorEventAt::After(2)));
    }

    #[test]
    fn mistakes_are_refused_with_a_message() {
        let cases = [
            (
                "m?prompt_token=1",
                "mock script: unknown key `prompt_token`",
            ),
            (
                "m?chunks=1&chunks=2",
                "mock script: key `chunks` given twice",
            ),
            (
                "m?chunks=-1",
                "mock script: `chunks=-1` is not valid (expected a non-negative integer)",
            ),
            (
                "m?status=200",
                "mock script: `status=200` is not valid (expected 400..=599)",
            ),
            (
                "m?framing=lff",
                "mock script: `framing=lff` is not valid (expected lf, crlf, cr, nospace, \
                 twospace, bom, multiline, comments, keepalive_data, event_id, trailing_spaces)",
            ),
            (
                "m?ending=done_stal",
                "mock script: `ending=done_stal` is not valid (expected done, done_no_blank, \
                 no_done, eof_mid_event, reset, stall, done_stall)",
            ),
            (
                "m?error_event=second",
                "mock script: `error_event=second` is not valid (expected first, after:N)",
            ),
            ("m?then=eof", "mock script: `then` needs `error_event`"),
            (
                "m?extras=yes",
                "mock script: `extras=yes` is not valid (expected true, false)",
            ),
        ];
        for (model, message) in cases {
            let error = Script::parse(model).unwrap_err();
            assert!(error.0.starts_with(message), "{model}: {}", error.0);
        }
    }
}
