//! The mock over real HTTP: echo, scripts, errors, recording, disconnects, framing.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate_testkit::MockUpstream;

use crate::support::{chat, concat, contents, events, frames, post, stream, Stop};

const CHAT: &str = "/chat/completions";

#[tokio::test]
async fn non_streamed_chat_echoes_the_last_user_message_with_usage() {
    let mock = MockUpstream::start().await.unwrap();
    let response = post(&mock, CHAT, &chat("echo", false, None)).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "echo");
    assert_eq!(body["id"], "chatcmpl-mock0");
    assert_eq!(body["choices"][0]["message"]["content"], "Hello big world");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    // Prompt text: "Be brief." (9) + "Hello big world" (15) = 24 bytes → 6 tokens; three
    // words → three completion tokens.
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9})
    );
}

#[tokio::test]
async fn stream_without_include_usage_has_no_usage_at_all() {
    let mock = MockUpstream::start().await.unwrap();
    let (frames, stop) = stream(&mock, CHAT, &chat("echo", true, None)).await;
    assert_eq!(stop, Stop::End);
    let body = concat(&frames);
    assert!(!String::from_utf8_lossy(&body).contains("usage"));
    let events = events(&body);
    assert_eq!(events.len(), 6, "role, 3 tokens, finish, [DONE]");
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(contents(&events), ["Hello", " big", " world"]);
    assert_eq!(events[4]["choices"][0]["finish_reason"], "stop");
    assert_eq!(events[5], "[DONE]");
    assert!(events[..5]
        .iter()
        .all(|e| e["id"] == "chatcmpl-mock0" && e["object"] == "chat.completion.chunk"));
}

#[tokio::test]
async fn stream_with_include_usage_ends_with_a_usage_chunk() {
    let mock = MockUpstream::start().await.unwrap();
    let model = "echo?prompt_tokens=10&completion_tokens=50";
    let (frames, stop) = stream(&mock, CHAT, &chat(model, true, Some(true))).await;
    assert_eq!(stop, Stop::End);
    let events = events(&concat(&frames));
    assert_eq!(events.len(), 1 + 50 + 1 + 1 + 1);
    assert_eq!(contents(&events).len(), 50);
    assert_eq!(contents(&events)[3], " Hello", "words cycle");
    let usage = &events[52];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": 10, "completion_tokens": 50, "total_tokens": 60})
    );
    assert!(events[..52].iter().all(|e| e.get("usage").is_none()));
    assert_eq!(events[53], "[DONE]");

    // `include_usage: false` is not asking.
    let (frames, _) = stream(&mock, CHAT, &chat(model, true, Some(false))).await;
    assert!(!String::from_utf8_lossy(&concat(&frames)).contains("usage"));
}

#[tokio::test]
async fn chunks_and_completion_tokens_are_independent() {
    let mock = MockUpstream::start().await.unwrap();
    let body = chat("echo?chunks=2&completion_tokens=9", true, Some(true));
    let (frames, _) = stream(&mock, CHAT, &body).await;
    let events = events(&concat(&frames));
    assert_eq!(contents(&events), ["Hello", " big"]);
    assert_eq!(events[4]["usage"]["completion_tokens"], 9);
}

