//! Webhook endpoints (SPEC §3): create with a secret shown once, list, get, delete,
//! secret rotation with a 24-hour overlap, deliveries and manual retry, URL rules
//! (CASES bad input: not http(s), private ranges), other workspaces' endpoints.

use std::sync::Arc;

use base64::Engine as _;
use serde_json::{json, Value};
use tollgate_core::clock::ManualClock;
use tollgate_core::secretbox::SecretBox;
use tollgate_core::{Clock, Timestamp};
use tollgate_store::{DeliveryStatus, NewWebhookDelivery, WebhookAttempt};

use crate::admin_misc::{expect_error, expect_error_prefix, other_workspace, with_key};
use crate::support::{ok_json, status_json, TestServer};

pub const HOOKS: &str = "/v1/gateway/webhook_endpoints";
const DAY_MS: i64 = 86_400_000;

fn t0() -> Timestamp {
    Timestamp::parse_rfc3339("2026-12-03T17:53:24.123Z").unwrap()
}

async fn clocked() -> (TestServer, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(t0()));
    (TestServer::start_with_clock(clock.clone()).await, clock)
}

/// Creates a webhook endpoint; panics unless the answer is 200.
pub async fn create_hook(server: &TestServer, url: &str) -> Value {
    ok_json(
        server
            .post(HOOKS, &json!({"url": url, "description": "billing"}))
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// The signing secrets the store holds for `id` at `at`, opened, newest first.
async fn live_secrets(server: &TestServer, id: &str, at: Timestamp) -> Vec<String> {
    let sealer = SecretBox::new(&[42; 32]);
    server
        .store
        .webhook_secrets(id, at)
        .await
        .unwrap()
        .iter()
        .map(|s| String::from_utf8(sealer.open(&s.ciphertext).unwrap()).unwrap())
        .collect()
}

fn assert_whsec(secret: &Value) {
    let text = secret.as_str().unwrap();
    let key = base64::engine::general_purpose::STANDARD
        .decode(text.strip_prefix("whsec_").unwrap())
        .unwrap();
    assert_eq!(key.len(), 32, "{text}");
    assert_eq!(text.len(), 6 + 44);
}

#[tokio::test]
async fn an_endpoint_is_created_with_its_secret_shown_only_once() {
    let (server, _clock) = clocked().await;
    let url = "https://billing.example.com/hooks/tollgate?code=abc";
    let created = ok_json(
        server
            .post(
                HOOKS,
                &json!({"url": url, "description": "Invoices — Équipe 🚀"}),
            )
            .send()
            .await
            .unwrap(),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("wh_") && id.len() == 25, "{id}");
    assert_whsec(&created["secret"]);
    assert_eq!(
        created,
        json!({
            "id": id,
            "url": url,
            "description": "Invoices — Équipe 🚀",
            "secret": created["secret"],
            "created_at": "2026-12-03T17:53:24.123Z",
        })
    );
    let shown = json!({
        "id": id,
        "url": url,
        "description": "Invoices — Équipe 🚀",
        "created_at": "2026-12-03T17:53:24.123Z",
    });
    let read = ok_json(server.get(&format!("{HOOKS}/{id}")).send().await.unwrap()).await;
    assert_eq!(read, shown);
    let listed = ok_json(server.get(HOOKS).send().await.unwrap()).await;
    assert_eq!(
        listed,
        json!({"items": [shown], "pagination": {"has_more": false, "cursor": null}})
    );

    // At rest the secret is sealed with the master key.
    assert_eq!(
        live_secrets(&server, &id, t0()).await,
        vec![created["secret"].as_str().unwrap().to_owned()]
    );
    let stored = server.store.webhook_secrets(&id, t0()).await.unwrap();
    let plain = created["secret"].as_str().unwrap().as_bytes();
    assert!(!stored[0]
        .ciphertext
        .windows(plain.len())
        .any(|w| w == plain));

    // The description is optional; absent and null both mean none.
    for body in [
        json!({"url": "https://a.example.com/h"}),
        json!({"url": "https://b.example.com/h", "description": null}),
    ] {
        let created = ok_json(server.post(HOOKS, &body).send().await.unwrap()).await;
        assert_eq!(created["description"], Value::Null);
        assert_whsec(&created["secret"]);
    }
    let listed = ok_json(server.get(HOOKS).send().await.unwrap()).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn webhook_urls_must_be_http_and_must_not_reach_private_networks() {
    let server = TestServer::start_with(|c| c.allow_private_networks = false).await;
    let private = |ip: &str| {
        format!(
            "url: resolves to a loopback, private or link-local address ({ip}); \
             set TOLLGATE_ALLOW_PRIVATE_NETWORKS=true to allow it"
        )
    };
    let long = format!("https://8.8.8.8/{}", "a".repeat(2048));
    let cases: Vec<(&str, &str, String)> = vec![
        (
            "ftp://example.com/hook",
            "invalid_payload",
            "url: must use http or https".into(),
        ),
        (
            "file:///etc/passwd",
            "invalid_payload",
            "url: must use http or https".into(),
        ),
        (
            "javascript:alert(1)",
            "invalid_payload",
            "url: must use http or https".into(),
        ),
        (
            "http://127.0.0.1:9000/hook",
            "private_network_url",
            private("127.0.0.1"),
        ),
        (
            "http://10.0.0.7/hook",
            "private_network_url",
            private("10.0.0.7"),
        ),
        (
            "http://192.168.1.1/",
            "private_network_url",
            private("192.168.1.1"),
        ),
        (
            "http://169.254.169.254/latest/meta-data",
            "private_network_url",
            private("169.254.169.254"),
        ),
        (
            "http://[::1]:8080/hook",
            "private_network_url",
            private("::1"),
        ),
        (
            "http://[fd00::1]/hook",
            "private_network_url",
            private("fd00::1"),
        ),
        (
            "http://0.0.0.0/hook",
            "private_network_url",
            private("0.0.0.0"),
        ),
        (
            "https://no-such-host.invalid/hook",
            "unresolvable_host",
            "url: host 'no-such-host.invalid' could not be resolved".into(),
        ),
        (
            "https://user:pw@8.8.8.8/hook",
            "invalid_payload",
            "url: must not carry credentials".into(),
        ),
        (
            "https://8.8.8.8/hook#part",
            "invalid_payload",
            "url: must not have a fragment".into(),
        ),
        (
            "https://8.8.8.8/a b",
            "invalid_payload",
            "url: must not contain spaces or control characters".into(),
        ),
        (
            "https://8.8.8.8/a\nb",
            "invalid_payload",
            "url: must not contain spaces or control characters".into(),
        ),
        (
            long.as_str(),
            "invalid_payload",
            "url: must be at most 2048 bytes".into(),
        ),
    ];
    for (url, code, message) in &cases {
        expect_error(
            server
                .post(HOOKS, &json!({"url": url}))
                .send()
                .await
                .unwrap(),
            400,
            code,
            message,
        )
        .await;
    }
    expect_error_prefix(
        server
            .post(HOOKS, &json!({"url": "not a url"}))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_payload",
        "url: must not contain spaces",
    )
    .await;
    expect_error_prefix(
        server
            .post(HOOKS, &json!({"url": "example.com/hook"}))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_payload",
        "url: not a valid URL (",
    )
    .await;
    // A name resolving to loopback is refused like the literal.
    expect_error_prefix(
        server
            .post(HOOKS, &json!({"url": "http://localhost:9000/hook"}))
            .send()
            .await
            .unwrap(),
        400,
        "private_network_url",
        "url: resolves to a loopback, private or link-local address (",
    )
    .await;
    let listed = ok_json(server.get(HOOKS).send().await.unwrap()).await;
    assert_eq!(listed["items"], json!([]));

    // A public address is accepted, its query string kept.
    let created = create_hook(&server, "https://8.8.8.8/hook?code=abc").await;
    assert_eq!(created["url"], "https://8.8.8.8/hook?code=abc");

    // With private networks allowed (tests, the demo) loopback is fine; shapes are still
    // checked.
    let open = TestServer::start().await;
    create_hook(&open, "http://127.0.0.1:9/hook").await;
    expect_error(
        open.post(HOOKS, &json!({"url": "ftp://127.0.0.1/hook"}))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_payload",
        "url: must use http or https",
    )
    .await;
}

#[tokio::test]
async fn descriptions_and_payloads_are_checked() {
    let server = TestServer::start().await;
    let url = "http://127.0.0.1:9/hook";
    let longest = "é".repeat(1000);
    let created = ok_json(
        server
            .post(HOOKS, &json!({"url": url, "description": longest}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(created["description"], longest.as_str());
    let empty = ok_json(
        server
            .post(HOOKS, &json!({"url": url, "description": ""}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(empty["description"], "");
    for (body, code, message) in [
        (
            json!({"url": url, "description": "é".repeat(1001)}),
            "invalid_payload",
            "description: must be at most 1000 characters",
        ),
        (
            json!({"url": url, "description": "line\nbreak"}),
            "invalid_payload",
            "description: must not contain control characters (CR, LF, tab, ...)",
        ),
        (
            json!({"description": "x"}),
            "invalid_payload",
            "body: missing field `url`",
        ),
    ] {
        expect_error(
            server.post(HOOKS, &body).send().await.unwrap(),
            400,
            code,
            message,
        )
        .await;
    }
    for (body, prefix) in [
        (
            json!({"url": url, "description": 5}),
            "description: invalid type: integer `5`",
        ),
        (json!({"url": null}), "url: invalid type: null"),
        (
            json!({"url": url, "secret": "whsec_mine"}),
            "secret: unknown field `secret`",
        ),
        (json!([url]), "body: invalid type: sequence"),
    ] {
        expect_error_prefix(
            server.post(HOOKS, &body).send().await.unwrap(),
            400,
            "invalid_payload",
            prefix,
        )
        .await;
    }
    let malformed = server
        .http
        .post(server.url(HOOKS))
        .header("Authorization", format!("Api-Key {}", server.admin_key))
        .body("{\"url\": ")
        .send()
        .await
        .unwrap();
    let (status, body) = status_json(malformed).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("invalid_json")));
    expect_error(
        server
            .post(&format!("{HOOKS}?verbose=1"), &json!({"url": url}))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_query",
        "verbose: unknown query parameter (this route accepts none)",
    )
    .await;
    let listed = ok_json(server.get(HOOKS).send().await.unwrap()).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn rotation_keeps_the_replaced_secret_signing_for_24_hours() {
    let (server, clock) = clocked().await;
    let created = create_hook(&server, "http://127.0.0.1:9/hook").await;
    let id = created["id"].as_str().unwrap();
    let first = created["secret"].as_str().unwrap().to_owned();
    let rotate = format!("{HOOKS}/{id}/rotate_secret");

    // No body, or an empty object.
    let rotated = ok_json(
        server
            .http
            .post(server.url(&rotate))
            .header("Authorization", format!("Api-Key {}", server.admin_key))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_whsec(&rotated["secret"]);
    let second = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(second, first);
    assert_eq!(rotated, json!({"id": id, "secret": second}));
    // The endpoint never shows a secret.
    let read = ok_json(server.get(&format!("{HOOKS}/{id}")).send().await.unwrap()).await;
    assert_eq!(read.get("secret"), None);

    // Both sign until exactly 24 hours after the rotation, newest first.
    let both = vec![second.clone(), first.clone()];
    assert_eq!(live_secrets(&server, id, t0()).await, both);
    assert_eq!(
        live_secrets(&server, id, Timestamp(t0().0 + DAY_MS - 1)).await,
        both
    );
    assert_eq!(
        live_secrets(&server, id, Timestamp(t0().0 + DAY_MS)).await,
        vec![second.clone()]
    );

    // A second rotation an hour later: three secrets sign, each until its own deadline.
    clock.advance_millis(3_600_000);
    let third = ok_json(server.post(&rotate, &json!({})).send().await.unwrap()).await["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        live_secrets(&server, id, clock.now()).await,
        vec![third.clone(), second.clone(), first.clone()]
    );
    assert_eq!(
        live_secrets(&server, id, Timestamp(t0().0 + DAY_MS)).await,
        vec![third.clone(), second.clone()]
    );
    assert_eq!(
        live_secrets(&server, id, Timestamp(t0().0 + DAY_MS + 3_600_000)).await,
        vec![third.clone()]
    );

    expect_error_prefix(
        server
            .post(&rotate, &json!({"secret": "whsec_mine"}))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_payload",
        "secret: unknown field `secret`",
    )
    .await;
    assert_eq!(live_secrets(&server, id, clock.now()).await.len(), 3);
}

#[tokio::test]
async fn deleted_and_unknown_endpoints_are_404_everywhere() {
    let server = TestServer::start().await;
    let created = create_hook(&server, "http://127.0.0.1:9/hook").await;
    let id = created["id"].as_str().unwrap();
    let removed = ok_json(
        server
            .delete(&format!("{HOOKS}/{id}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(removed, json!({"id": id}));
    for target in [id, "wh_doesnotexist"] {
        let message = "Webhook endpoint not found";
        expect_error(
            server
                .get(&format!("{HOOKS}/{target}"))
                .send()
                .await
                .unwrap(),
            404,
            "not_found",
            message,
        )
        .await;
        expect_error(
            server
                .delete(&format!("{HOOKS}/{target}"))
                .send()
                .await
                .unwrap(),
            404,
            "not_found",
            message,
        )
        .await;
        expect_error(
            server
                .post(&format!("{HOOKS}/{target}/rotate_secret"), &json!({}))
                .send()
                .await
                .unwrap(),
            404,
            "not_found",
            message,
        )
        .await;
        expect_error(
            server
                .get(&format!("{HOOKS}/{target}/deliveries"))
                .send()
                .await
                .unwrap(),
            404,
            "not_found",
            message,
        )
        .await;
        expect_error(
            server
                .post(
                    &format!("{HOOKS}/{target}/deliveries/dlv_x/retry"),
                    &json!({}),
                )
                .send()
                .await
                .unwrap(),
            404,
            "not_found",
            message,
        )
        .await;
    }
    let listed = ok_json(server.get(HOOKS).send().await.unwrap()).await;
    assert_eq!(listed["items"], json!([]));
}

#[tokio::test]
async fn another_workspaces_endpoint_is_403() {
    let server = TestServer::start().await;
    let other = other_workspace(&server, "acme").await;
    let theirs = ok_json(
        with_key(&server, reqwest::Method::POST, HOOKS, &other)
            .json(&json!({"url": "http://127.0.0.1:9/theirs"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let id = theirs["id"].as_str().unwrap();
    let message = "Webhook endpoint belongs to another workspace";
    for (method, path) in [
        (reqwest::Method::GET, format!("{HOOKS}/{id}")),
        (reqwest::Method::DELETE, format!("{HOOKS}/{id}")),
        (reqwest::Method::POST, format!("{HOOKS}/{id}/rotate_secret")),
        (reqwest::Method::GET, format!("{HOOKS}/{id}/deliveries")),
        (
            reqwest::Method::POST,
            format!("{HOOKS}/{id}/deliveries/dlv_x/retry"),
        ),
    ] {
        expect_error(
            with_key(&server, method.clone(), &path, &server.admin_key)
                .send()
                .await
                .unwrap(),
            403,
            "forbidden",
            message,
        )
        .await;
    }
    let mine = ok_json(server.get(HOOKS).send().await.unwrap()).await;
    assert_eq!(mine["items"], json!([]));
    let listed = ok_json(
        with_key(&server, reqwest::Method::GET, HOOKS, &other)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    // Nothing was rotated or deleted by the refused calls.
    assert_eq!(
        live_secrets(&server, id, tollgate_core::SystemClock.now()).await,
        vec![theirs["secret"].as_str().unwrap().to_owned()]
    );
}

#[tokio::test]
async fn view_keys_read_endpoints_and_deliveries_but_change_nothing() {
    let server = TestServer::start().await;
    let created = create_hook(&server, "http://127.0.0.1:9/hook").await;
    let id = created["id"].as_str().unwrap();
    let view = ok_json(
        server
            .post(
                "/v1/gateway/management_keys",
                &json!({"name": "dashboard", "scope": "view"}),
            )
            .send()
            .await
            .unwrap(),
    )
    .await["key"]
        .as_str()
        .unwrap()
        .to_owned();
    for path in [
        HOOKS.to_owned(),
        format!("{HOOKS}/{id}"),
        format!("{HOOKS}/{id}/deliveries"),
    ] {
        let response = with_key(&server, reqwest::Method::GET, &path, &view)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    for (method, path) in [
        (reqwest::Method::POST, HOOKS.to_owned()),
        (reqwest::Method::DELETE, format!("{HOOKS}/{id}")),
        (reqwest::Method::POST, format!("{HOOKS}/{id}/rotate_secret")),
        (
            reqwest::Method::POST,
            format!("{HOOKS}/{id}/deliveries/dlv_x/retry"),
        ),
    ] {
        expect_error(
            with_key(&server, method, &path, &view)
                .json(&json!({"url": "http://127.0.0.1:9/h"}))
                .send()
                .await
                .unwrap(),
            403,
            "insufficient_scope",
            "This management key has the view scope, which allows GET requests only",
        )
        .await;
    }
    let listed = ok_json(server.get(HOOKS).send().await.unwrap()).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
}

/// A delivery cut straight into the store, due far in the future so no worker sends it
/// before the test says so.
async fn cut(server: &TestServer, webhook_id: &str, id: &str, events: u32) {
    let endpoint = server
        .store
        .webhook_endpoint(webhook_id)
        .await
        .unwrap()
        .unwrap();
    let cut = server
        .store
        .cut_webhook_batch(
            NewWebhookDelivery {
                id: id.to_owned(),
                webhook_id: webhook_id.to_owned(),
                body: br#"{"type":"API_BILLING_USAGE","data":{"events":[]}}"#.to_vec(),
                event_count: events,
                first_event_seq: endpoint.cursor + 1,
                last_event_seq: endpoint.cursor + i64::from(events),
                created_at: t0(),
                next_attempt_at: Timestamp(t0().0 + 10 * DAY_MS),
            },
            endpoint.cursor,
        )
        .await
        .unwrap();
    assert!(cut);
}

#[tokio::test]
async fn deliveries_are_listed_in_order_and_any_of_them_can_be_retried() {
    let (server, clock) = clocked().await;
    let hook = create_hook(&server, "http://127.0.0.1:9/hook").await;
    let id = hook["id"].as_str().unwrap();
    let other_hook = create_hook(&server, "http://127.0.0.1:9/other").await;
    let other_id = other_hook["id"].as_str().unwrap();
    cut(&server, id, "dlv_first", 2).await;
    cut(&server, id, "dlv_second", 100).await;
    cut(&server, id, "dlv_third", 1).await;
    cut(&server, other_id, "dlv_elsewhere", 1).await;

    // A dead letter (a terminal 400) and a delivered one.
    let attempt = |status, http: u16, error: Option<&str>| WebhookAttempt {
        at: Timestamp(t0().0 + 1_000),
        http_status: Some(http),
        error: error.map(str::to_owned),
        status,
        next_attempt_at: None,
    };
    let store = &server.store;
    store
        .record_webhook_attempt(
            "dlv_first",
            attempt(DeliveryStatus::Failed, 400, Some("receiver answered 400")),
        )
        .await
        .unwrap()
        .unwrap();
    store
        .record_webhook_attempt("dlv_second", attempt(DeliveryStatus::Delivered, 200, None))
        .await
        .unwrap()
        .unwrap();

    let path = format!("{HOOKS}/{id}/deliveries");
    let first_page = ok_json(server.get(&format!("{path}?limit=2")).send().await.unwrap()).await;
    assert_eq!(
        first_page["items"],
        json!([
            {
                "id": "dlv_first", "status": "failed", "attempts": 1, "event_count": 2,
                "created_at": "2026-12-03T17:53:24.123Z",
                "last_attempt_at": "2026-12-03T17:53:25.123Z", "next_attempt_at": null,
                "last_response_status": 400, "last_error": "receiver answered 400",
            },
            {
                "id": "dlv_second", "status": "delivered", "attempts": 1, "event_count": 100,
                "created_at": "2026-12-03T17:53:24.123Z",
                "last_attempt_at": "2026-12-03T17:53:25.123Z", "next_attempt_at": null,
                "last_response_status": 200, "last_error": null,
            },
        ])
    );
    assert_eq!(first_page["pagination"]["has_more"], true);
    let cursor = first_page["pagination"]["cursor"].as_str().unwrap();
    let second_page = ok_json(
        server
            .get(&format!("{path}?limit=2&cursor={cursor}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        second_page,
        json!({
            "items": [{
                "id": "dlv_third", "status": "pending", "attempts": 0, "event_count": 1,
                "created_at": "2026-12-03T17:53:24.123Z", "last_attempt_at": null,
                "next_attempt_at": "2026-12-13T17:53:24.123Z",
                "last_response_status": null, "last_error": null,
            }],
            "pagination": {"has_more": false, "cursor": null},
        })
    );
    // Each endpoint's deliveries are their own list.
    expect_error(
        server
            .get(&format!("{HOOKS}/{other_id}/deliveries?cursor={cursor}"))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_cursor",
        "cursor: belongs to another list",
    )
    .await;
    expect_error(
        server
            .get(&format!("{path}?status=failed"))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_query",
        "status: unknown query parameter (accepted: limit, cursor)",
    )
    .await;

    // Retrying the dead letter: pending again, due now, its history kept.
    clock.set(Timestamp(t0().0 + 60_000));
    let retried = ok_json(
        server
            .post(&format!("{path}/dlv_first/retry"), &json!({}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        retried,
        json!({
            "id": "dlv_first", "status": "pending", "attempts": 1, "event_count": 2,
            "created_at": "2026-12-03T17:53:24.123Z",
            "last_attempt_at": "2026-12-03T17:53:25.123Z",
            "next_attempt_at": "2026-12-03T17:54:24.123Z",
            "last_response_status": 400, "last_error": "receiver answered 400",
        })
    );
    // A delivered one may be sent again too (a receiver that lost it); same id, same body.
    let again = ok_json(
        server
            .post(&format!("{path}/dlv_second/retry"), &json!({}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(again["status"], "pending");
    assert_eq!(again["next_attempt_at"], "2026-12-03T17:54:24.123Z");
    let stored = store.webhook_delivery("dlv_second").await.unwrap().unwrap();
    assert_eq!(
        stored.body,
        br#"{"type":"API_BILLING_USAGE","data":{"events":[]}}"#
    );
    // The reset starts the schedule over. The delivery worker runs in this server too and
    // may already have tried the now-due delivery once (its receiver refuses connections),
    // so the stored state is either "reset, not tried yet" or "reset, tried once, failed".
    assert!(
        matches!((stored.attempts, stored.retry_step), (1, 0) | (2, 1)),
        "attempts {} retry_step {}",
        stored.attempts,
        stored.retry_step
    );

    // Unknown ids, and another endpoint's delivery through this endpoint, are 404.
    for delivery in ["dlv_nope", "dlv_elsewhere"] {
        expect_error(
            server
                .post(&format!("{path}/{delivery}/retry"), &json!({}))
                .send()
                .await
                .unwrap(),
            404,
            "not_found",
            "Delivery not found",
        )
        .await;
    }
    let untouched = store
        .webhook_delivery("dlv_elsewhere")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        untouched.next_attempt_at,
        Some(Timestamp(t0().0 + 10 * DAY_MS))
    );
}
