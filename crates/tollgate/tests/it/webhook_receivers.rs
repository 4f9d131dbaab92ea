//! The receiver examples of `docs/webhooks-receivers.md` (`docs/examples/receiver.py`
//! and `receiver.js`), run as real processes: first against bodies signed by Tollgate's
//! own signer with known values, then end to end behind a gateway's delivery worker.
//! Without python3 or node these tests fail; they never skip (`.ci/run` installs node).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tollgate_billing::signer::{sign, SigningKey};
use tollgate_core::{Clock, SystemClock, Timestamp};
use tollgate_store::{UsageEvent, UsageStatus};

use crate::admin_webhooks::{create_hook, HOOKS};
use crate::chat::{all_events, chat_body, Plane};
use crate::support::ok_json;

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/examples");
/// The receivers' key in the signed-body tests (`whsec_` + base64 of bytes 0..32).
const SECRET: &str = "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
/// Another endpoint's key: its signatures must not pass.
const OTHER_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[derive(Debug, Clone, Copy)]
pub enum Program {
    Python,
    Node,
}

impl Program {
    fn command(self) -> (PathBuf, PathBuf) {
        let examples = Path::new(EXAMPLES);
        match self {
            Program::Python => ("python3".into(), examples.join("receiver.py")),
            Program::Node => (node(), examples.join("receiver.js")),
        }
    }
}