#[tokio::test]
async fn usage_placements() {
    let mock = MockUpstream::start().await.unwrap();
    let model =
        |usage_on: &str| format!("echo?prompt_tokens=10&completion_tokens=3&usage_on={usage_on}");
    let usage =
        |p: u64, c: u64| json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c});

    let (frames, _) = stream(
        &mock,
        CHAT,
        &chat(&model("null_then_final"), true, Some(true)),
    )
    .await;
    let e = events(&concat(&frames));
    assert!(e[..5]
        .iter()
        .all(|e| e["usage"] == Value::Null && e.get("usage").is_some()));
    assert_eq!(e[5]["usage"], usage(10, 3));

    let (frames, _) = stream(&mock, CHAT, &chat(&model("every"), true, Some(true))).await;
    let e = events(&concat(&frames));
    let running: Vec<Value> = e[..5].iter().map(|e| e["usage"].clone()).collect();
    assert_eq!(
        running,
        [
            usage(10, 0),
            usage(10, 1),
            usage(10, 2),
            usage(10, 3),
            usage(10, 3)
        ]
    );
    assert_eq!(e[5]["usage"], usage(10, 3));
    assert_eq!(e[5]["choices"], json!([]));

    let (frames, _) = stream(&mock, CHAT, &chat(&model("finish_chunk"), true, Some(true))).await;
    let e = events(&concat(&frames));
    assert_eq!(e.len(), 6);
    assert_eq!(e[4]["choices"][0]["finish_reason"], "stop");
    assert_eq!(e[4]["usage"], usage(10, 3));

    let (frames, _) = stream(&mock, CHAT, &chat(&model("none"), true, Some(true))).await;
    assert!(!String::from_utf8_lossy(&concat(&frames)).contains("usage"));

    let (frames, _) = stream(
        &mock,
        CHAT,
        &chat(&model("zeros_then_final"), true, Some(true)),
    )
    .await;
    let e = events(&concat(&frames));
    assert!(e[..5].iter().all(|e| e["usage"] == usage(0, 0)));
    assert_eq!(e[5]["usage"], usage(10, 3));

    // include_usage=always sends it unasked; never withholds it when asked.
    let (frames, _) = stream(&mock, CHAT, &chat("echo?include_usage=always", true, None)).await;
    assert_eq!(events(&concat(&frames))[5]["usage"], usage(6, 3));
    let (frames, _) = stream(
        &mock,
        CHAT,
        &chat("echo?include_usage=never", true, Some(true)),
    )
    .await;
    assert!(!String::from_utf8_lossy(&concat(&frames)).contains("usage"));
}

#[tokio::test]
async fn usage_details_and_extras() {
    let mock = MockUpstream::start().await.unwrap();
    let model = "echo?prompt_tokens=20&completion_tokens=30&cached_tokens=16&reasoning_tokens=25&omit_total=true&extras=true";
    let (frames, _) = stream(&mock, CHAT, &chat(model, true, Some(true))).await;
    let e = events(&concat(&frames));
    let last = &e[e.len() - 2];
    assert_eq!(
        last["usage"],
        json!({"prompt_tokens": 20, "completion_tokens": 30,
               "prompt_tokens_details": {"cached_tokens": 16},
               "completion_tokens_details": {"reasoning_tokens": 25},
               "queue_time": 0.013})
    );
    assert_eq!(last["timings"]["predicted_n"], 30);
    assert_eq!(e[1]["system_fingerprint"], "fp_mock");

    let body: Value = post(&mock, CHAT, &chat("echo?cached_tokens=0", false, None))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        body["usage"]["prompt_tokens_details"],
        json!({"cached_tokens": 0})
    );
}

#[tokio::test]
async fn two_choices_stream_per_choice() {
    let mock = MockUpstream::start().await.unwrap();
    let mut body = chat("echo?completion_tokens=2&usage_on=every", true, Some(true));
    body["n"] = json!(2);
    let (frames, _) = stream(&mock, CHAT, &body).await;
    let e = events(&concat(&frames));
    // 2 role chunks, 2×2 content chunks, 2 finish chunks, usage, [DONE].
    assert_eq!(e.len(), 10);
    let indexes: Vec<u64> = e[2..6]
        .iter()
        .map(|e| e["choices"][0]["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, [0, 1, 0, 1]);
    assert_eq!(
        e[5]["usage"]["completion_tokens"], 2,
        "running count is per choice"
    );
    assert_eq!(
        e[8]["usage"]["completion_tokens"], 4,
        "the total covers both choices"
    );
}

#[tokio::test]
async fn error_statuses_in_every_shape_with_retry_after() {
    let mock = MockUpstream::start().await.unwrap();
    let message = "mock upstream: scripted status 429";
    let cases = [
        (
            "nested",
            json!({"error": {"message": message, "type": "rate_limit_error", "param": null, "code": "rate_limit_exceeded"}}),
        ),
        (
            "nested_int_code",
            json!({"error": {"message": message, "type": "rate_limit_error", "param": null, "code": 429}}),
        ),
        (
            "flat",
            json!({"object": "error", "message": message, "type": "rate_limit_error", "param": null, "code": 429}),
        ),
        (
            "string",
            json!({"error": message, "error_type": "rate_limit_error"}),
        ),
        ("detail", json!({"detail": message})),
    ];
    for (shape, expected) in cases {
        let model = format!("echo?status=429&retry_after=7&error_shape={shape}");
        let response = post(&mock, CHAT, &chat(&model, true, None)).await;
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["retry-after"], "7");
        assert_eq!(response.json::<Value>().await.unwrap(), expected, "{shape}");
    }
    let response = post(
        &mock,
        CHAT,
        &chat("echo?status=503&error_shape=text", false, None),
    )
    .await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().get("retry-after").is_none());
    assert_eq!(
        response.text().await.unwrap(),
        "mock upstream: scripted status 503"
    );

    for status in [400, 401, 404, 413, 422, 500, 503] {
        let model = format!("echo?status={status}");
        for path in [CHAT, "/completions", "/embeddings"] {
            let body = json!({"model": model, "prompt": "x", "input": "x"});
            assert_eq!(post(&mock, path, &body).await.status(), status, "{path}");
        }
    }
}

