//! Management API conventions (SPEC §1.1): authentication and scopes, the error shape,
//! strict bodies and query strings, paging, management keys, secrets and the signing key.
//! Also the helpers the other `admin_*` files share.

use reqwest::RequestBuilder;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tollgate_core::keys::mint_management_key;
use tollgate_core::{Clock, SystemClock};
use tollgate_store::{NewManagementKey, Scope};

use crate::support::{ok_json, status_json, TestServer};

/// Asserts an error answer: status, `code` and the exact `error` message.
pub async fn expect_error(response: reqwest::Response, status: u16, code: &str, message: &str) {
    let (got, body) = status_json(response).await;
    assert_eq!(
        (got, body["code"].as_str(), body["error"].as_str()),
        (status, Some(code), Some(message)),
        "body: {body}"
    );
    assert_eq!(body.as_object().map(|o| o.len()), Some(2), "body: {body}");
}

/// Asserts an error answer whose message starts with `prefix` (serde's wording after
/// the field path is not ours to pin).
pub async fn expect_error_prefix(
    response: reqwest::Response,
    status: u16,
    code: &str,
    prefix: &str,
) {
    let (got, body) = status_json(response).await;
    assert_eq!(
        (got, body["code"].as_str()),
        (status, Some(code)),
        "body: {body}"
    );
    let message = body["error"].as_str().unwrap_or_default();
    assert!(
        message.starts_with(prefix),
        "message {message:?} should start with {prefix:?}"
    );
}

/// A request authenticated with `key` instead of the default admin key.
pub fn with_key(
    server: &TestServer,
    method: reqwest::Method,
    path: &str,
    key: &str,
) -> RequestBuilder {
    server
        .http
        .request(method, server.url(path))
        .header("Authorization", format!("Api-Key {key}"))
}

/// A second workspace with a `manage` key; returns the full key.
pub async fn other_workspace(server: &TestServer, name: &str) -> String {
    let now = SystemClock.now();
    let workspace = server.store.create_workspace(name, now).await.unwrap();
    let minted = mint_management_key();
    server
        .store
        .insert_management_key(NewManagementKey {
            workspace_id: workspace.id,
            prefix: minted.prefix,
            hash: minted.hash.to_vec(),
            name: Some("other".into()),
            scope: Scope::Manage,
            created_at: now,
        })
        .await
        .unwrap();
    minted.full
}

/// True for `2026-12-03T17:53:24.123Z`-shaped timestamps.
pub fn is_rfc3339_utc(value: &Value) -> bool {
    value.as_str().is_some_and(|s| {
        s.len() == 24 && s.ends_with('Z') && tollgate_core::Timestamp::parse_rfc3339(s).is_some()
    })
}

// --- authentication -------------------------------------------------------------------

#[tokio::test]
async fn missing_malformed_and_unknown_keys_are_401() {
    let server = TestServer::start().await;
    let url = server.url("/v1/gateway/groups");
    expect_error(
        server.http.get(&url).send().await.unwrap(),
        401,
        "unauthorized",
        "Missing Authorization header; send `Authorization: Api-Key <management key>`",
    )
    .await;
    expect_error(
        server.http.get(&url).header("Authorization", "Basic abc").send().await.unwrap(),
        401,
        "unauthorized",
        "Malformed Authorization header; send `Api-Key <management key>` or `Bearer <management key>`",
    )
    .await;
    // Two Authorization headers, even with a valid key first: which one counts would
    // depend on who reads them, so neither does.
    expect_error(
        server
            .http
            .get(&url)
            .header("Authorization", format!("Api-Key {}", server.admin_key))
            .header("Authorization", "Api-Key tgm_someoneelse.xyz")
            .send()
            .await
            .unwrap(),
        401,
        "unauthorized",
        "Send exactly one Authorization header.",
    )
    .await;
    for key in [
        "short",
        "tgm_unknownprefix.abc",
        &format!("{}x", server.admin_key),
    ] {
        expect_error(
            with_key(&server, reqwest::Method::GET, "/v1/gateway/groups", key)
                .send()
                .await
                .unwrap(),
            401,
            "unauthorized",
            "Invalid management key",
        )
        .await;
    }
}

