//! The webhook sink: scripted answers over real HTTP, raw bytes kept, signature checks
//! against the Standard Webhooks specification's published vector.

use std::time::Duration;

use tollgate_testkit::{dedupe_accepted, SinkReply, WebhookSink};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const BODY: &str = r#"{"test": 2432232314}"#;

async fn post(sink: &WebhookSink, body: &str, headers: &[(&str, &str)]) -> Result<u16, String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let mut request = client.post(sink.url()).body(body.to_owned());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn answers_as_scripted_then_200() {
    let sink = WebhookSink::start().await.unwrap();
    sink.fail_next(2);
    sink.script([
        SinkReply::Status(429),
        SinkReply::Drop,
        SinkReply::Sleep(Duration::from_secs(2)),
    ]);
    assert_eq!(post(&sink, "a", &[]).await, Ok(500));
    assert_eq!(post(&sink, "b", &[]).await, Ok(500));
    assert_eq!(post(&sink, "c", &[]).await, Ok(429));
    assert!(post(&sink, "d", &[]).await.is_err(), "dropped connection");
    assert!(
        post(&sink, "e", &[]).await.is_err(),
        "slept past the client's timeout"
    );
    assert_eq!(post(&sink, "f", &[]).await, Ok(200));
    sink.set_default(SinkReply::Status(404));
    assert_eq!(post(&sink, "g", &[]).await, Ok(404));

    let requests = sink.requests();
    let bodies: Vec<&[u8]> = requests.iter().map(|r| r.body.as_ref()).collect();
    assert_eq!(bodies, [b"a", b"b", b"c", b"d", b"e", b"f", b"g"]);
    assert_eq!(requests[3].reply, SinkReply::Drop);
    assert_eq!(requests[0].method, "POST");
    assert_eq!(requests[0].path, "/webhook");
    let accepted: Vec<bool> = requests.iter().map(|r| r.is_accepted()).collect();
    assert_eq!(accepted, [false, false, false, false, false, true, false]);
}

#[tokio::test]
async fn verifies_the_published_vector_over_the_raw_bytes() {
    let sink = WebhookSink::start().await.unwrap();
    let good = [
        ("webhook-id", "msg_p5jXN8AQM9LWM0D4loKWxJek"),
        ("webhook-timestamp", "1614265330"),
        (
            "webhook-signature",
            "v1,bm9wZQ== v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        ),
        (
            "X-Baseten-Signature",
            "v1=e2cb4f5251572539d458bfb8a7adb533b08801e6a794467e06f771debbb0818b",
        ),
    ];
    post(&sink, BODY, &good).await.unwrap();
    // The same headers over a body re-serialized without the space.
    post(&sink, r#"{"test":2432232314}"#, &good).await.unwrap();
    let requests = sink.requests();
    assert!(requests[0].verifies_standard(SECRET));
    assert!(requests[0].verifies_baseten(SECRET));
    assert!(requests[0].verifies(SECRET));
    assert!(!requests[1].verifies_standard(SECRET));
    assert!(!requests[1].verifies_baseten(SECRET));
    let other = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    assert!(!requests[0].verifies(other));
    assert_eq!(
        requests[0].header("Webhook-Id"),
        Some("msg_p5jXN8AQM9LWM0D4loKWxJek")
    );
}

#[tokio::test]
async fn dedupe_keeps_one_event_per_key_from_accepted_requests() {
    let sink = WebhookSink::start().await.unwrap();
    let batch = |keys: &[&str]| {
        let events: Vec<_> = keys
            .iter()
            .map(|k| serde_json::json!({"idempotencyKey": k, "n": 1}))
            .collect();
        serde_json::json!({"type": "API_BILLING_USAGE", "data": {"events": events}}).to_string()
    };
    sink.fail_next(1);
    post(&sink, &batch(&["a", "b"]), &[]).await.unwrap();
    post(&sink, &batch(&["a", "b"]), &[]).await.unwrap();
    post(&sink, &batch(&["b", "c"]), &[]).await.unwrap();
    let kept = dedupe_accepted(&sink.requests());
    assert_eq!(kept.events.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
    assert_eq!(kept.duplicates, 1);
    assert!(kept.conflicts.is_empty());
    assert!(sink.wait_for_events(3, Duration::from_millis(10)).await);
    assert!(!sink.wait_for_events(4, Duration::from_millis(50)).await);
}