#[tokio::test]
async fn script_mistakes_are_a_400_from_the_mock() {
    let mock = MockUpstream::start().await.unwrap();
    let response = post(&mock, CHAT, &chat("echo?prompt_token=5", false, None)).await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("mock script: unknown key `prompt_token`"));
    let response = post(&mock, CHAT, &json!({"messages": []})).await;
    assert_eq!(response.status(), 400);
}

#[tokio::test]
async fn requests_are_recorded_with_headers_and_exact_bodies() {
    let mock = MockUpstream::start().await.unwrap();
    let raw = r#"{"model":"echo","messages":[{"role":"user","content":"Équipe 🚀"}],"stream":true,"stream_options":{"include_usage":true}}"#;
    let response = reqwest::Client::new()
        .post(format!("{}/chat/completions", mock.base_url()))
        .header("Authorization", "Bearer sk-upstream")
        .header("Content-Type", "application/json")
        .body(raw)
        .send()
        .await
        .unwrap();
    frames(response, Duration::from_secs(2)).await;
    let unknown = reqwest::Client::new()
        .get(format!("http://{}//v1/chat/completions", mock.addr()))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    let requests = mock.requests();
    assert_eq!(requests.len(), 2);
    let first = &requests[0];
    assert_eq!(first.method, "POST");
    assert_eq!(first.path, "/v1/chat/completions");
    assert_eq!(first.header("authorization"), Some("Bearer sk-upstream"));
    assert_eq!(first.header("x-request-metadata"), None);
    assert_eq!(first.body["stream_options"]["include_usage"], true);
    assert_eq!(&first.raw_body[..], raw.as_bytes());
    assert!(!first.is_cut_by_client);
    assert_eq!(requests[1].method, "GET");
    assert_eq!(requests[1].path, "//v1/chat/completions");
    assert_eq!(requests[1].body, Value::Null);

    mock.clear();
    assert!(mock.requests().is_empty());
}

