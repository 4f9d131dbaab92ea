//! What the mock says: echoed text cut into tokens, usage objects, chunks and bodies in
//! the shapes of chat completions and completions, and the order of a stream's events.

use serde_json::{json, Map, Value};

use crate::script::{
    AfterError, Ending, ErrorEventAt, ErrorShape, IdStyle, IncludeUsage, Script, UsageOn,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Api {
    Chat,
    Completions,
}

/// One event of a stream, before framing.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Payload {
    Json(Value),
    /// Non-JSON data (an error in `text` shape).
    Text(String),
    Done,
}

/// A stream's events and how it ends.
#[derive(Debug)]
pub(crate) struct StreamPlan {
    /// Each event, flagged when it carries generated text.
    pub(crate) events: Vec<(Payload, bool)>,
    /// The last event is `[DONE]` without its blank line.
    pub(crate) is_done_unterminated: bool,
    pub(crate) tail: Tail,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tail {
    /// A clean end of body.
    End,
    /// Half of the last event, then a clean end of body.
    HalfLastThenEnd,
    /// Close without ending the body (no terminating chunk).
    Abort,
    /// TCP reset.
    Reset,
    /// Silence, connection open.
    Stall,
}

/// Everything needed to answer one chat or completions request.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) api: Api,
    pub(crate) script: Script,
    pub(crate) seq: u64,
    pub(crate) created: u64,
    /// Choices per prompt (`n`).
    pub(crate) choices: u64,
    /// Content chunks of each choice.
    pub(crate) tokens: Vec<String>,
    pub(crate) prompt_tokens: u64,
    /// Completion tokens reported per choice.
    pub(crate) completion_tokens: u64,
    /// The request asked for `stream_options.include_usage: true`.
    pub(crate) is_usage_asked: bool,
}

impl Reply {
    /// `text`: what to echo; `prompt_bytes`: the prompt's size, for the default count.
    pub(crate) fn new(
        api: Api,
        script: Script,
        request: &Value,
        text: &str,
        prompt_bytes: usize,
        seq: u64,
    ) -> Self {
        let words: Vec<&str> = text.split_whitespace().collect();
        let chunks = script
            .chunks
            .or(script.completion_tokens)
            .unwrap_or(words.len() as u64);
        let tokens = (0..chunks)
            .map(|i| {
                let word = words
                    .get(usize::try_from(i).unwrap_or(0) % words.len().max(1))
                    .copied()
                    .unwrap_or("echo");
                if i == 0 {
                    word.to_owned()
                } else {
                    format!(" {word}")
                }
            })
            .collect();
        let prompt_tokens = script
            .prompt_tokens
            .unwrap_or((prompt_bytes as u64).div_ceil(4));
        let completion_tokens = script.completion_tokens.unwrap_or(chunks);
        Self {
            api,
            seq,
            created: unix_now(),
            choices: request
                .get("n")
                .and_then(Value::as_u64)
                .unwrap_or(1)
                .clamp(1, 8),
            tokens,
            prompt_tokens,
            completion_tokens,
            is_usage_asked: request
                .pointer("/stream_options/include_usage")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            script,
        }
    }

    /// The complete (non-streamed) answer.
    pub(crate) fn body(&self) -> Value {
        if self.script.error_event.is_some() {
            return self.error_payload_json();
        }
        let text: String = self.tokens.concat();
        let choices: Vec<Value> = (0..self.choices)
            .map(|index| match self.api {
                Api::Chat => json!({
                    "index": index,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": null,
                    "finish_reason": "stop",
                }),
                Api::Completions => json!({
                    "index": index,
                    "text": text,
                    "logprobs": null,
                    "finish_reason": "stop",
                }),
            })
            .collect();
        let mut body = json!({
            "id": self.id(0),
            "object": match self.api {
                Api::Chat => "chat.completion",
                Api::Completions => "text_completion",
            },
            "created": self.created,
            "model": self.script.name,
            "choices": choices,
        });
        if self.script.usage_on != UsageOn::None {
            insert(&mut body, "usage", self.total_usage());
        }
        body
    }

