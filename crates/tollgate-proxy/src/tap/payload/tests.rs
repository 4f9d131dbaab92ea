//! The one-pass reader against a reference model that builds the whole JSON value and
//! reads it with `serde_json::Value` accessors (what the tap did before), over payloads
//! generated from the keys and shapes upstreams send, odd ones included.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value};

use super::{read_object, read_payload, ChunkFacts, Payload, ReportedUsage};

/// The reference: the rules of UPSTREAMS.md read off a built `Value`.
fn reference(data: &[u8]) -> Option<ChunkFacts> {
    let Ok(Value::Object(chunk)) = serde_json::from_slice::<Value>(data) else {
        return None;
    };
    let is_error = matches!(
        chunk.get("error"),
        Some(Value::Object(_) | Value::String(_))
    ) || chunk.get("object").and_then(Value::as_str) == Some("error")
        || (chunk.contains_key("detail")
            && !chunk.contains_key("choices")
            && !chunk.contains_key("data"));
    let choices = chunk.get("choices").and_then(Value::as_array);
    let mut facts = ChunkFacts {
        is_error,
        is_usage_only: !is_error
            && choices.is_some_and(|c| c.is_empty())
            && chunk.get("usage").is_some_and(Value::is_object),
        usage: chunk.get("usage").and_then(reference_usage),
        ..ChunkFacts::default()
    };
    for choice in choices.into_iter().flatten().filter_map(Value::as_object) {
        let is_text = |v: Option<&Value>| v.and_then(Value::as_str).is_some_and(|s| !s.is_empty());
        facts.has_finish |= is_text(choice.get("finish_reason"));
        let delta = choice.get("delta").and_then(Value::as_object);
        let carries_text = is_text(choice.get("text"))
            || delta.is_some_and(|d| {
                is_text(d.get("content"))
                    || is_text(d.get("reasoning_content"))
                    || is_text(d.get("reasoning"))
                    || d.get("tool_calls")
                        .and_then(Value::as_array)
                        .is_some_and(|calls| !calls.is_empty())
            });
        facts.content_choices += u64::from(carries_text);
    }
    Some(facts)
}

fn reference_usage(usage: &Value) -> Option<ReportedUsage> {
    let usage: &Map<String, Value> = usage.as_object()?;
    let count = |value: Option<&Value>| {
        let value = value?;
        value.as_u64().or_else(|| {
            value
                .as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0 && f.fract() == 0.0 && *f < 1.8e19)
                .map(|f| f as u64)
        })
    };
    let reported = ReportedUsage {
        prompt: count(usage.get("prompt_tokens")),
        completion: count(usage.get("completion_tokens")),
        total: count(usage.get("total_tokens")),
        cached: usage
            .get("prompt_tokens_details")
            .and_then(Value::as_object)
            .and_then(|details| count(details.get("cached_tokens"))),
    };
    (reported.prompt.is_some() || reported.completion.is_some() || reported.total.is_some())
        .then_some(reported)
}

/// Writes a random JSON value for a field, biased towards the shapes that matter there.
struct Generator {
    rng: StdRng,
}

const TOP_KEYS: &[&str] = &[
    "choices",
    "choices",
    "choices",
    "usage",
    "usage",
    "error",
    "object",
    "detail",
    "data",
    "id",
    "model",
    "timings",
    "\\u0075sage",
];
const CHOICE_KEYS: &[&str] = &[
    "finish_reason",
    "text",
    "delta",
    "delta",
    "index",
    "logprobs",
];
const DELTA_KEYS: &[&str] = &[
    "content",
    "reasoning_content",
    "reasoning",
    "tool_calls",
    "role",
    "refusal",
];
const USAGE_KEYS: &[&str] = &[
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "prompt_tokens_details",
    "completion_tokens_details",
    "x_vendor",
];

impl Generator {
    fn scalar(&mut self) -> String {
        let scalars = [
            "null",
            "true",
            "false",
            "0",
            "7",
            "-3",
            "12.0",
            "1.5",
            "1e20",
            "-0.0",
            "\"\"",
            "\"error\"",
            "\"stop\"",
            "\"a\\nb\"",
            "\"\\u00e9\"",
            "18446744073709551615",
            "18446744073709551616",
        ];
        scalars[self.rng.gen_range(0..scalars.len())].to_owned()
    }

    fn object(&mut self, keys: &[&str], depth: u32) -> String {
        let fields = self.rng.gen_range(0..5);
        let body: Vec<String> = (0..fields)
            .map(|_| {
                let key = keys[self.rng.gen_range(0..keys.len())];
                format!("\"{key}\":{}", self.value_for(key, depth + 1))
            })
            .collect();
        format!("{{{}}}", body.join(","))
    }

    fn array(&mut self, element: impl Fn(&mut Self) -> String) -> String {
        let len = self.rng.gen_range(0..4);
        let items: Vec<String> = (0..len).map(|_| element(self)).collect();
        format!("[{}]", items.join(","))
    }

    fn value_for(&mut self, key: &str, depth: u32) -> String {
        if depth > 5 || self.rng.gen_range(0..4) == 0 {
            return match self.rng.gen_range(0..3) {
                0 => self.array(|g| g.scalar()),
                1 => self.object(&["x", "y"], depth),
                _ => self.scalar(),
            };
        }
        match key {
            "choices" => self.array(|g| {
                if g.rng.gen_range(0..5) == 0 {
                    g.scalar()
                } else {
                    g.object(CHOICE_KEYS, depth)
                }
            }),
            "delta" => self.object(DELTA_KEYS, depth),
            "usage" | "\\u0075sage" => self.object(USAGE_KEYS, depth),
            "prompt_tokens_details" => self.object(&["cached_tokens", "audio_tokens"], depth),
            "tool_calls" => self.array(|g| g.object(&["index", "function"], depth + 1)),
            "error" => self.object(&["message", "code"], depth),
            _ => self.scalar(),
        }
    }
}