#[tokio::test]
async fn bearer_and_api_key_schemes_are_both_accepted() {
    let server = TestServer::start().await;
    let url = server.url("/v1/gateway/groups");
    let bearer = server
        .http
        .get(&url)
        .bearer_auth(&server.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), 200);
    let api_key = server
        .http
        .get(&url)
        .header("Authorization", format!("api-key {}", server.admin_key))
        .send()
        .await
        .unwrap();
    assert_eq!(api_key.status(), 200);
}

#[tokio::test]
async fn view_scope_reads_but_cannot_write() {
    let server = TestServer::start().await;
    let created = ok_json(
        server
            .post(
                "/v1/gateway/management_keys",
                &json!({"name": "dashboard", "scope": "view"}),
            )
            .send()
            .await
            .unwrap(),
    )
    .await;
    let view_key = created["key"].as_str().unwrap();
    let listed = with_key(
        &server,
        reqwest::Method::GET,
        "/v1/gateway/groups",
        view_key,
    )
    .send()
    .await
    .unwrap();
    assert_eq!(listed.status(), 200);
    let scope_message = "This management key has the view scope, which allows GET requests only";
    expect_error(
        with_key(
            &server,
            reqwest::Method::POST,
            "/v1/gateway/secrets",
            view_key,
        )
        .json(&json!({"name": "s", "value": "v"}))
        .send()
        .await
        .unwrap(),
        403,
        "insufficient_scope",
        scope_message,
    )
    .await;
    let prefix = created["prefix"].as_str().unwrap();
    expect_error(
        with_key(
            &server,
            reqwest::Method::DELETE,
            &format!("/v1/gateway/management_keys/{prefix}"),
            view_key,
        )
        .send()
        .await
        .unwrap(),
        403,
        "insufficient_scope",
        scope_message,
    )
    .await;
    expect_error(
        with_key(
            &server,
            reqwest::Method::PUT,
            "/v1/gateway/signing_key",
            view_key,
        )
        .json(&json!({"public_key": "AAAA"}))
        .send()
        .await
        .unwrap(),
        403,
        "insufficient_scope",
        scope_message,
    )
    .await;
}