/// `node` on PATH, else `/usr/bin/node`; fails the test when there is neither.
fn node() -> PathBuf {
    let works = |program: &Path| {
        std::process::Command::new(program)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    for candidate in [Path::new("node"), Path::new("/usr/bin/node")] {
        if works(candidate) {
            return candidate.to_path_buf();
        }
    }
    panic!("node is required for the receiver example tests (apt-get install -y nodejs)");
}

/// A receiver example running as a child process; killed when dropped.
pub struct Receiver {
    _child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    /// `http://127.0.0.1:<port>/tollgate`
    pub url: String,
}

impl Receiver {
    /// Starts `program` with `secret`, on `port` (0: any free port).
    pub async fn start(program: Program, secret: &str, port: u16) -> Receiver {
        let (interpreter, script) = program.command();
        let mut child = Command::new(&interpreter)
            .arg(&script)
            .env("WEBHOOK_SECRET", secret)
            .env("HOST", "127.0.0.1")
            .env("PORT", port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", interpreter.display()));
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("{program:?} receiver did not start"))
            .unwrap()
            .unwrap_or_else(|| panic!("{program:?} receiver exited"));
        let address = first
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"));
        Receiver {
            _child: child,
            lines,
            url: format!("http://{address}/tollgate"),
        }
    }

    /// The next decision line, parsed (waits at most `wait`).
    pub async fn next_line_within(&mut self, wait: Duration) -> Option<Value> {
        let line = tokio::time::timeout(wait, self.lines.next_line())
            .await
            .ok()?
            .unwrap()?;
        Some(serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}")))
    }

    pub async fn next_lines(&mut self, n: usize) -> Vec<Value> {
        let mut lines = Vec::new();
        for _ in 0..n {
            let line = self.next_line_within(Duration::from_secs(10)).await;
            lines.push(line.unwrap_or_else(|| panic!("no line after {lines:?}")));
        }
        lines
    }
}

fn event(key: &str, external_id: &str, metadata: Option<&str>, tokens: (u64, u64)) -> UsageEvent {
    UsageEvent {
        idempotency_key: key.to_owned(),
        timestamp: Timestamp(1_796_320_404_123),
        request_id: key.replace("evt_", "req_"),
        request_metadata: metadata.map(str::to_owned),
        model_slug: "acme/m".to_owned(),
        external_entity_id: external_id.to_owned(),
        api_key_prefix: "tg_AAAAAAAAAAAAA".to_owned(),
        group_id: "grp_1".to_owned(),
        workspace_id: "ws_1".to_owned(),
        status: UsageStatus::Completed,
        input_tokens: tokens.0,
        output_tokens: tokens.1,
        cached_input_tokens: 0,
        is_estimated: false,
    }
}

/// The line a receiver prints for an event it counts.
fn accepted(event: &UsageEvent) -> Value {
    json!({
        "accepted": event.idempotency_key,
        "requestId": event.request_id,
        "externalEntityId": event.external_entity_id,
        "modelSlug": event.model_slug,
        "inputTokens": event.input_tokens,
        "outputTokens": event.output_tokens,
    })
}

fn duplicate(event: &UsageEvent) -> Value {
    json!({ "duplicate": event.idempotency_key })
}

fn rejected(reason: &str) -> Value {
    json!({ "rejected": reason })
}

fn now_seconds() -> i64 {
    SystemClock.now().millis() / 1000
}

/// POSTs `body` with `headers`; returns the status.
async fn post(url: &str, headers: &[(String, String)], body: &[u8]) -> u16 {
    let mut request = reqwest::Client::new().post(url).body(body.to_vec());
    for (name, value) in headers {
        request = request.header(name, value);
    }
    request.send().await.unwrap().status().as_u16()
}

/// Tollgate's headers for one attempt, signed with `secrets` (newest first).
fn signed(id: &str, timestamp: i64, body: &[u8], secrets: &[&str]) -> Vec<(String, String)> {
    let keys: Vec<SigningKey> = secrets
        .iter()
        .map(|s| SigningKey::from_secret(s).unwrap())
        .collect();
    let headers = sign(id, timestamp, body, &keys);
    let mut pairs: Vec<(String, String)> = headers
        .pairs()
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect();
    pairs.push(("content-type".into(), "application/json".into()));
    pairs
}

fn replace_header(headers: &mut [(String, String)], name: &str, value: String) {
    for (n, v) in headers.iter_mut() {
        if n == name {
            *v = value.clone();
        }
    }
}

/// The signed-body cases, with exact answers and exact output lines.
async fn verify_known_values(program: Program) {
    let mut receiver = Receiver::start(program, SECRET, 0).await;
    let url = receiver.url.clone();
    // C18's awkward payloads: non-ASCII, quotes and backslashes, an integer above 2^64
    // in the metadata, empty strings.
    let first = event(
        "evt_a",
        "Équipe \"q\" \\ 🚀 Δ",
        Some(r#"{"n": 123456789012345678901234567890, "name": "Équipe 🚀 Δ", "empty": ""}"#),
        (10, 50),
    );
    let second = event("evt_b", "cust-7", None, (0, 1));
    let body = tollgate_billing::batch_body([&first, &second]).unwrap();
    let now = now_seconds();

    // Authentic: one line per event.
    let headers = signed("dlv_1", now, &body, &[SECRET]);
    assert_eq!(post(&url, &headers, &body).await, 200);
    assert_eq!(
        receiver.next_lines(2).await,
        vec![accepted(&first), accepted(&second)]
    );
    // A retry (same id and bytes, a later timestamp): 200, counted once.
    let retry = signed("dlv_1", now + 30, &body, &[SECRET]);
    assert_eq!(post(&url, &retry, &body).await, 200);
    assert_eq!(
        receiver.next_lines(2).await,
        vec![duplicate(&first), duplicate(&second)]
    );

    // One byte changed after signing.
    let tampered = String::from_utf8(body.clone())
        .unwrap()
        .replace(r#""inputTokens":10"#, r#""inputTokens":90"#)
        .into_bytes();
    assert_eq!(tampered.len(), body.len());
    assert_ne!(tampered, body);
    assert_eq!(post(&url, &headers, &tampered).await, 401);
    assert_eq!(
        receiver.next_lines(1).await,
        vec![rejected("webhook-signature does not match")]
    );

    // Stale or future timestamps, correctly signed.
    for at in [now - 301, now + 301, now - 3600] {
        assert_eq!(
            post(&url, &signed("dlv_1", at, &body, &[SECRET]), &body).await,
            401
        );
        assert_eq!(
            receiver.next_lines(1).await,
            vec![rejected("timestamp outside the 5-minute tolerance")]
        );
    }
    // Inside the tolerance.
    let third = event("evt_c", "cust-7", None, (3, 4));
    let body3 = tollgate_billing::batch_body([&third]).unwrap();
    let old = signed("dlv_3", now - 290, &body3, &[SECRET]);
    assert_eq!(post(&url, &old, &body3).await, 200);
    assert_eq!(receiver.next_lines(1).await, vec![accepted(&third)]);

    // Each signature is checked: a good one does not excuse the other.
    let fourth = event("evt_d", "cust-7", None, (5, 6));
    let body4 = tollgate_billing::batch_body([&fourth]).unwrap();
    let foreign = signed("dlv_4", now, &body4, &[OTHER_SECRET]);
    let mut bad_baseten = signed("dlv_4", now, &body4, &[SECRET]);
    replace_header(
        &mut bad_baseten,
        "x-baseten-signature",
        foreign[3].1.clone(),
    );
    assert_eq!(post(&url, &bad_baseten, &body4).await, 401);
    assert_eq!(
        receiver.next_lines(1).await,
        vec![rejected("X-Baseten-Signature does not match")]
    );
    let mut bad_standard = signed("dlv_4", now, &body4, &[SECRET]);
    replace_header(&mut bad_standard, "webhook-signature", foreign[2].1.clone());
    assert_eq!(post(&url, &bad_standard, &body4).await, 401);
    assert_eq!(
        receiver.next_lines(1).await,
        vec![rejected("webhook-signature does not match")]
    );
    // Signed for another id than the one sent.
    let mut wrong_id = signed("dlv_4", now, &body4, &[SECRET]);
    replace_header(&mut wrong_id, "webhook-id", "dlv_5".into());
    assert_eq!(post(&url, &wrong_id, &body4).await, 401);
    assert_eq!(
        receiver.next_lines(1).await,
        vec![rejected("webhook-signature does not match")]
    );
    assert_eq!(post(&url, &[], &body4).await, 401);
    assert_eq!(
        receiver.next_lines(1).await,
        vec![rejected("missing signature headers")]
    );

    // During a rotation each header lists two signatures; the receiver's key is either.
    for order in [[OTHER_SECRET, SECRET], [SECRET, OTHER_SECRET]] {
        let headers = signed("dlv_4", now, &body4, &order);
        assert_eq!(headers[2].1.split(' ').count(), 2);
        assert_eq!(headers[3].1.split(',').count(), 2);
        assert_eq!(post(&url, &headers, &body4).await, 200);
    }
    assert_eq!(
        receiver.next_lines(2).await,
        vec![accepted(&fourth), duplicate(&fourth)]
    );

    // Signed bodies that are not usage batches: 400 for a non-object, 200 and nothing
    // done for an unknown type; neither prints a line (the next line is the next event).
    for (body, status) in [
        (br#"[1, 2]"#.to_vec(), 400),
        (br#"{"type": "SOMETHING_NEW", "data": {}}"#.to_vec(), 200),
        (
            br#"{"type": "API_BILLING_USAGE", "data": {"events": [{}]}}"#.to_vec(),
            400,
        ),
    ] {
        assert_eq!(
            post(&url, &signed("dlv_6", now, &body, &[SECRET]), &body).await,
            status
        );
    }
    let fifth = event("evt_e", "cust-7", None, (7, 8));
    let body5 = tollgate_billing::batch_body([&fifth]).unwrap();
    assert_eq!(
        post(&url, &signed("dlv_7", now, &body5, &[SECRET]), &body5).await,
        200
    );
    assert_eq!(receiver.next_lines(1).await, vec![accepted(&fifth)]);
}

#[tokio::test]
async fn the_python_receiver_verifies_both_signatures_and_counts_each_event_once() {
    verify_known_values(Program::Python).await;
}

#[tokio::test]
async fn the_node_receiver_verifies_both_signatures_and_counts_each_event_once() {
    verify_known_values(Program::Node).await;
}

// --- end to end ------------------------------------------------------------------------

/// A free port on 127.0.0.1, for a receiver that must know its secret before it starts
/// (the secret exists only once the endpoint, which needs the URL, is created).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Serves one chat request with `metadata`; returns once the answer is read in full.
async fn serve(plane: &Plane, metadata: &str) {
    let response = plane
        .call("/v1/chat/completions", &chat_body(false))
        .header("X-Request-Metadata", metadata)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
}

/// The endpoint's deliveries, oldest first.
async fn deliveries(plane: &Plane, hook: &str) -> Vec<Value> {
    let page = ok_json(
        plane
            .server
            .get(&format!("{HOOKS}/{hook}/deliveries"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    page["items"].as_array().unwrap().clone()
}

/// Waits until every delivery of `hook` has left `pending`.
async fn settled(plane: &Plane, hook: &str, count: usize) -> Vec<Value> {
    for _ in 0..200 {
        let list = deliveries(plane, hook).await;
        if list.len() == count && list.iter().all(|d| d["status"] != "pending") {
            return list;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "deliveries of {hook} did not settle: {:?}",
        deliveries(plane, hook).await
    );
}

fn sorted(mut lines: Vec<Value>) -> Vec<Value> {
    lines.sort_by_key(|l| l.to_string());
    lines
}

/// A gateway's delivery worker → the example receiver: every stored event is accepted
/// once; a rotation does not break the receiver that holds the old secret; a manual
/// redelivery is recognised as duplicates; a receiver with another secret refuses, and
/// its delivery becomes a dead letter with the receiver's 401.
async fn deliver_end_to_end(program: Program) {
    let plane = Plane::start("echo?prompt_tokens=10&completion_tokens=5").await;
    let server = &plane.server;
    let port = free_port();
    let hook = create_hook(server, &format!("http://127.0.0.1:{port}/tollgate")).await;
    let hook_id = hook["id"].as_str().unwrap().to_owned();
    let mut receiver = Receiver::start(program, hook["secret"].as_str().unwrap(), port).await;
    // A second endpoint whose receiver holds some other secret.
    let stranger_port = free_port();
    let stranger_hook = create_hook(
        server,
        &format!("http://127.0.0.1:{stranger_port}/tollgate"),
    )
    .await;
    let stranger_id = stranger_hook["id"].as_str().unwrap().to_owned();
    let mut stranger = Receiver::start(program, OTHER_SECRET, stranger_port).await;

    for metadata in [
        r#"{"team": "Équipe 🚀 Δ", "n": 123456789012345678901234567890}"#,
        r#"{"quote": "\"", "backslash": "\\", "empty": ""}"#,
        r#"{}"#,
    ] {
        serve(&plane, metadata).await;
    }
    let stored = all_events(server).await;
    assert_eq!(stored.len(), 3);
    let expected: Vec<Value> = stored.iter().map(accepted).collect();
    assert_eq!(
        sorted(receiver.next_lines(3).await),
        sorted(expected.clone())
    );
    let delivered = settled(&plane, &hook_id, deliveries(&plane, &hook_id).await.len()).await;
    assert!(!delivered.is_empty());
    for delivery in &delivered {
        assert_eq!(
            (
                &delivery["status"],
                &delivery["attempts"],
                &delivery["last_response_status"]
            ),
            (&json!("delivered"), &json!(1), &json!(200)),
            "{delivery}"
        );
    }
    let counted: u64 = delivered
        .iter()
        .map(|d| d["event_count"].as_u64().unwrap())
        .sum();
    assert_eq!(counted, 3);

    // The stranger refused every batch: dead letters carrying its 401.
    let refused = stranger.next_line_within(Duration::from_secs(10)).await;
    assert_eq!(refused, Some(rejected("webhook-signature does not match")));
    let dead = settled(
        &plane,
        &stranger_id,
        deliveries(&plane, &stranger_id).await.len(),
    )
    .await;
    for delivery in &dead {
        assert_eq!(
            (
                &delivery["status"],
                &delivery["attempts"],
                &delivery["last_response_status"]
            ),
            (&json!("failed"), &json!(1), &json!(401)),
            "{delivery}"
        );
    }

    // After a rotation the gateway signs with both secrets for 24 h: the receiver, still
    // on the old one, keeps accepting.
    ok_json(
        server
            .post(&format!("{HOOKS}/{hook_id}/rotate_secret"), &json!({}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    serve(&plane, r#"{"after": "rotation"}"#).await;
    let fourth = all_events(server).await.pop().unwrap();
    assert_eq!(receiver.next_lines(1).await, vec![accepted(&fourth)]);

    // A delivered batch sent again by hand: the same events, recognised as duplicates.
    let first = &delivered[0];
    let retried = ok_json(
        server
            .post(
                &format!(
                    "{HOOKS}/{hook_id}/deliveries/{}/retry",
                    first["id"].as_str().unwrap()
                ),
                &json!({}),
            )
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(retried["status"], "pending");
    let count = usize::try_from(first["event_count"].as_u64().unwrap()).unwrap();
    let again = receiver.next_lines(count).await;
    assert!(
        again.iter().all(|line| line.get("duplicate").is_some()),
        "{again:?}"
    );
    let keys: Vec<&str> = stored.iter().map(|e| e.idempotency_key.as_str()).collect();
    assert!(again
        .iter()
        .all(|line| keys.contains(&line["duplicate"].as_str().unwrap())));
    let total = deliveries(&plane, &hook_id).await.len();
    let after = settled(&plane, &hook_id, total).await;
    let redelivered = after.iter().find(|d| d["id"] == first["id"]).unwrap();
    assert_eq!(
        (&redelivered["status"], &redelivered["attempts"]),
        (&json!("delivered"), &json!(2))
    );
}

#[tokio::test]
async fn the_python_receiver_accepts_what_the_gateway_delivers() {
    deliver_end_to_end(Program::Python).await;
}

#[tokio::test]
async fn the_node_receiver_accepts_what_the_gateway_delivers() {
    deliver_end_to_end(Program::Node).await;
}
