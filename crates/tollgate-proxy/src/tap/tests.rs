//! One test per upstream variant (UPSTREAMS.md): each states the exact bytes forwarded
//! (passing through and stripping) and the exact summary, and `check` replays the input
//! whole, byte by byte and split at every point.

use bytes::Bytes;

use super::{summarize_body, BodySummary, StreamEnd, StreamSummary, StreamTap, Usage};

// ---------- helpers ----------

fn run(parts: &[&[u8]], strip: bool) -> (Vec<u8>, StreamSummary, StreamTap) {
    let mut tap = StreamTap::new(strip);
    let mut out = Vec::new();
    for part in parts {
        out.extend_from_slice(&tap.feed(Bytes::copy_from_slice(part)));
    }
    out.extend_from_slice(&tap.finish());
    let summary = tap.summary();
    (out, summary, tap)
}

fn assert_bytes(actual: &[u8], expected: &[u8], how: &str) {
    assert_eq!(
        String::from_utf8_lossy(actual),
        String::from_utf8_lossy(expected),
        "forwarded bytes ({how})"
    );
    assert_eq!(actual, expected, "forwarded bytes ({how})");
}

/// Feeds `input` whole, one byte per read, and split in two at every point; every way
/// must forward `forwarded` and summarise to `expected`.
fn check(input: &[u8], strip: bool, forwarded: &[u8], expected: &StreamSummary) -> StreamTap {
    let (out, summary, tap) = run(&[input], strip);
    assert_bytes(&out, forwarded, "whole");
    assert_eq!(&summary, expected, "summary (whole)");

    let bytewise: Vec<&[u8]> = input.chunks(1).collect();
    let (out, summary, _) = run(&bytewise, strip);
    assert_bytes(&out, forwarded, "byte at a time");
    assert_eq!(&summary, expected, "summary (byte at a time)");

    for at in 0..=input.len() {
        let (head, tail) = input.split_at(at);
        let (out, summary, _) = run(&[head, tail], strip);
        assert_bytes(&out, forwarded, &format!("split at {at}"));
        assert_eq!(&summary, expected, "summary (split at {at})");
    }
    tap
}

/// Passing through forwards `input` itself; stripping forwards `stripped`.
fn check_both(input: &str, stripped: &str, expected: &StreamSummary) {
    check(input.as_bytes(), false, input.as_bytes(), expected);
    check(input.as_bytes(), true, stripped.as_bytes(), expected);
}

fn summary(usage: Option<Usage>, end: StreamEnd, chunks: u64) -> StreamSummary {
    StreamSummary {
        usage,
        end,
        is_error_first: false,
        content_chunks: chunks,
    }
}

fn usage(prompt: u64, completion: u64, cached: u64) -> Option<Usage> {
    Some(Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        cached_tokens: cached,
    })
}

fn content(text: &str) -> String {
    format!(
        r#"{{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{{"index":0,"delta":{{"content":"{text}"}},"finish_reason":null}}]}}"#
    )
}

fn role() -> String {
    r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#.to_owned()
}

fn finish() -> String {
    r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#.to_owned()
}

fn usage_chunk(prompt: u64, completion: u64) -> String {
    format!(
        r#"{{"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[],"usage":{{"prompt_tokens":{prompt},"completion_tokens":{completion},"total_tokens":{}}}}}"#,
        prompt + completion
    )
}

fn ev(json: &str) -> String {
    format!("data: {json}\n\n")
}

const DONE: &str = "data: [DONE]\n\n";

/// role, "Hel", "lo", finish — the body of most streams below.
fn body_lf() -> String {
    [role(), content("Hel"), content("lo"), finish()]
        .iter()
        .map(|c| ev(c))
        .collect()
}

// ---------- framing ----------

#[test]
fn lf_stream_with_usage_chunk_then_done() {
    let input = format!("{}{}{DONE}", body_lf(), ev(&usage_chunk(10, 2)));
    let stripped = format!("{}{DONE}", body_lf());
    check_both(
        &input,
        &stripped,
        &summary(usage(10, 2, 0), StreamEnd::Done, 2),
    );
}

#[test]
fn crlf_line_endings() {
    let events = [role(), content("Hel"), content("lo"), finish()];
    let body: String = events
        .iter()
        .map(|c| format!("data: {c}\r\n\r\n"))
        .collect();
    let input = format!(
        "{body}data: {}\r\n\r\ndata: [DONE]\r\n\r\n",
        usage_chunk(10, 2)
    );
    let stripped = format!("{body}data: [DONE]\r\n\r\n");
    check_both(
        &input,
        &stripped,
        &summary(usage(10, 2, 0), StreamEnd::Done, 2),
    );
}

#[test]
fn crlf_split_across_reads_is_one_line_end() {
    // A JSON over two data lines: an extra blank line from the split CRLF would dispatch
    // half of it and lose the usage.
    let input = "data: {\"choices\":[],\r\ndata: \"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3}}\r\n\r\ndata: [DONE]\r\n\r\n";
    let cut = input.find('\r').unwrap() + 1;
    let (head, tail) = input.as_bytes().split_at(cut);
    let (out, got, _) = run(&[head, tail], false);
    assert_bytes(&out, input.as_bytes(), "split inside CRLF");
    assert_eq!(got, summary(usage(7, 3, 0), StreamEnd::Done, 0));
    let (out, got, _) = run(&[head, tail], true);
    assert_bytes(
        &out,
        b"data: [DONE]\r\n\r\n",
        "split inside CRLF, stripping",
    );
    assert_eq!(got, summary(usage(7, 3, 0), StreamEnd::Done, 0));
    check(
        input.as_bytes(),
        true,
        b"data: [DONE]\r\n\r\n",
        &summary(usage(7, 3, 0), StreamEnd::Done, 0),
    );
}