    /// The events of a streamed answer, in order, and how it ends.
    pub(crate) fn stream(&self) -> StreamPlan {
        let mut plan = StreamPlan {
            events: Vec::new(),
            is_done_unterminated: false,
            tail: Tail::End,
        };
        let error_after = match self.script.error_event {
            Some(ErrorEventAt::First) => Some(0),
            Some(ErrorEventAt::After(n)) => Some(n),
            None => None,
        };
        let mut sent = 0;
        if error_after != Some(0) {
            self.push_opening(&mut plan);
        }
        for (position, token) in self.tokens.iter().enumerate() {
            if error_after.is_some_and(|n| sent >= n) {
                break;
            }
            for choice in 0..self.choices {
                let usage = self.usage_field(position as u64 + 1);
                let chunk =
                    self.chunk(plan.events.len(), self.content_choice(choice, token), usage);
                plan.events.push((Payload::Json(chunk), true));
            }
            sent += 1;
            if self.script.drop_after == Some(sent) {
                plan.tail = Tail::Abort;
                return plan;
            }
        }
        if error_after.is_some() {
            plan.events.push((self.error_payload(), false));
            match self.script.then {
                AfterError::Done => plan.events.push((Payload::Done, false)),
                AfterError::Eof => {}
                AfterError::Nothing => plan.tail = Tail::Stall,
            }
            return plan;
        }
        match self.script.ending {
            Ending::Reset => plan.tail = Tail::Reset,
            Ending::Stall => plan.tail = Tail::Stall,
            Ending::EofMidEvent => {
                self.push_finish(&mut plan);
                plan.tail = Tail::HalfLastThenEnd;
            }
            Ending::NoDone => self.push_finish(&mut plan),
            Ending::Done | Ending::DoneNoBlank | Ending::DoneStall => {
                self.push_finish(&mut plan);
                plan.events.push((Payload::Done, false));
                plan.is_done_unterminated = self.script.ending == Ending::DoneNoBlank;
                if self.script.ending == Ending::DoneStall {
                    plan.tail = Tail::Stall;
                }
            }
        }
        plan
    }

    fn push_opening(&self, plan: &mut StreamPlan) {
        if self.api != Api::Chat {
            return;
        }
        for choice in 0..self.choices {
            let delta = json!({
                "index": choice,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": null,
                "finish_reason": null,
            });
            let chunk = self.chunk(plan.events.len(), delta, self.usage_field(0));
            plan.events.push((Payload::Json(chunk), false));
        }
    }

    /// Finish chunks, then the usage chunk when this script sends one.
    fn push_finish(&self, plan: &mut StreamPlan) {
        let chunks = self.tokens.len() as u64;
        for choice in 0..self.choices {
            let is_last = choice + 1 == self.choices;
            let usage = if self.script.usage_on == UsageOn::FinishChunk && is_last {
                self.is_usage_included().then(|| self.total_usage())
            } else {
                self.usage_field(chunks)
            };
            let finish = match self.api {
                Api::Chat => json!({
                    "index": choice, "delta": {}, "logprobs": null, "finish_reason": "stop",
                }),
                Api::Completions => json!({
                    "index": choice, "text": "", "logprobs": null, "finish_reason": "stop",
                }),
            };
            let chunk = self.chunk(plan.events.len(), finish, usage);
            plan.events.push((Payload::Json(chunk), false));
        }
        let has_usage_chunk = matches!(
            self.script.usage_on,
            UsageOn::Final | UsageOn::NullThenFinal | UsageOn::Every | UsageOn::ZerosThenFinal
        );
        if self.is_usage_included() && has_usage_chunk {
            let mut chunk = self.chunk_shell(plan.events.len(), Value::Array(Vec::new()));
            insert(&mut chunk, "usage", self.total_usage());
            if self.script.extras {
                insert(
                    &mut chunk,
                    "timings",
                    json!({"prompt_n": self.prompt_tokens, "predicted_n": self.completion_tokens,
                           "predicted_ms": 12.5}),
                );
            }
            plan.events.push((Payload::Json(chunk), false));
        }
    }

    fn is_usage_included(&self) -> bool {
        match self.script.include_usage {
            IncludeUsage::Always => true,
            IncludeUsage::Never => false,
            IncludeUsage::Asked => self.is_usage_asked,
        }
    }

    /// `usage` of an ordinary chunk after `done` content chunks per choice: `None` leaves
    /// the key out.
    fn usage_field(&self, done: u64) -> Option<Value> {
        if !self.is_usage_included() {
            return None;
        }
        match self.script.usage_on {
            UsageOn::NullThenFinal => Some(Value::Null),
            UsageOn::ZerosThenFinal => Some(self.usage_object(0, 0)),
            UsageOn::Every => {
                let chunks = (self.tokens.len() as u64).max(1);
                let running = self.completion_tokens.saturating_mul(done) / chunks;
                Some(self.usage_object(self.prompt_tokens, running))
            }
            UsageOn::Final | UsageOn::FinishChunk | UsageOn::None => None,
        }
    }