#[tokio::test]
async fn a_disabled_workspace_is_403_until_enabled_again() {
    let server = TestServer::start().await;
    assert!(server
        .store
        .set_workspace_enabled("default", false)
        .await
        .unwrap());
    expect_error(
        server.get("/v1/gateway/groups").send().await.unwrap(),
        403,
        "workspace_disabled",
        "This workspace is not enabled for the gateway",
    )
    .await;
    assert!(server
        .store
        .set_workspace_enabled("default", true)
        .await
        .unwrap());
    assert_eq!(
        server
            .get("/v1/gateway/groups")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

// --- routes and bodies ----------------------------------------------------------------

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let server = TestServer::start().await;
    for path in [
        "/v1/gateway/nope",
        "/v1/gateway/groups/x/y/z",
        "/v1/gateway",
    ] {
        let (status, body) = status_json(server.get(path).send().await.unwrap()).await;
        assert_eq!(status, 404, "{path}");
        assert_eq!(body["code"], "not_found", "{path}: {body}");
    }
    expect_error(
        server
            .authed_put("/v1/gateway/groups")
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
        405,
        "method_not_allowed",
        "This route does not support this HTTP method",
    )
    .await;
}

trait Put {
    fn authed_put(&self, path: &str) -> RequestBuilder;
}

impl Put for TestServer {
    fn authed_put(&self, path: &str) -> RequestBuilder {
        with_key(self, reqwest::Method::PUT, path, &self.admin_key)
    }
}

#[tokio::test]
async fn bodies_are_parsed_strictly_whatever_the_content_type() {
    let server = TestServer::start().await;
    let url = server.url("/v1/gateway/secrets");
    let send = |body: Vec<u8>| {
        server
            .http
            .post(&url)
            .header("Authorization", format!("Api-Key {}", server.admin_key))
            .body(body)
            .send()
    };
    // No Content-Type at all: still JSON.
    let ok = send(br#"{"name": "plain", "value": "v"}"#.to_vec())
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    expect_error_prefix(
        send(b"{\"name\": ".to_vec()).await.unwrap(),
        400,
        "invalid_json",
        "Malformed JSON: ",
    )
    .await;
    expect_error(
        send(b"{\"name\": \"\xff\xfe\", \"value\": \"v\"}".to_vec())
            .await
            .unwrap(),
        400,
        "invalid_json",
        "Request body is not valid UTF-8",
    )
    .await;
    expect_error(
        send(Vec::new()).await.unwrap(),
        400,
        "invalid_json",
        "Request body is empty; a JSON object is required",
    )
    .await;
    expect_error_prefix(
        send(br#"{"name": "a", "value": "v", "colour": 1}"#.to_vec())
            .await
            .unwrap(),
        400,
        "invalid_payload",
        "colour: unknown field `colour`",
    )
    .await;
    expect_error(
        send(br#"{"name": 7, "value": "v"}"#.to_vec())
            .await
            .unwrap(),
        400,
        "invalid_payload",
        "name: invalid type: integer `7`, expected a string",
    )
    .await;
    expect_error(
        send(br#"{"value": "v"}"#.to_vec()).await.unwrap(),
        400,
        "invalid_payload",
        "body: missing field `name`",
    )
    .await;
    expect_error(
        send(br#"[1, 2]"#.to_vec()).await.unwrap(),
        400,
        "invalid_payload",
        "body: invalid type: sequence, expected a JSON object",
    )
    .await;
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let server = TestServer::start().await;
    let value = "v".repeat(1024 * 1024);
    expect_error(
        server
            .post(
                "/v1/gateway/secrets",
                &json!({"name": "big", "value": value}),
            )
            .send()
            .await
            .unwrap(),
        413,
        "payload_too_large",
        "Request body is too large",
    )
    .await;
}

#[tokio::test]
async fn undecodable_path_ids_are_404() {
    let server = TestServer::start().await;
    for path in ["/v1/gateway/groups/%FF%FE", "/v1/gateway/endpoints/%C3%28"] {
        expect_error(
            server.get(path).send().await.unwrap(),
            404,
            "not_found",
            "Object not found",
        )
        .await;
    }
}

// --- query strings and paging ---------------------------------------------------------

#[tokio::test]
async fn list_query_parameters_are_checked() {
    let server = TestServer::start().await;
    for limit in ["0", "1001", "-1", "ten", "2.5"] {
        expect_error(
            server
                .get(&format!("/v1/gateway/secrets?limit={limit}"))
                .send()
                .await
                .unwrap(),
            400,
            "invalid_query",
            "limit: must be an integer in 1..=1000",
        )
        .await;
    }
    assert_eq!(
        server
            .get("/v1/gateway/secrets?limit=1000")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    for cursor in ["garbage!", "AAAA", "bm90IGEgY3Vyc29y"] {
        expect_error(
            server
                .get(&format!("/v1/gateway/secrets?cursor={cursor}"))
                .send()
                .await
                .unwrap(),
            400,
            "invalid_cursor",
            "cursor: malformed cursor",
        )
        .await;
    }
    expect_error(
        server
            .get("/v1/gateway/secrets?page=2")
            .send()
            .await
            .unwrap(),
        400,
        "invalid_query",
        "page: unknown query parameter (accepted: limit, cursor)",
    )
    .await;
    expect_error(
        server
            .get("/v1/gateway/signing_key?verbose=1")
            .send()
            .await
            .unwrap(),
        400,
        "invalid_query",
        "verbose: unknown query parameter (this route accepts none)",
    )
    .await;
}

async fn create_secret(server: &TestServer, name: &str) -> String {
    let created = ok_json(
        server
            .post(
                "/v1/gateway/secrets",
                &json!({"name": name, "value": "sk-upstream"}),
            )
            .send()
            .await
            .unwrap(),
    )
    .await;
    created["id"].as_str().unwrap().to_owned()
}

/// Keyset paging: rows inserted and deleted during a walk never cause a duplicate, and
/// every row that existed for the whole walk is seen exactly once.
#[tokio::test]
async fn paging_is_stable_while_rows_change() {
    let server = TestServer::start().await;
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(create_secret(&server, &format!("s{i}")).await);
    }
    let mut seen: Vec<String> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/gateway/secrets?limit=3&cursor={c}"),
            None => "/v1/gateway/secrets?limit=3".to_owned(),
        };
        let page = ok_json(server.get(&path).send().await.unwrap()).await;
        pages += 1;
        for item in page["items"].as_array().unwrap() {
            seen.push(item["id"].as_str().unwrap().to_owned());
        }
        if pages == 1 {
            // Mid-walk: delete one seen and one unseen row, add two new ones.
            for id in [&ids[1], &ids[6]] {
                ok_json(
                    server
                        .delete(&format!("/v1/gateway/secrets/{id}"))
                        .send()
                        .await
                        .unwrap(),
                )
                .await;
            }
            ids.push(create_secret(&server, "late-1").await);
            ids.push(create_secret(&server, "late-2").await);
        }
        let has_more = page["pagination"]["has_more"].as_bool().unwrap();
        cursor = page["pagination"]["cursor"].as_str().map(str::to_owned);
        assert_eq!(has_more, cursor.is_some(), "{page}");
        if !has_more {
            break;
        }
    }
    let expected: Vec<String> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 6)
        .map(|(_, id)| id.clone())
        .collect();
    assert_eq!(seen, expected);
    assert_eq!(pages, 4);
}

/// A cursor is only good on the list that issued it: on another list it would silently
/// skip that list's first rows.
#[tokio::test]
async fn cursors_only_work_on_the_list_that_issued_them() {
    let server = TestServer::start().await;
    for name in ["a", "b"] {
        create_secret(&server, name).await;
        server.create_endpoint(&format!("acme/{name}"), "m").await;
    }
    let mut groups = Vec::new();
    for ext in ["g1", "g2"] {
        let group = server
            .group(ext, "INDEPENDENT", None, json!([{"slug": "acme/a"}]))
            .await;
        server.create_key(&group).await;
        server.create_key(&group).await;
        groups.push(group);
    }
    let cursor_of = |path: String| {
        let server = &server;
        async move {
            let page = ok_json(server.get(&path).send().await.unwrap()).await;
            page["pagination"]["cursor"].as_str().unwrap().to_owned()
        }
    };
    let secrets = cursor_of("/v1/gateway/secrets?limit=1".into()).await;
    let g1_keys = cursor_of(format!("/v1/gateway/groups/{}/api_keys?limit=1", groups[0])).await;
    for (path, cursor) in [
        ("/v1/gateway/endpoints".to_owned(), &secrets),
        ("/v1/gateway/groups".to_owned(), &secrets),
        ("/v1/gateway/management_keys".to_owned(), &secrets),
        (
            format!("/v1/gateway/groups/{}/api_keys", groups[0]),
            &secrets,
        ),
        (
            format!("/v1/gateway/groups/{}/api_keys", groups[1]),
            &g1_keys,
        ),
    ] {
        expect_error(
            server
                .get(&format!("{path}?cursor={cursor}"))
                .send()
                .await
                .unwrap(),
            400,
            "invalid_cursor",
            "cursor: belongs to another list",
        )
        .await;
    }
    let next = ok_json(
        server
            .get(&format!("/v1/gateway/secrets?limit=1&cursor={secrets}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(next["items"][0]["name"], "b");
    let next = ok_json(
        server
            .get(&format!(
                "/v1/gateway/groups/{}/api_keys?cursor={g1_keys}",
                groups[0]
            ))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(next["items"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn an_empty_list_has_no_cursor() {
    let server = TestServer::start().await;
    let page = ok_json(server.get("/v1/gateway/secrets").send().await.unwrap()).await;
    assert_eq!(
        page,
        json!({"items": [], "pagination": {"has_more": false, "cursor": null}})
    );
}

// --- secrets --------------------------------------------------------------------------

#[tokio::test]
async fn secrets_are_sealed_and_never_returned() {
    let server = TestServer::start().await;
    let created = ok_json(
        server
            .post(
                "/v1/gateway/secrets",
                &json!({"name": "openai", "value": "sk-live-123456"}),
            )
            .send()
            .await
            .unwrap(),
    )
    .await;
    let id = created["id"].as_str().unwrap();
    assert_eq!(created, json!({"id": id, "name": "openai"}));
    assert!(id.starts_with("sec_"));

    let stored = server.store.secret(id).await.unwrap().unwrap();
    assert!(!stored
        .ciphertext
        .windows(b"sk-live-123456".len())
        .any(|w| w == b"sk-live-123456"));

    let one = ok_json(
        server
            .get(&format!("/v1/gateway/secrets/{id}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(one["name"], "openai");
    assert!(one.get("value").is_none());
    let list = ok_json(server.get("/v1/gateway/secrets").send().await.unwrap()).await;
    let item = &list["items"][0];
    assert_eq!(item.as_object().unwrap().len(), 3, "{item}");
    assert_eq!(item["id"], id);
    assert!(is_rfc3339_utc(&item["created_at"]), "{item}");

    let deleted = ok_json(
        server
            .delete(&format!("/v1/gateway/secrets/{id}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(deleted, json!({"id": id, "name": "openai"}));
    expect_error(
        server
            .get(&format!("/v1/gateway/secrets/{id}"))
            .send()
            .await
            .unwrap(),
        404,
        "not_found",
        "Secret not found",
    )
    .await;
    expect_error(
        server
            .delete(&format!("/v1/gateway/secrets/{id}"))
            .send()
            .await
            .unwrap(),
        404,
        "not_found",
        "Secret not found",
    )
    .await;
    // The name is free again once deleted.
    create_secret(&server, "openai").await;
}

#[tokio::test]
async fn secret_names_are_unique_bounded_and_printable() {
    let server = TestServer::start().await;
    create_secret(&server, "openai").await;
    let post = |body: Value| server.post("/v1/gateway/secrets", &body).send();
    expect_error(
        post(json!({"name": "openai", "value": "x"})).await.unwrap(),
        400,
        "duplicate_name",
        "name: a secret with this name already exists in this workspace",
    )
    .await;
    expect_error(
        post(json!({"name": "x".repeat(256), "value": "x"}))
            .await
            .unwrap(),
        400,
        "invalid_payload",
        "name: must be 1..=255 characters",
    )
    .await;
    expect_error(
        post(json!({"name": "", "value": "x"})).await.unwrap(),
        400,
        "invalid_payload",
        "name: must be 1..=255 characters",
    )
    .await;
    expect_error(
        post(json!({"name": "a\r\nX-Injected: 1", "value": "x"}))
            .await
            .unwrap(),
        400,
        "invalid_payload",
        "name: must not contain control characters (CR, LF, tab, ...)",
    )
    .await;
    expect_error(
        post(json!({"name": "empty", "value": ""})).await.unwrap(),
        400,
        "invalid_payload",
        "value: must be 1..=16384 bytes",
    )
    .await;
    assert_eq!(
        post(json!({"name": "x".repeat(255), "value": "x"}))
            .await
            .unwrap()
            .status(),
        200
    );
}

/// A secret is sent upstream as `Authorization: Bearer <value>`: a value with CR, LF, NUL
/// or another control character can never form that header, so it is refused when stored
/// instead of failing every request as "upstream unreachable".
#[tokio::test]
async fn secret_values_must_fit_an_authorization_header() {
    let server = TestServer::start().await;
    let post = |body: Value| server.post("/v1/gateway/secrets", &body).send();
    for (i, value) in ["sk-1\r\nX-Injected: 1", "sk-\u{0}1", "sk\t1", "sk-\u{7f}"]
        .into_iter()
        .enumerate()
    {
        expect_error(
            post(json!({"name": format!("s{i}"), "value": value}))
                .await
                .unwrap(),
            400,
            "invalid_payload",
            "value: must not contain control characters (CR, LF, tab, ...)",
        )
        .await;
    }
    let listed = ok_json(server.get("/v1/gateway/secrets").send().await.unwrap()).await;
    assert_eq!(listed["items"], json!([]));
    create_secret(&server, "printable").await;
}

/// Concurrent creates with one name make one secret: the others are `duplicate_name`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_with_one_name_make_one_secret() {
    let server = TestServer::start().await;
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let request = server.post(
                "/v1/gateway/secrets",
                &json!({"name": "openai", "value": "sk-1"}),
            );
            tokio::spawn(async move { status_json(request.send().await.unwrap()).await })
        })
        .collect();
    let mut created = 0;
    for task in tasks {
        match task.await.unwrap() {
            (200, _) => created += 1,
            (status, body) => assert_eq!(
                (status, body),
                (
                    400,
                    json!({
                        "code": "duplicate_name",
                        "error": "name: a secret with this name already exists in this workspace",
                    })
                )
            ),
        }
    }
    assert_eq!(created, 1);
    let listed = ok_json(server.get("/v1/gateway/secrets").send().await.unwrap()).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn another_workspaces_secret_is_403() {
    let server = TestServer::start().await;
    let other = other_workspace(&server, "acme").await;
    let created = ok_json(
        with_key(
            &server,
            reqwest::Method::POST,
            "/v1/gateway/secrets",
            &other,
        )
        .json(&json!({"name": "theirs", "value": "v"}))
        .send()
        .await
        .unwrap(),
    )
    .await;
    let path = format!("/v1/gateway/secrets/{}", created["id"].as_str().unwrap());
    for response in [
        server.get(&path).send().await.unwrap(),
        server.delete(&path).send().await.unwrap(),
    ] {
        expect_error(
            response,
            403,
            "forbidden",
            "Secret belongs to another workspace",
        )
        .await;
    }
    // Names are per workspace.
    create_secret(&server, "theirs").await;
    let mine = ok_json(server.get("/v1/gateway/secrets").send().await.unwrap()).await;
    assert_eq!(mine["items"].as_array().unwrap().len(), 1);
}

// --- management keys ------------------------------------------------------------------

#[tokio::test]
async fn management_keys_are_minted_listed_and_revoked() {
    let server = TestServer::start().await;
    let created = ok_json(
        server
            .post(
                "/v1/gateway/management_keys",
                &json!({"name": "ci", "scope": "manage"}),
            )
            .send()
            .await
            .unwrap(),
    )
    .await;
    let key = created["key"].as_str().unwrap().to_owned();
    let prefix = created["prefix"].as_str().unwrap().to_owned();
    assert_eq!(prefix.len(), 16);
    assert!(prefix.starts_with("tgm_"));
    assert_eq!(&key[..16], prefix);
    assert_eq!(created["name"], "ci");
    assert_eq!(created["scope"], "manage");
    assert!(is_rfc3339_utc(&created["created_at"]));

    // Only the SHA-256 of the key is stored.
    let (stored, _) = server
        .store
        .management_key_by_prefix(&prefix)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.hash, Sha256::digest(key.as_bytes()).to_vec());

    let ok = with_key(
        &server,
        reqwest::Method::GET,
        "/v1/gateway/management_keys",
        &key,
    )
    .send()
    .await
    .unwrap();
    let list = ok_json(ok).await;
    let items = list["items"].as_array().unwrap();
    let listed = items
        .iter()
        .find(|k| k["prefix"] == prefix.as_str())
        .unwrap();
    assert_eq!(
        listed,
        &json!({"prefix": prefix, "name": "ci", "scope": "manage", "created_at": created["created_at"]})
    );
    assert!(!list.to_string().contains(&key[17..]));

    let path = format!("/v1/gateway/management_keys/{prefix}");
    assert_eq!(
        ok_json(server.delete(&path).send().await.unwrap()).await,
        json!({"prefix": prefix})
    );
    expect_error(
        with_key(&server, reqwest::Method::GET, "/v1/gateway/groups", &key)
            .send()
            .await
            .unwrap(),
        401,
        "unauthorized",
        "Invalid management key",
    )
    .await;
    expect_error(
        server.delete(&path).send().await.unwrap(),
        404,
        "not_found",
        "Management key not found",
    )
    .await;
}

/// No CLI command mints a key for an existing workspace, so revoking its last `manage`
/// key would leave it running with nobody able to change it: refused. `view` keys do
/// not count; with a second `manage` key, self-revocation (the end of a rotation) works.
#[tokio::test]
async fn the_last_manage_key_of_a_workspace_cannot_be_revoked() {
    let server = TestServer::start().await;
    let admin_prefix = server.admin_key[..16].to_owned();
    let mint = |scope: &str| {
        let request = server.post(
            "/v1/gateway/management_keys",
            &json!({"name": scope, "scope": scope}),
        );
        async move { ok_json(request.send().await.unwrap()).await }
    };
    let revoke = |prefix: &str, key: &str| {
        with_key(
            &server,
            reqwest::Method::DELETE,
            &format!("/v1/gateway/management_keys/{prefix}"),
            key,
        )
        .send()
    };
    let last =
        "Cannot revoke the last manage key of this workspace; create another manage key first";
    mint("view").await;
    expect_error(
        revoke(&admin_prefix, &server.admin_key).await.unwrap(),
        400,
        "last_manage_key",
        last,
    )
    .await;
    let second = mint("manage").await;
    let second_key = second["key"].as_str().unwrap();
    let second_prefix = second["prefix"].as_str().unwrap();
    assert_eq!(
        ok_json(revoke(&admin_prefix, second_key).await.unwrap()).await,
        json!({"prefix": admin_prefix})
    );
    expect_error(
        revoke(second_prefix, second_key).await.unwrap(),
        400,
        "last_manage_key",
        last,
    )
    .await;
    let listed = ok_json(
        with_key(
            &server,
            reqwest::Method::GET,
            "/v1/gateway/management_keys",
            second_key,
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
    let scopes: Vec<&str> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["scope"].as_str().unwrap())
        .collect();
    assert_eq!(scopes, ["view", "manage"]);
}

#[tokio::test]
async fn management_key_payloads_are_checked() {
    let server = TestServer::start().await;
    let post = |body: Value| server.post("/v1/gateway/management_keys", &body).send();
    expect_error(
        post(json!({"name": "x", "scope": "admin"})).await.unwrap(),
        400,
        "invalid_payload",
        "scope: unknown variant `admin`, expected `manage` or `view`",
    )
    .await;
    expect_error(
        post(json!({"name": "x", "scope": ["view"]})).await.unwrap(),
        400,
        "invalid_payload",
        "scope: invalid type: sequence, expected `manage` or `view`",
    )
    .await;
    expect_error(
        post(json!({"name": "x"})).await.unwrap(),
        400,
        "invalid_payload",
        "body: missing field `scope`",
    )
    .await;
    expect_error(
        post(json!({"name": "x".repeat(256), "scope": "view"}))
            .await
            .unwrap(),
        400,
        "invalid_payload",
        "name: must be at most 255 characters",
    )
    .await;
    expect_error(
        post(json!({"name": "a\nb", "scope": "view"}))
            .await
            .unwrap(),
        400,
        "invalid_payload",
        "name: must not contain control characters (CR, LF, tab, ...)",
    )
    .await;
    let unnamed = ok_json(post(json!({"name": null, "scope": "view"})).await.unwrap()).await;
    assert_eq!(unnamed["name"], Value::Null);
    assert_eq!(unnamed["scope"], "view");
}

#[tokio::test]
async fn another_workspaces_management_key_is_403() {
    let server = TestServer::start().await;
    let other = other_workspace(&server, "acme").await;
    expect_error(
        server
            .delete(&format!("/v1/gateway/management_keys/{}", &other[..16]))
            .send()
            .await
            .unwrap(),
        403,
        "forbidden",
        "Management key belongs to another workspace",
    )
    .await;
    // And it still works.
    let ok = with_key(&server, reqwest::Method::GET, "/v1/gateway/groups", &other)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let mine = ok_json(
        server
            .get("/v1/gateway/management_keys")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(mine["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["prefix"] != other[..16]));
}

// --- signing key ----------------------------------------------------------------------

#[tokio::test]
async fn signing_key_is_a_raw_32_byte_ed25519_key_in_base64() {
    use base64::Engine as _;
    let server = TestServer::start().await;
    let b64 = base64::engine::general_purpose::STANDARD;
    assert_eq!(
        ok_json(server.get("/v1/gateway/signing_key").send().await.unwrap()).await,
        json!({"public_key": null})
    );
    let public = ed25519_dalek::SigningKey::from_bytes(&[3; 32]).verifying_key();
    let encoded = b64.encode(public.as_bytes());
    let set = ok_json(
        server
            .authed_put("/v1/gateway/signing_key")
            .json(&json!({"public_key": encoded}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(set, json!({"ok": true}));
    assert_eq!(
        ok_json(server.get("/v1/gateway/signing_key").send().await.unwrap()).await,
        json!({"public_key": encoded})
    );
    let put = |body: Value| {
        server
            .authed_put("/v1/gateway/signing_key")
            .json(&body)
            .send()
    };
    expect_error(
        put(json!({"public_key": b64.encode([1_u8; 31])}))
            .await
            .unwrap(),
        400,
        "invalid_payload",
        "public_key: must be a raw 32-byte Ed25519 public key",
    )
    .await;
    expect_error(
        put(json!({"public_key": "%%% not base64"})).await.unwrap(),
        400,
        "invalid_payload",
        "public_key: must be standard base64",
    )
    .await;
    expect_error(
        put(json!({"public_key": 12})).await.unwrap(),
        400,
        "invalid_payload",
        "public_key: invalid type: integer `12`, expected a string",
    )
    .await;
    // Small-order points (all zeros, the identity) decode, but registration verifies
    // strictly and no signature would ever pass: refused when set, not at first use.
    let mut identity = [0_u8; 32];
    identity[0] = 1;
    for weak in [[0_u8; 32], identity] {
        expect_error(
            put(json!({"public_key": b64.encode(weak)})).await.unwrap(),
            400,
            "invalid_payload",
            "public_key: is a weak (small-order) Ed25519 key under which no signature verifies",
        )
        .await;
    }
    assert_eq!(
        ok_json(server.get("/v1/gateway/signing_key").send().await.unwrap()).await,
        json!({"public_key": encoded})
    );
}

// --- OpenAPI --------------------------------------------------------------------------

/// `GET /v1/spec` is public, and every management operation it lists is routed: without
/// a key each one answers 401 (not 404 or 405).
#[tokio::test]
async fn spec_lists_only_routes_that_exist() {
    let server = TestServer::start().await;
    let spec = ok_json(
        server
            .http
            .get(server.url("/v1/spec"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(spec["openapi"], "3.1.0");
    let paths = spec["paths"].as_object().unwrap();
    let mut operations = 0;
    for (path, item) in paths.iter().filter(|(p, _)| p.starts_with("/v1/gateway")) {
        let concrete = path
            .replace("{id}", "grp_x")
            .replace("{prefix}", "tg_x")
            .replace("{delivery_id}", "dlv_x");
        for method in item.as_object().unwrap().keys() {
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let response = server
                .http
                .request(method.clone(), server.url(&concrete))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 401, "{method} {path}");
            operations += 1;
        }
    }
    assert_eq!(operations, 33);
}