#[test]
fn cr_only_line_endings() {
    let input = format!(
        "data: {}\r\rdata: {}\r\rdata: [DONE]\r\r",
        content("a"),
        usage_chunk(4, 1)
    );
    let stripped = format!("data: {}\r\rdata: [DONE]\r\r", content("a"));
    check_both(
        &input,
        &stripped,
        &summary(usage(4, 1, 0), StreamEnd::Done, 1),
    );
}

#[test]
fn stripped_cr_terminated_usage_chunk_takes_its_split_lf_along() {
    let input = format!("data: {}\r\n\r\ndata: [DONE]\r\n\r\n", usage_chunk(4, 1));
    // Split after the CR that dispatches the usage chunk: its LF arrives in the next read.
    let cut = input.find("\r\n\r\n").unwrap() + 3;
    let (head, tail) = input.as_bytes().split_at(cut);
    let (out, got, _) = run(&[head, tail], true);
    assert_bytes(&out, b"data: [DONE]\r\n\r\n", "LF of a dropped event");
    assert_eq!(got, summary(usage(4, 1, 0), StreamEnd::Done, 0));
}

#[test]
fn data_without_space_and_with_two_spaces() {
    let input = format!(
        "data:{}\n\ndata:  {}\n\ndata:{}\n\ndata:[DONE]\n\n",
        content("a"),
        content("b"),
        usage_chunk(5, 2)
    );
    let stripped = format!(
        "data:{}\n\ndata:  {}\n\ndata:[DONE]\n\n",
        content("a"),
        content("b")
    );
    check_both(
        &input,
        &stripped,
        &summary(usage(5, 2, 0), StreamEnd::Done, 2),
    );
}

#[test]
fn multi_line_data_is_joined_with_newlines() {
    let usage_lines = "data: {\"choices\": [],\ndata:   \"usage\": {\"prompt_tokens\": 9,\ndata:     \"completion_tokens\": 4}\ndata: }\n\n";
    let content_lines =
        "data: {\"choices\": [{\"index\": 0,\ndata: \"delta\": {\"content\": \"x\"}}]}\n\n";
    let input = format!("{content_lines}{usage_lines}{DONE}");
    let stripped = format!("{content_lines}{DONE}");
    check_both(
        &input,
        &stripped,
        &summary(usage(9, 4, 0), StreamEnd::Done, 1),
    );
}

#[test]
fn one_leading_bom_is_stripped() {
    let input = format!(
        "\u{FEFF}{}{}{DONE}",
        ev(&content("a")),
        ev(&usage_chunk(3, 1))
    );
    let stripped = format!("\u{FEFF}{}{DONE}", ev(&content("a")));
    check_both(
        &input,
        &stripped,
        &summary(usage(3, 1, 0), StreamEnd::Done, 1),
    );
}

#[test]
fn a_bom_later_in_the_stream_is_data() {
    // Only the first one is a BOM; a second makes the line's field name unknown.
    let input = format!("\u{FEFF}\u{FEFF}{}{DONE}", ev(&usage_chunk(3, 1)));
    check_both(&input, &input, &summary(None, StreamEnd::Done, 0));
}

#[test]
fn trailing_spaces_after_the_json() {
    let input = format!(
        "data: {}   \n\ndata: {} \t \n\ndata: [DONE]  \n\n",
        content("a"),
        usage_chunk(3, 1)
    );
    let stripped = format!("data: {}   \n\ndata: [DONE]  \n\n", content("a"));
    check_both(
        &input,
        &stripped,
        &summary(usage(3, 1, 0), StreamEnd::Done, 1),
    );
}

#[test]
fn comment_lines_with_and_without_blank_lines() {
    let input = format!(
        ":\n: keep-alive\n\n: ping - 2025-01-01 00:00:00.000000+00:00\ndata: {}\n\n: ping - 1\ndata: {}\n: inside\n\n{DONE}",
        content("a"),
        usage_chunk(3, 1)
    );
    let stripped = format!(
        ":\n: keep-alive\n\n: ping - 2025-01-01 00:00:00.000000+00:00\ndata: {}\n\n: ping - 1\n{DONE}",
        content("a")
    );
    check_both(
        &input,
        &stripped,
        &summary(usage(3, 1, 0), StreamEnd::Done, 1),
    );
}

#[test]
fn lone_comments_are_forwarded_at_once_when_stripping() {
    // A keep-alive must not wait for the next event.
    let mut tap = StreamTap::new(true);
    assert_eq!(&tap.feed(Bytes::from_static(b": ping\n"))[..], b": ping\n");
    assert_eq!(&tap.feed(Bytes::from_static(b"data: {\"a\"")), "");
    assert_eq!(
        &tap.feed(Bytes::from_static(b":1}\n\n: x\n"))[..],
        b"data: {\"a\":1}\n\n: x\n"
    );
    assert_eq!(&tap.finish()[..], b"");
}