#[tokio::test]
async fn bodies_of_ten_mebibytes_are_read_whole() {
    let mock = MockUpstream::start().await.unwrap();
    let big = "a".repeat(10 * 1024 * 1024);
    let body = json!({"model": "echo", "messages": [{"role": "user", "content": big}]});
    let response = post(&mock, CHAT, &body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(mock.requests()[0].raw_body.len(), body.to_string().len());
}

#[tokio::test]
async fn completions_and_embeddings_and_models() {
    let mock = MockUpstream::start().await.unwrap();
    let body = json!({"model": "echo", "prompt": "one two", "stream": true,
                      "stream_options": {"include_usage": true}});
    let (frames, _) = stream(&mock, "/completions", &body).await;
    let e = events(&concat(&frames));
    assert_eq!(e.len(), 5, "2 tokens, finish, usage, [DONE]");
    assert_eq!(e[0]["object"], "text_completion");
    assert_eq!(e[0]["id"], "cmpl-mock0");
    assert_eq!(contents(&e), ["one", " two"]);
    assert_eq!(
        e[3]["usage"],
        json!({"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4})
    );

    let body: Value = post(
        &mock,
        "/completions",
        &json!({"model": "echo", "prompt": "one two"}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(body["choices"][0]["text"], "one two");

    let body: Value = post(
        &mock,
        "/embeddings",
        &json!({"model": "e", "input": ["abcdefgh", "xyz"]}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    assert_eq!(body["data"][1]["embedding"].as_array().unwrap().len(), 8);
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 3, "total_tokens": 3})
    );
    let again: Value = post(
        &mock,
        "/embeddings",
        &json!({"model": "e?prompt_tokens=9", "input": "abcdefgh"}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(
        again["data"][0]["embedding"], body["data"][0]["embedding"],
        "deterministic"
    );
    assert_eq!(again["usage"]["prompt_tokens"], 9);

    let models: Value = reqwest::get(format!("{}/models", mock.base_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "echo");
}

#[tokio::test]
async fn ids_empty_per_chunk_and_fixed() {
    let mock = MockUpstream::start().await.unwrap();
    let ids = |frames: &[bytes::Bytes]| -> Vec<String> {
        events(&concat(frames))
            .iter()
            .filter_map(|e| e.get("id").and_then(Value::as_str).map(str::to_owned))
            .collect()
    };
    let (frames, _) = stream(&mock, CHAT, &chat("echo?id=empty", true, None)).await;
    assert_eq!(ids(&frames), ["", "", "", "", ""]);
    let (frames, _) = stream(&mock, CHAT, &chat("echo?id=per_chunk", true, None)).await;
    assert_eq!(
        ids(&frames),
        [
            "chatcmpl-mock1-0",
            "chatcmpl-mock1-1",
            "chatcmpl-mock1-2",
            "chatcmpl-mock1-3",
            "chatcmpl-mock1-4"
        ]
    );
    let (first, _) = stream(&mock, CHAT, &chat("echo?id=fixed", true, None)).await;
    let (second, _) = stream(&mock, CHAT, &chat("echo?id=fixed", true, None)).await;
    assert_eq!(ids(&first)[0], "chatcmpl-fixed");
    assert_eq!(ids(&first), ids(&second));
}

#[tokio::test]
async fn framings_on_the_wire() {
    let mock = MockUpstream::start().await.unwrap();
    let raw = |framing: &'static str| {
        let mock = &mock;
        async move {
            let model = format!("echo?framing={framing}");
            let (frames, stop) = stream(mock, CHAT, &chat(&model, true, Some(true))).await;
            assert_eq!(stop, Stop::End);
            String::from_utf8(concat(&frames)).unwrap()
        }
    };
    let lf = raw("lf").await;
    assert!(lf.starts_with("data: {") && lf.ends_with("}\n\ndata: [DONE]\n\n"));
    let crlf = raw("crlf").await;
    assert!(crlf.ends_with("\r\n\r\ndata: [DONE]\r\n\r\n"));
    assert_eq!(crlf.matches('\n').count(), crlf.matches("\r\n").count());
    let cr = raw("cr").await;
    assert!(!cr.contains('\n') && cr.ends_with("}\r\rdata: [DONE]\r\r"));
    assert!(raw("nospace").await.starts_with("data:{"));
    assert!(raw("twospace").await.starts_with("data:  {"));
    assert!(raw("bom").await.starts_with("\u{FEFF}data: {"));
    let multiline = raw("multiline").await;
    assert!(multiline.starts_with("data: {\ndata:   \"choices\": [\n"));
    let comments = raw("comments").await;
    assert!(comments
        .starts_with(":\n: keep-alive\n\n: ping - 2025-01-01 00:00:00.000000+00:00\ndata: {"));
    let keepalive = raw("keepalive_data").await;
    assert!(keepalive.starts_with("data: : keepalive\n\ndata: {"));
    assert!(keepalive.contains("\n\ndata:\n\ndata: {"));
    let event_id = raw("event_id").await;
    assert!(event_id.starts_with("retry: 3000\nevent: message\nid: 0\ndata: {"));
    assert!(event_id.ends_with("event: message\nid: 6\ndata: [DONE]\n\n"));
    assert!(raw("trailing_spaces")
        .await
        .ends_with("}   \n\ndata: [DONE]   \n\n"));
}

#[tokio::test]
async fn deliveries_cut_writes_as_scripted() {
    let mock = MockUpstream::start().await.unwrap();
    let body = |delivery: &str| {
        let mut body = chat(&format!("echo?delivery={delivery}"), true, Some(true));
        body["messages"][1]["content"] = json!("Équipe 🚀 Δ");
        body
    };
    let (normal, _) = stream(&mock, CHAT, &body("normal")).await;
    assert_eq!(
        normal.len(),
        7,
        "role, 3 tokens, finish, usage, [DONE]: one frame each"
    );
    let whole = concat(&normal);

    let (bytewise, _) = stream(&mock, CHAT, &body("bytewise")).await;
    assert!(bytewise.iter().all(|f| f.len() == 1));
    assert_eq!(bytewise.len(), whole.len());

    let (split, _) = stream(&mock, CHAT, &body("split_utf8")).await;
    assert_eq!(split.len(), 14);
    let cut_inside_a_char = split
        .iter()
        .filter(|f| std::str::from_utf8(f).is_err())
        .count();
    assert_eq!(
        cut_inside_a_char, 6,
        "the 3 content events, each half invalid alone"
    );

    let (one, _) = stream(&mock, CHAT, &body("one_read")).await;
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].len(), whole.len());
}

#[tokio::test]
async fn endings_on_the_wire() {
    let mock = MockUpstream::start().await.unwrap();
    let run = |ending: &'static str| {
        let mock = &mock;
        async move {
            let body = chat(&format!("echo?ending={ending}"), true, Some(true));
            let (frames, stop) = stream(mock, CHAT, &body).await;
            (String::from_utf8_lossy(&concat(&frames)).into_owned(), stop)
        }
    };
    let (body, stop) = run("done_no_blank").await;
    assert_eq!(stop, Stop::End);
    assert!(body.ends_with("}\n\ndata: [DONE]\n"));
    let (body, stop) = run("no_done").await;
    assert_eq!(stop, Stop::End);
    assert!(!body.contains("[DONE]") && body.ends_with("}}\n\n"));
    let (body, stop) = run("eof_mid_event").await;
    assert_eq!(stop, Stop::End);
    let (whole, half) = body.rsplit_once("\n\n").unwrap();
    // The last event (here the usage chunk) is cut in half.
    assert!(half.starts_with("data: {\"choices\":[],\"created\":"));
    assert!(
        serde_json::from_str::<Value>(&half[6..]).is_err(),
        "half an event"
    );
    let whole = events(format!("{whole}\n\n").as_bytes());
    assert_eq!(whole.len(), 5, "role, three tokens, finish");
    assert_eq!(whole[4]["choices"][0]["finish_reason"], "stop");
    let (body, stop) = run("reset").await;
    assert_eq!(stop, Stop::Error);
    assert_eq!(events(body.as_bytes()).len(), 4, "role and three tokens");
    let (body, stop) = run("stall").await;
    assert_eq!(stop, Stop::Idle);
    assert_eq!(events(body.as_bytes()).len(), 4);
    // Everything, [DONE] included, then the connection stays open.
    let (body, stop) = run("done_stall").await;
    assert_eq!(stop, Stop::Idle);
    assert!(body.ends_with("}\n\ndata: [DONE]\n\n"));
    assert_eq!(
        events(body.as_bytes()).len(),
        7,
        "role, 3 tokens, finish, usage, [DONE]"
    );
}

#[tokio::test]
async fn error_events_in_a_200() {
    let mock = MockUpstream::start().await.unwrap();
    let run = |model: &'static str| {
        let mock = &mock;
        async move {
            let (frames, stop) = stream(mock, CHAT, &chat(model, true, None)).await;
            (events(&concat(&frames)), stop)
        }
    };
    let (e, stop) = run("echo?error_event=first").await;
    assert_eq!(stop, Stop::End);
    assert_eq!(e.len(), 2);
    assert_eq!(e[0]["error"]["type"], "server_error");
    assert_eq!(e[1], "[DONE]");

    let (e, stop) = run("echo?error_event=after:2&then=eof&error_shape=flat").await;
    assert_eq!(stop, Stop::End);
    assert_eq!(contents(&e), ["Hello", " big"]);
    assert_eq!(e.last().unwrap()["object"], "error");

    let (e, stop) = run("echo?error_event=after:1&then=nothing&error_shape=string").await;
    assert_eq!(stop, Stop::Idle);
    assert_eq!(
        e.last().unwrap()["error"],
        "mock upstream: failure while generating"
    );

    let body: Value = post(&mock, CHAT, &chat("echo?error_event=first", false, None))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["error"]["code"], "internal_error");
}

#[tokio::test]
async fn drop_after_closes_the_connection_mid_stream() {
    let mock = MockUpstream::start().await.unwrap();
    let body = chat("echo?completion_tokens=10&drop_after=3", true, Some(true));
    let (frames, stop) = stream(&mock, CHAT, &body).await;
    assert_eq!(stop, Stop::Error);
    assert_eq!(contents(&events(&concat(&frames))).len(), 3);
    assert_eq!(mock.disconnects(), 0, "the mock cut it, not the client");
}

#[tokio::test]
async fn reset_ending_is_a_tcp_reset() {
    let mock = MockUpstream::start().await.unwrap();
    let body = chat("echo?ending=reset", true, None).to_string();
    let mut socket = tokio::net::TcpStream::connect(mock.addr()).await.unwrap();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: mock\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let mut buffer = [0; 4096];
    let error = loop {
        match socket.read(&mut buffer).await {
            Ok(0) => panic!(
                "clean EOF instead of a reset: {}",
                String::from_utf8_lossy(&received)
            ),
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(error) => break error,
        }
    };
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);
    assert!(String::from_utf8_lossy(&received).contains("\"content\":\" world\""));
}