#[test]
fn the_one_pass_reader_agrees_with_the_reference_on_generated_payloads() {
    let mut generator = Generator {
        rng: StdRng::seed_from_u64(6),
    };
    let mut objects = 0;
    for _ in 0..20_000 {
        let payload = generator.object(TOP_KEYS, 0);
        let expected = reference(payload.as_bytes());
        objects += usize::from(expected.is_some());
        assert_eq!(
            read_object(payload.as_bytes()),
            expected,
            "payload {payload}"
        );
    }
    // Every generated payload is an object, so every one was compared field by field.
    assert_eq!(objects, 20_000);
}

#[test]
fn a_key_given_twice_counts_as_its_last_occurrence() {
    let usage = |p: u64, c: u64| ReportedUsage {
        prompt: Some(p),
        completion: Some(c),
        total: None,
        cached: None,
    };
    for (payload, expected) in [
        (
            r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1},"usage":{"prompt_tokens":5,"completion_tokens":2}}"#,
            ChunkFacts {
                is_usage_only: true,
                usage: Some(usage(5, 2)),
                ..ChunkFacts::default()
            },
        ),
        (
            r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2},"usage":null}"#,
            ChunkFacts::default(),
        ),
        (
            r#"{"choices":[{"delta":{"content":"a"}}],"choices":[]}"#,
            ChunkFacts::default(),
        ),
        (
            r#"{"choices":[{"finish_reason":"stop","finish_reason":null,"delta":{"content":"","content":"a"}}]}"#,
            ChunkFacts {
                content_choices: 1,
                ..ChunkFacts::default()
            },
        ),
    ] {
        assert_eq!(read_object(payload.as_bytes()), Some(expected), "{payload}");
        assert_eq!(
            reference(payload.as_bytes()),
            read_object(payload.as_bytes())
        );
    }
}

#[test]
fn escaped_keys_and_strings_are_read_decoded() {
    let payload = r#"{"\u0063hoices":[{"delta":{"cont\u0065nt":"\u00e9"}}],"usag\u0065":{"prompt_tokens":3,"total_tokens":4}}"#;
    assert_eq!(
        read_object(payload.as_bytes()),
        Some(ChunkFacts {
            usage: Some(ReportedUsage {
                prompt: Some(3),
                completion: None,
                total: Some(4),
                cached: None,
            }),
            content_choices: 1,
            ..ChunkFacts::default()
        })
    );
}

#[test]
fn what_is_not_one_json_object_in_utf8_is_other() {
    for payload in [
        &b""[..],
        b"   ",
        b"[1,2]",
        b"\"s\"",
        b"12",
        b"null",
        b"{\"choices\":[]",
        b"{\"choices\":[]} {}",
        b"{\"choices\":[]},",
        b"{'choices':[]}",
        b"{\"choices\":[],}",
        // Bad UTF-8 in a field the tap skips still refuses the whole payload.
        b"{\"id\":\"\xff\",\"choices\":[],\"usage\":{\"prompt_tokens\":1}}",
        // So does a malformed value it skips.
        b"{\"id\":[1,,2],\"choices\":[],\"usage\":{\"prompt_tokens\":1}}",
    ] {
        assert_eq!(read_payload(payload), Payload::Other, "{payload:?}");
    }
    assert_eq!(read_payload(b" [DONE] "), Payload::Done);
    assert_eq!(
        read_payload(b"\n {\"choices\":[]} \n"),
        Payload::Chunk(ChunkFacts::default())
    );
}

/// What the tap reads from `{"choices":[],"usage":{"prompt_tokens":P,"completion_tokens":C}}`.
fn usage_only_chunk(prompt: u64, completion: u64) -> Option<ChunkFacts> {
    Some(ChunkFacts {
        is_usage_only: true,
        usage: Some(ReportedUsage {
            prompt: Some(prompt),
            completion: Some(completion),
            total: None,
            cached: None,
        }),
        ..ChunkFacts::default()
    })
}

#[test]
fn a_deeply_nested_vendor_field_does_not_hide_the_usage() {
    // Skipped values are not built, so their depth costs no stack; the fields read are a
    // few levels deep at most.
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let payload = format!(
        r#"{{"x_vendor":{deep},"choices":[],"usage":{{"prompt_tokens":2,"completion_tokens":1}}}}"#
    );
    assert_eq!(read_object(payload.as_bytes()), usage_only_chunk(2, 1));
}

#[test]
fn a_skipped_field_serde_json_would_refuse_does_not_hide_the_usage() {
    // A lone surrogate escape and a number beyond f64 are refused when a `Value` is
    // built (the reference reads nothing); skipped unbuilt, they are only checked for
    // their JSON grammar, and the usage beside them is read.
    for odd in [r#""\ud800""#, "1e400"] {
        let payload = format!(
            r#"{{"x_vendor":{odd},"choices":[],"usage":{{"prompt_tokens":2,"completion_tokens":1}}}}"#
        );
        assert_eq!(reference(payload.as_bytes()), None, "{payload}");
        assert_eq!(
            read_object(payload.as_bytes()),
            usage_only_chunk(2, 1),
            "{payload}"
        );
    }
}