#[test]
fn keep_alives_disguised_as_data_are_skipped() {
    let input = format!(
        "data: : keepalive\n\ndata:\n\ndata: \n\n{}data: : keepalive\n\n{}{DONE}",
        ev(&content("a")),
        ev(&usage_chunk(3, 1))
    );
    let stripped = format!(
        "data: : keepalive\n\ndata:\n\ndata: \n\n{}data: : keepalive\n\n{DONE}",
        ev(&content("a"))
    );
    check_both(
        &input,
        &stripped,
        &summary(usage(3, 1, 0), StreamEnd::Done, 1),
    );
}

#[test]
fn event_and_id_lines_are_ignored_and_stripped_with_their_event() {
    let input = format!(
        "event: message\nid: 1\nretry: 3000\ndata: {}\n\nevent: message\nid: 2\ndata: {}\n\nid: 3\ndata: [DONE]\n\n",
        content("a"),
        usage_chunk(3, 1)
    );
    let stripped = format!(
        "event: message\nid: 1\nretry: 3000\ndata: {}\n\nid: 3\ndata: [DONE]\n\n",
        content("a")
    );
    check_both(
        &input,
        &stripped,
        &summary(usage(3, 1, 0), StreamEnd::Done, 1),
    );
}

#[test]
fn utf8_split_inside_a_character_is_decoded_per_line() {
    // `check` splits at every byte, including inside "é" and "🚀".
    let input = format!(
        "{}{}{}{DONE}",
        ev(&content("Équipe 🚀")),
        ev(&content("Δ")),
        ev(&usage_chunk(12, 2))
    );
    let stripped = format!("{}{}{DONE}", ev(&content("Équipe 🚀")), ev(&content("Δ")));
    check_both(
        &input,
        &stripped,
        &summary(usage(12, 2, 0), StreamEnd::Done, 2),
    );
}

#[test]
fn invalid_utf8_in_a_line_skips_that_event_only() {
    let input = b"data: {\"choices\":[{\"delta\":{\"content\":\"\xff\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":1}}\n\n";
    check(
        input,
        false,
        input,
        &summary(usage(2, 1, 0), StreamEnd::Truncated, 0),
    );
}

// ---------- endings ----------

#[test]
fn done_without_trailing_blank_line() {
    let input = format!("{}{}data: [DONE]\n", body_lf(), ev(&usage_chunk(10, 2)));
    let stripped = format!("{}data: [DONE]\n", body_lf());
    check_both(
        &input,
        &stripped,
        &summary(usage(10, 2, 0), StreamEnd::Done, 2),
    );
}

#[test]
fn done_without_any_line_end() {
    let input = format!("{}data: [DONE]", body_lf());
    check_both(&input, &input, &summary(None, StreamEnd::Done, 2));
}

#[test]
fn finish_chunk_without_done() {
    let input = format!("{}{}", body_lf(), ev(&usage_chunk(10, 2)));
    check_both(
        &input,
        &body_lf(),
        &summary(usage(10, 2, 0), StreamEnd::FinishedWithoutDone, 2),
    );
}

#[test]
fn eof_in_the_middle_of_an_event_is_truncated() {
    let half = &finish()[..30];
    let input = format!("{}{}data: {half}", ev(&content("a")), ev(&content("b")));
    let tap = check(
        input.as_bytes(),
        true,
        input.as_bytes(),
        &summary(None, StreamEnd::Truncated, 2),
    );
    assert!(!tap.recovered_at_eof());
    check(
        input.as_bytes(),
        false,
        input.as_bytes(),
        &summary(None, StreamEnd::Truncated, 2),
    );
}

#[test]
fn eof_after_a_whole_json_without_blank_line_is_read_and_flagged() {
    let input = format!("{}data: {}\n", ev(&content("a")), finish());
    let tap = check(
        input.as_bytes(),
        false,
        input.as_bytes(),
        &summary(None, StreamEnd::FinishedWithoutDone, 1),
    );
    assert!(tap.recovered_at_eof());

    let input = format!("{}data: {}", ev(&content("a")), usage_chunk(6, 1));
    let expected = summary(usage(6, 1, 0), StreamEnd::Truncated, 1);
    let tap = check(input.as_bytes(), false, input.as_bytes(), &expected);
    assert!(tap.recovered_at_eof());
    // Stripping: the usage-only chunk recovered at EOF is not forwarded either.
    check(
        input.as_bytes(),
        true,
        ev(&content("a")).as_bytes(),
        &expected,
    );
}

#[test]
fn reset_or_stall_after_content_is_truncated_with_the_chunks_counted() {
    let input = format!("{}{}{}", ev(&role()), ev(&content("a")), ev(&content("b")));
    check_both(&input, &input, &summary(None, StreamEnd::Truncated, 2));
}

#[test]
fn empty_stream_is_truncated() {
    check_both("", "", &summary(None, StreamEnd::Truncated, 0));
    check_both(
        ": ping\n\n",
        ": ping\n\n",
        &summary(None, StreamEnd::Truncated, 0),
    );
}