#[tokio::test]
async fn a_client_leaving_mid_stream_is_recorded() {
    let mock = MockUpstream::start().await.unwrap();
    let body = chat("echo?completion_tokens=50&interval_ms=20", true, Some(true));
    let response = post(&mock, CHAT, &body).await;
    let mut stream = response.bytes_stream();
    use futures::StreamExt;
    for _ in 0..3 {
        stream.next().await.unwrap().unwrap();
    }
    assert_eq!(mock.disconnects(), 0);
    drop(stream);
    assert!(mock.wait_for_disconnects(1, Duration::from_secs(2)).await);
    assert_eq!(mock.disconnects(), 1);
    assert!(mock.requests()[0].is_cut_by_client);
}

#[tokio::test]
async fn a_client_leaving_a_stalled_stream_or_a_slow_answer_is_recorded() {
    let mock = MockUpstream::start().await.unwrap();
    let response = post(&mock, CHAT, &chat("echo?ending=stall", true, None)).await;
    let (_, stop) = frames(response, Duration::from_millis(200)).await;
    assert_eq!(stop, Stop::Idle);
    assert!(mock.wait_for_disconnects(1, Duration::from_secs(2)).await);

    let slow = reqwest::Client::new()
        .post(format!("{}/chat/completions", mock.base_url()))
        .json(&chat("echo?latency_ms=5000", false, None))
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(slow.unwrap_err().is_timeout());
    assert!(mock.wait_for_disconnects(2, Duration::from_secs(2)).await);
    let requests = mock.requests();
    assert!(requests.iter().all(|r| r.is_cut_by_client));
}

#[tokio::test]
async fn latency_delays_the_headers() {
    let mock = MockUpstream::start().await.unwrap();
    let started = std::time::Instant::now();
    let response = post(&mock, CHAT, &chat("echo?latency_ms=300", true, None)).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn interval_spaces_the_events() {
    let mock = MockUpstream::start().await.unwrap();
    let started = std::time::Instant::now();
    let (frames, _) = stream(
        &mock,
        CHAT,
        &chat("echo?chunks=4&interval_ms=50", true, None),
    )
    .await;
    // role, 4 tokens, finish, [DONE]: six pauses.
    assert_eq!(frames.len(), 7);
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn serve_takes_a_listener_bound_elsewhere() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mock = MockUpstream::serve(listener).unwrap();
    assert_eq!(mock.addr(), addr);
    assert_eq!(mock.base_url(), format!("http://{addr}/v1"));
    let response = post(&mock, CHAT, &chat("echo", false, None)).await;
    assert_eq!(response.status(), 200);
    drop(mock);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "stopped on drop"
    );
}