    fn total_usage(&self) -> Value {
        self.usage_object(
            self.prompt_tokens,
            self.completion_tokens.saturating_mul(self.choices),
        )
    }

    fn usage_object(&self, prompt: u64, completion: u64) -> Value {
        let mut usage = Map::new();
        usage.insert("prompt_tokens".into(), prompt.into());
        usage.insert("completion_tokens".into(), completion.into());
        if !self.script.omit_total {
            usage.insert(
                "total_tokens".into(),
                prompt.saturating_add(completion).into(),
            );
        }
        if let Some(cached) = self.script.cached_tokens {
            let cached = if prompt == 0 { 0 } else { cached };
            usage.insert(
                "prompt_tokens_details".into(),
                json!({"cached_tokens": cached}),
            );
        }
        if let Some(reasoning) = self.script.reasoning_tokens {
            let reasoning = if completion == 0 { 0 } else { reasoning };
            usage.insert(
                "completion_tokens_details".into(),
                json!({"reasoning_tokens": reasoning}),
            );
        }
        if self.script.extras {
            usage.insert("queue_time".into(), json!(0.013));
        }
        Value::Object(usage)
    }

    fn content_choice(&self, choice: u64, token: &str) -> Value {
        match self.api {
            Api::Chat => json!({
                "index": choice,
                "delta": {"content": token},
                "logprobs": null,
                "finish_reason": null,
            }),
            Api::Completions => json!({
                "index": choice,
                "text": token,
                "logprobs": null,
                "finish_reason": null,
            }),
        }
    }

    fn chunk(&self, index: usize, choice: Value, usage: Option<Value>) -> Value {
        let mut chunk = self.chunk_shell(index, Value::Array(vec![choice]));
        if let Some(usage) = usage {
            insert(&mut chunk, "usage", usage);
        }
        chunk
    }

    fn chunk_shell(&self, index: usize, choices: Value) -> Value {
        let mut chunk = json!({
            "id": self.id(index),
            "object": match self.api {
                Api::Chat => "chat.completion.chunk",
                Api::Completions => "text_completion",
            },
            "created": self.created,
            "model": self.script.name,
            "choices": choices,
        });
        if self.script.extras {
            insert(&mut chunk, "system_fingerprint", json!("fp_mock"));
            insert(&mut chunk, "x_mock", json!({"vendor": true}));
        }
        chunk
    }

    fn id(&self, index: usize) -> String {
        let prefix = match self.api {
            Api::Chat => "chatcmpl-",
            Api::Completions => "cmpl-",
        };
        match self.script.id {
            IdStyle::Unique => format!("{prefix}mock{}", self.seq),
            IdStyle::Empty => String::new(),
            IdStyle::PerChunk => format!("{prefix}mock{}-{index}", self.seq),
            IdStyle::Fixed => format!("{prefix}fixed"),
        }
    }

    fn error_payload(&self) -> Payload {
        match self.script.error_shape {
            ErrorShape::Text => Payload::Text(MID_STREAM_ERROR.to_owned()),
            _ => Payload::Json(self.error_payload_json()),
        }
    }

    fn error_payload_json(&self) -> Value {
        error_body(self.script.error_shape, 500, MID_STREAM_ERROR)
    }
}

const MID_STREAM_ERROR: &str = "mock upstream: failure while generating";

/// An error body in `shape` (`Text` gives a JSON string; callers send text themselves).
pub(crate) fn error_body(shape: ErrorShape, status: u16, message: &str) -> Value {
    let (kind, code) = match status {
        400 | 413 | 422 => ("invalid_request_error", "invalid_request"),
        401 => ("authentication_error", "invalid_api_key"),
        403 => ("permission_error", "permission_denied"),
        404 => ("not_found_error", "model_not_found"),
        429 => ("rate_limit_error", "rate_limit_exceeded"),
        _ => ("server_error", "internal_error"),
    };
    match shape {
        ErrorShape::Nested => json!({
            "error": {"message": message, "type": kind, "param": null, "code": code},
        }),
        ErrorShape::NestedIntCode => json!({
            "error": {"message": message, "type": kind, "param": null, "code": status},
        }),
        ErrorShape::Flat => json!({
            "object": "error", "message": message, "type": kind, "param": null, "code": status,
        }),
        ErrorShape::String => json!({"error": message, "error_type": kind}),
        ErrorShape::Detail => json!({"detail": message}),
        ErrorShape::Text => Value::String(message.to_owned()),
    }
}

fn insert(object: &mut Value, key: &str, value: Value) {
    if let Value::Object(map) = object {
        map.insert(key.to_owned(), value);
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