// ---------- usage ----------

#[test]
fn usage_null_on_every_chunk_then_a_final_chunk() {
    let null = |c: String| c.replacen("\"choices\"", "\"usage\":null,\"choices\"", 1);
    let body: String = [role(), content("a"), content("b"), finish()]
        .into_iter()
        .map(|c| ev(&null(c)))
        .collect();
    let input = format!("{body}{}{DONE}", ev(&usage_chunk(8, 2)));
    let stripped = format!("{body}{DONE}");
    check_both(
        &input,
        &stripped,
        &summary(usage(8, 2, 0), StreamEnd::Done, 2),
    );
}

#[test]
fn usage_key_absent_everywhere_is_unknown() {
    let input = format!("{}{DONE}", body_lf());
    check_both(&input, &input, &summary(None, StreamEnd::Done, 2));
}

#[test]
fn usage_null_everywhere_is_unknown_not_zero() {
    let input = format!(
        "data: {}\n\ndata: {{\"choices\":[],\"usage\":null}}\n\n{DONE}",
        content("a")
    );
    // `usage: null` is not a usage object: that chunk is forwarded.
    check_both(&input, &input, &summary(None, StreamEnd::Done, 1));
}

#[test]
fn cumulative_usage_on_every_chunk_with_two_choices_then_a_total() {
    // vLLM continuous_usage_stats with n=2: running usage per choice, then the total.
    let chunk = |index: u64, text: &str, completion: u64| {
        format!(
            r#"{{"id":"c","choices":[{{"index":{index},"delta":{{"content":"{text}"}},"finish_reason":null}}],"usage":{{"prompt_tokens":5,"completion_tokens":{completion},"total_tokens":{}}}}}"#,
            5 + completion
        )
    };
    let body: String = [
        chunk(0, "a", 1),
        chunk(1, "x", 1),
        chunk(0, "b", 2),
        chunk(1, "y", 2),
    ]
    .iter()
    .map(|c| ev(c))
    .collect();
    let input = format!("{body}{}{DONE}", ev(&usage_chunk(5, 4)));
    let stripped = format!("{body}{DONE}");
    check_both(
        &input,
        &stripped,
        &summary(usage(5, 4, 0), StreamEnd::Done, 4),
    );

    // Cut before the total: the last running figure, never a sum (5+6+... would be).
    check_both(
        &body,
        &body,
        &summary(usage(5, 2, 0), StreamEnd::Truncated, 4),
    );
}

#[test]
fn usage_inside_the_finish_chunk_with_choices_is_kept_and_forwarded() {
    let finish_with_usage = r#"{"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"length"}],"usage":{"prompt_tokens":11,"completion_tokens":2,"total_tokens":13}}"#;
    let input = format!(
        "{}{}{}{DONE}",
        ev(&content("a")),
        ev(&content("b")),
        ev(finish_with_usage)
    );
    check_both(
        &input,
        &input,
        &summary(usage(11, 2, 0), StreamEnd::Done, 2),
    );
}

#[test]
fn all_zero_placeholders_then_the_real_figure() {
    // Ollama /v1/completions: all-zero usage on every chunk first.
    let text = |t: &str| {
        format!(
            r#"{{"id":"cmpl-1","object":"text_completion","choices":[{{"index":0,"text":"{t}","finish_reason":null}}],"usage":{{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}}}}"#
        )
    };
    let body = format!("{}{}", ev(&text("a")), ev(&text("b")));
    let input = format!("{body}{}{DONE}", ev(&usage_chunk(9, 2)));
    let stripped = format!("{body}{DONE}");
    check_both(
        &input,
        &stripped,
        &summary(usage(9, 2, 0), StreamEnd::Done, 2),
    );
    // Zeros to the end: unknown, not zero.
    let input = format!("{body}{DONE}");
    check_both(&input, &input, &summary(None, StreamEnd::Done, 2));
}

#[test]
fn all_zero_after_a_real_figure_does_not_erase_it() {
    let input = format!("{}{}{DONE}", ev(&usage_chunk(9, 2)), ev(&usage_chunk(0, 0)));
    check_both(&input, DONE, &summary(usage(9, 2, 0), StreamEnd::Done, 0));
}

#[test]
fn total_tokens_missing_or_alone() {
    let no_total = r#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":5}}"#;
    check_both(
        &format!("{}{DONE}", ev(no_total)),
        DONE,
        &summary(usage(7, 5, 0), StreamEnd::Done, 0),
    );
    // Only prompt and total: the completion count is derived.
    let derived = r#"{"choices":[],"usage":{"prompt_tokens":7,"total_tokens":12}}"#;
    check_both(
        &format!("{}{DONE}", ev(derived)),
        DONE,
        &summary(usage(7, 5, 0), StreamEnd::Done, 0),
    );
    // The upstream's total is ignored: tokens are prompt + completion.
    let wrong_total =
        r#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":5,"total_tokens":99}}"#;
    let tap = check(
        format!("{}{DONE}", ev(wrong_total)).as_bytes(),
        false,
        format!("{}{DONE}", ev(wrong_total)).as_bytes(),
        &summary(usage(7, 5, 0), StreamEnd::Done, 0),
    );
    assert_eq!(tap.summary().usage.unwrap().total(), 12);
}

#[test]
fn cached_tokens_present_zero_or_absent() {
    let with_cached = |cached: &str| {
        format!(
            r#"{{"choices":[],"usage":{{"prompt_tokens":20,"completion_tokens":3,"total_tokens":23,"prompt_tokens_details":{cached}}}}}"#
        )
    };
    for (details, cached) in [
        (r#"{"cached_tokens":16}"#, 16),
        (r#"{"cached_tokens":0}"#, 0),
        (r#"{"audio_tokens":0}"#, 0),
        ("null", 0),
    ] {
        let input = format!("{}{DONE}", ev(&with_cached(details)));
        check_both(
            &input,
            DONE,
            &summary(usage(20, 3, cached), StreamEnd::Done, 0),
        );
    }
}

#[test]
fn cached_tokens_merge_field_by_field() {
    // A running chunk reports cached tokens; the final one omits the details.
    let running = r#"{"choices":[{"index":0,"delta":{"content":"a"}}],"usage":{"prompt_tokens":20,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":8}}}"#;
    let input = format!("{}{}{DONE}", ev(running), ev(&usage_chunk(20, 3)));
    let stripped = format!("{}{DONE}", ev(running));
    check_both(
        &input,
        &stripped,
        &summary(usage(20, 3, 8), StreamEnd::Done, 1),
    );
}

#[test]
fn cached_tokens_never_exceed_prompt_tokens() {
    let input = r#"{"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":9}}}"#;
    check_both(
        &format!("{}{DONE}", ev(input)),
        DONE,
        &summary(usage(4, 1, 4), StreamEnd::Done, 0),
    );
}

#[test]
fn reasoning_tokens_are_part_of_completion_tokens() {
    let input = r#"{"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":30,"total_tokens":34,"completion_tokens_details":{"reasoning_tokens":25}}}"#;
    check_both(
        &format!("{}{DONE}", ev(input)),
        DONE,
        &summary(usage(4, 30, 0), StreamEnd::Done, 0),
    );
}

#[test]
fn vendor_extras_are_ignored() {
    // llama.cpp adds `timings`; others add their own keys.
    let input = r#"{"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6,"x_vendor":{"a":1}},"timings":{"prompt_n":4,"predicted_n":2,"predicted_ms":12.5},"x_groq":{"id":"r"}}"#;
    check_both(
        &format!("{}{}{DONE}", ev(&content("a")), ev(input)),
        &format!("{}{DONE}", ev(&content("a"))),
        &summary(usage(4, 2, 0), StreamEnd::Done, 1),
    );
}

#[test]
fn usage_that_is_not_an_object_of_numbers_is_no_information() {
    for bad in [
        r#""usage":"12""#,
        r#""usage":12"#,
        r#""usage":[1,2]"#,
        r#""usage":{"prompt_tokens":"7","completion_tokens":"5"}"#,
        r#""usage":{"prompt_tokens":-7,"completion_tokens":-5}"#,
    ] {
        let input = format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"a\"}}}}],{bad}}}\n\n{DONE}"
        );
        check_both(&input, &input, &summary(None, StreamEnd::Done, 1));
    }
}

#[test]
fn request_ignoring_include_usage_reports_nothing() {
    let input = format!("{}{DONE}", body_lf());
    check_both(&input, &input, &summary(None, StreamEnd::Done, 2));
}

// ---------- ids and shapes ----------

#[test]
fn empty_and_per_chunk_ids_do_not_matter() {
    let input = format!(
        "{}{}{}{DONE}",
        ev(&content("a").replace("chatcmpl-1", "")),
        ev(&content("b").replace("chatcmpl-1", "chatcmpl-2")),
        ev(&usage_chunk(3, 2).replace("chatcmpl-1", "chatcmpl-3"))
    );
    let stripped = format!(
        "{}{}{DONE}",
        ev(&content("a").replace("chatcmpl-1", "")),
        ev(&content("b").replace("chatcmpl-1", "chatcmpl-2"))
    );
    check_both(
        &input,
        &stripped,
        &summary(usage(3, 2, 0), StreamEnd::Done, 2),
    );
}

#[test]
fn empty_choices_without_usage_are_forwarded() {
    let empty = r#"{"id":"c","choices":[]}"#;
    let input = format!("{}{}{}{DONE}", ev(empty), ev(&content("a")), ev(empty));
    check_both(&input, &input, &summary(None, StreamEnd::Done, 1));
}

#[test]
fn choices_without_delta_and_odd_shapes_are_tolerated() {
    let input = [
        r#"{"choices":[{"index":0}]}"#,
        r#"{"choices":[{"index":0,"delta":null,"finish_reason":null}]}"#,
        r#"{"choices":[null, 3, "x", {"index":1,"delta":{"content":"a"}}]}"#,
        r#"{"choices":{"index":0}}"#,
        r#"{"choices":"none","unknown":{"deep":[1,2,3]}}"#,
        r#"[1,2,3]"#,
        r#""a string""#,
        r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{"}}]}}]}"#,
        r#"{"choices":[{"index":0,"delta":{"reasoning_content":"hmm"}}]}"#,
        r#"{"choices":[{"index":0,"delta":{},"finish_reason":""}]}"#,
    ]
    .iter()
    .map(|c| ev(c))
    .collect::<String>();
    check_both(&input, &input, &summary(None, StreamEnd::Truncated, 3));
}

#[test]
fn completions_text_chunks_count_per_choice() {
    let text = |i: u64, t: &str| {
        format!(
            r#"{{"object":"text_completion","choices":[{{"index":{i},"text":"{t}","finish_reason":null}}]}}"#
        )
    };
    let two = r#"{"object":"text_completion","choices":[{"index":0,"text":"c"},{"index":1,"text":"d"},{"index":2,"text":""}]}"#;
    let fin =
        r#"{"object":"text_completion","choices":[{"index":0,"text":"","finish_reason":"stop"}]}"#;
    let input = format!(
        "{}{}{}{}{DONE}",
        ev(&text(0, "a")),
        ev(&text(1, "b")),
        ev(two),
        ev(fin)
    );
    check_both(&input, &input, &summary(None, StreamEnd::Done, 4));
}

// ---------- errors ----------

fn error_summary(first: bool, chunks: u64, usage: Option<Usage>) -> StreamSummary {
    StreamSummary {
        usage,
        end: StreamEnd::ErrorEvent,
        is_error_first: first,
        content_chunks: chunks,
    }
}

#[test]
fn error_as_the_first_event_of_a_200() {
    // TGI: the first event is the error, then [DONE].
    let input = format!(
        "data: {{\"error\":\"Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096\",\"error_type\":\"validation\"}}\n\n{DONE}"
    );
    check_both(&input, &input, &error_summary(true, 0, None));
}

#[test]
fn error_first_after_comments_and_keepalives_is_still_first() {
    let input = ": ping\n\ndata: : keepalive\n\ndata: {\"error\":{\"message\":\"overloaded\",\"type\":\"server_error\",\"code\":503}}\n\n";
    check_both(input, input, &error_summary(true, 0, None));
}

#[test]
fn the_first_event_is_known_once_read_and_its_error_kept() {
    let error = r#"{"error":{"message":"overloaded","code":503}}"#;
    let mut tap = StreamTap::new(false);
    tap.feed(Bytes::from_static(b": ping\n\ndata: : keepalive\n\n"));
    assert!(
        !tap.has_read_an_event(),
        "comments and keep-alives are not events"
    );
    tap.feed(Bytes::from(format!("data: {error}")));
    assert!(!tap.has_read_an_event(), "not until its blank line");
    tap.feed(Bytes::from_static(b"\n\n"));
    assert!(tap.has_read_an_event());
    assert_eq!(tap.first_error(), Some(error.as_bytes()));

    let mut tap = StreamTap::new(true);
    tap.feed(Bytes::from(ev(&content("a"))));
    assert!(tap.has_read_an_event());
    tap.feed(Bytes::from(ev(r#"{"error":"later"}"#)));
    assert_eq!(
        tap.first_error(),
        None,
        "an error after content is not the first event"
    );

    let mut tap = StreamTap::new(false);
    tap.feed(Bytes::from_static(DONE.as_bytes()));
    assert!(tap.has_read_an_event(), "[DONE] alone is an event");
}

#[test]
fn error_after_content_then_done_is_an_error_event() {
    let err = r#"{"error":{"message":"CUDA out of memory","type":"InternalServerError","param":null,"code":500}}"#;
    let input = format!(
        "{}{}{}{DONE}",
        ev(&content("a")),
        ev(&content("b")),
        ev(err)
    );
    check_both(&input, &input, &error_summary(false, 2, None));
}

#[test]
fn done_is_seen_as_soon_as_it_is_read_even_after_an_error() {
    let mut tap = StreamTap::new(false);
    tap.feed(Bytes::from(ev(r#"{"error":{"message":"m"}}"#)));
    assert!(!tap.has_seen_done());
    tap.feed(Bytes::from_static(b"data: [DONE]\n"));
    assert!(!tap.has_seen_done(), "not before its blank line");
    tap.feed(Bytes::from_static(b"\n"));
    assert!(tap.has_seen_done());
    assert_eq!(tap.summary(), error_summary(true, 0, None));
}

#[test]
fn error_after_content_then_eof_or_nothing() {
    let err = r#"{"error":{"message":"boom","type":"server_error","code":"internal_error"}}"#;
    let input = format!("{}{}", ev(&content("a")), ev(err));
    check_both(&input, &input, &error_summary(false, 1, None));
    // The error event itself cut at EOF without its blank line is still read.
    let input = format!("{}data: {err}", ev(&content("a")));
    check_both(&input, &input, &error_summary(false, 1, None));
}

#[test]
fn error_shapes_in_events() {
    for err in [
        r#"{"error":{"message":"m","type":"t","param":null,"code":"c"}}"#,
        r#"{"error":{"message":"m","code":429}}"#,
        r#"{"object":"error","message":"m","type":"BadRequestError","param":null,"code":400}"#,
        r#"{"error":"m"}"#,
        r#"{"error":{}}"#,
        r#"{"detail":"m"}"#,
    ] {
        let input = format!("{}{}{DONE}", ev(&content("a")), ev(err));
        check_both(&input, &input, &error_summary(false, 1, None));
    }
    // `"error": null` is not an error.
    let input = format!(
        "{}{DONE}",
        ev(r#"{"error":null,"choices":[{"delta":{"content":"a"}}]}"#)
    );
    check_both(&input, &input, &summary(None, StreamEnd::Done, 1));
}

#[test]
fn error_field_line_and_error_event_type() {
    // Older llama.cpp: an `error:` field line; others: `event: error`.
    let input = format!(
        "{}error: {{\"code\":500,\"message\":\"slot unavailable\"}}\n\n",
        ev(&content("a"))
    );
    check_both(&input, &input, &error_summary(false, 1, None));
    let input = "event: error\ndata: {\"message\":\"m\"}\n\n";
    check_both(input, input, &error_summary(true, 0, None));
}

#[test]
fn usage_before_an_error_is_kept() {
    let input = format!(
        "{}{}",
        ev(
            r#"{"choices":[{"index":0,"delta":{"content":"a"}}],"usage":{"prompt_tokens":5,"completion_tokens":1}}"#
        ),
        ev(r#"{"error":{"message":"m"}}"#)
    );
    check_both(&input, &input, &error_summary(false, 1, usage(5, 1, 0)));
}

// ---------- bounds and pass-through ----------

#[test]
fn passing_through_returns_the_very_same_bytes() {
    let mut tap = StreamTap::new(false);
    let chunk = Bytes::from(format!("{}data: {{\"par", ev(&content("a"))));
    let out = tap.feed(chunk.clone());
    assert_eq!(out.as_ptr(), chunk.as_ptr());
    assert_eq!(out.len(), chunk.len());
    assert_eq!(tap.finish(), Bytes::new());
}

#[test]
fn stripping_forwards_whole_reads_without_copying_when_nothing_is_held() {
    let mut tap = StreamTap::new(true);
    let chunk = Bytes::from(format!("{}{}", ev(&content("a")), ev(&content("b"))));
    let out = tap.feed(chunk.clone());
    assert_eq!(out.as_ptr(), chunk.as_ptr());
    assert_eq!(out.len(), chunk.len());
}

#[test]
fn stripping_holds_only_the_incomplete_event() {
    let mut tap = StreamTap::new(true);
    let first = ev(&content("a"));
    let out = tap.feed(Bytes::from(format!("{first}data: {{\"cho")));
    assert_eq!(out, Bytes::from(first));
    let out = tap.feed(Bytes::from_static(b"ices\":[]}\n\n"));
    assert_eq!(out, Bytes::from_static(b"data: {\"choices\":[]}\n\n"));
    assert_eq!(tap.finish(), Bytes::new());
}

#[test]
fn oversize_event_is_forwarded_but_not_read() {
    let big = "x".repeat(super::MAX_EVENT_BYTES + 10);
    let huge_usage = format!(
        r#"{{"choices":[],"usage":{{"prompt_tokens":1000,"completion_tokens":1000}},"pad":"{big}"}}"#
    );
    let input = format!(
        "{}{}{}{DONE}",
        ev(&content("a")),
        ev(&huge_usage),
        ev(&usage_chunk(4, 1))
    );
    let expected = summary(usage(4, 1, 0), StreamEnd::Done, 1);
    for strip in [false, true] {
        let forwarded = if strip {
            format!("{}{}{DONE}", ev(&content("a")), ev(&huge_usage))
        } else {
            input.clone()
        };
        for read in [input.len(), 4096, 1000] {
            let parts: Vec<&[u8]> = input.as_bytes().chunks(read).collect();
            let (out, got, tap) = run(&parts, strip);
            assert_bytes(&out, forwarded.as_bytes(), &format!("reads of {read}"));
            assert_eq!(got, expected);
            assert_eq!(tap.oversize_events(), 1);
        }
    }
}

#[test]
fn oversize_event_made_of_many_lines_is_bounded_too() {
    let line = format!("data: {}\n", "y".repeat(64 * 1024));
    let many: String = std::iter::repeat_n(line.as_str(), 20).collect();
    let input = format!("{many}\n{}", ev(&usage_chunk(4, 1)));
    for strip in [false, true] {
        let parts: Vec<&[u8]> = input.as_bytes().chunks(10_000).collect();
        let (out, got, tap) = run(&parts, strip);
        let forwarded = if strip {
            format!("{many}\n")
        } else {
            input.clone()
        };
        assert_bytes(&out, forwarded.as_bytes(), "many lines");
        assert_eq!(got, summary(usage(4, 1, 0), StreamEnd::Truncated, 0));
        assert_eq!(tap.oversize_events(), 1);
    }
}

#[test]
fn feeding_after_finish_passes_through_and_finish_is_idempotent() {
    let mut tap = StreamTap::new(true);
    assert_eq!(tap.feed(Bytes::from_static(b"data: {\"a\"")), Bytes::new());
    assert_eq!(tap.finish(), Bytes::from_static(b"data: {\"a\""));
    assert_eq!(tap.finish(), Bytes::new());
    assert_eq!(
        tap.feed(Bytes::from_static(b"late")),
        Bytes::from_static(b"late")
    );
}

#[test]
fn an_opening_tap_reads_up_to_the_first_event_only() {
    let stream = format!(
        ": keep-alive\n\n{}{}{}{DONE}",
        ev(&content("a")),
        ev(r#"{"error":{"message":"later"}}"#),
        ev(&usage_chunk(3, 2))
    );
    let mut tap = StreamTap::opening();
    let read = Bytes::from(stream.clone());
    assert_eq!(tap.feed(read.clone()), read);
    assert!(tap.has_read_an_event());
    // The error, the usage and `[DONE]` after the first event were left unread.
    assert_eq!(tap.first_error(), None);
    assert_eq!(tap.summary(), summary(None, StreamEnd::Truncated, 1));
    assert!(!tap.has_seen_done());

    // Split inside the first event: nothing is known until its blank line.
    let mut tap = StreamTap::opening();
    let error = ev(r#"{"error":{"message":"first"}}"#);
    let (head, tail) = error.split_at(10);
    tap.feed(Bytes::from(head.to_owned()));
    assert!(!tap.has_read_an_event());
    tap.feed(Bytes::from(format!("{tail}{}", ev(&content("b")))));
    assert_eq!(
        tap.first_error(),
        Some(&br#"{"error":{"message":"first"}}"#[..])
    );
    assert_eq!(tap.summary(), error_summary(true, 0, None));
}

#[test]
fn summary_is_available_mid_stream() {
    let mut tap = StreamTap::new(false);
    tap.feed(Bytes::from(format!(
        "{}{}data: {{\"choi",
        ev(&content("a")),
        ev(&content("b"))
    )));
    assert_eq!(tap.summary(), summary(None, StreamEnd::Truncated, 2));
}

/// Random reads over a corpus of every variant above: the result never depends on
/// where the reads split.
#[test]
fn random_split_points_give_the_same_result() {
    let corpus = format!(
        "\u{FEFF}: ping\n\n{}event: message\r\nid: 7\r\ndata:{}\r\n\r\ndata: {{\"choices\": [],\rdata: \"usage\": {{\"prompt_tokens\": 3, \"completion_tokens\": 1}}}}\r\r{}data: : keepalive\n\ndata:  {}   \n\n{}data: [DONE]\n",
        ev(&content("Équipe 🚀")),
        content("Δx"),
        ev(&usage_chunk(0, 0)),
        finish(),
        ev(&usage_chunk(12, 3).replace("\"choices\":[]", "\"choices\":[],\"prompt_tokens_details\":null"))
    );
    let (whole_plain, expected, _) = run(&[corpus.as_bytes()], false);
    let (whole_stripped, expected_stripped, _) = run(&[corpus.as_bytes()], true);
    assert_bytes(&whole_plain, corpus.as_bytes(), "whole");
    assert_eq!(expected, summary(usage(12, 3, 0), StreamEnd::Done, 2));
    assert_eq!(expected_stripped, expected);
    assert!(!String::from_utf8_lossy(&whole_stripped).contains("usage"));

    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let bytes = corpus.as_bytes();
    for _ in 0..500 {
        let mut cuts: Vec<usize> = (0..next() % 12)
            .map(|_| (next() % (bytes.len() as u64 + 1)) as usize)
            .collect();
        cuts.sort_unstable();
        let mut parts = Vec::new();
        let mut from = 0;
        for cut in cuts {
            parts.push(&bytes[from..cut]);
            from = cut;
        }
        parts.push(&bytes[from..]);
        for (strip, whole, summary) in [
            (false, &whole_plain, &expected),
            (true, &whole_stripped, &expected_stripped),
        ] {
            let (out, got, _) = run(&parts, strip);
            assert_bytes(&out, whole, "random reads");
            assert_eq!(&got, summary);
        }
    }
}

// ---------- non-streamed bodies ----------

#[test]
fn body_with_usage() {
    let body = br#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":10,"completion_tokens":50,"total_tokens":60,"prompt_tokens_details":{"cached_tokens":4}}}"#;
    assert_eq!(
        summarize_body(body),
        BodySummary {
            usage: usage(10, 50, 4),
            is_error: false
        }
    );
}

#[test]
fn body_of_embeddings_has_no_completion_tokens() {
    let body = br#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,0.2]}],"model":"e","usage":{"prompt_tokens":6,"total_tokens":6}}"#;
    assert_eq!(
        summarize_body(body),
        BodySummary {
            usage: usage(6, 0, 0),
            is_error: false
        }
    );
}

#[test]
fn body_without_usage_or_with_placeholder_usage() {
    for body in [
        &br#"{"object":"chat.completion","choices":[]}"#[..],
        br#"{"object":"chat.completion","choices":[],"usage":null}"#,
        br#"{"object":"chat.completion","choices":[],"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}}"#,
        b"not json",
        b"",
        b"[1]",
    ] {
        assert_eq!(
            summarize_body(body),
            BodySummary {
                usage: None,
                is_error: false
            },
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn body_with_a_top_level_error_in_any_shape() {
    for body in [
        &br#"{"error":{"message":"m","type":"t","param":null,"code":"c"}}"#[..],
        br#"{"error":{"message":"m","code":500}}"#,
        br#"{"object":"error","message":"m","type":"BadRequestError","code":400}"#,
        br#"{"error":"m","error_type":"generation"}"#,
        br#"{"detail":"Not Found"}"#,
    ] {
        assert_eq!(
            summarize_body(body),
            BodySummary {
                usage: None,
                is_error: true
            },
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}
