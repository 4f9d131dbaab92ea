//! `/v1/gateway/endpoints` (SPEC §1.5): shape, slugs, targets, secrets, private networks.

use reqwest::Method;
use serde_json::{json, Value};

use crate::admin_misc::{
    expect_error, expect_error_prefix, is_rfc3339_utc, other_workspace, with_key,
};
use crate::support::{ok_json, TestServer};

fn target(base_url: &str) -> Value {
    json!({
        "provider": "OPENAI_COMPATIBLE",
        "base_url": base_url,
        "target_model": "qwen-7b",
        "secret_id": null,
    })
}

fn endpoint_body(slug: &str, base_url: &str) -> Value {
    json!({"slug": slug, "targets": [target(base_url)]})
}

#[tokio::test]
async fn endpoints_round_trip() {
    let server = TestServer::start().await;
    let base = server.mock.base_url();
    let created = server.create_endpoint("acme/m", "qwen-7b").await;
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("ep_"));
    assert_eq!(created["slug"], "acme/m");
    assert_eq!(created["region"], "UNRESTRICTED");
    assert_eq!(created["targets"], json!([target(&base)]));
    assert!(is_rfc3339_utc(&created["created_at"]));
    assert_eq!(created["created_at"], created["updated_at"]);
    assert_eq!(created.as_object().unwrap().len(), 6);

    let path = format!("/v1/gateway/endpoints/{id}");
    assert_eq!(
        ok_json(server.get(&path).send().await.unwrap()).await,
        created
    );
    let list = ok_json(server.get("/v1/gateway/endpoints").send().await.unwrap()).await;
    assert_eq!(list["items"], json!([created]));

    let eu = ok_json(
        server
            .post(
                "/v1/gateway/endpoints",
                &json!({"slug": "acme/eu", "targets": [target(&base)], "region": "EU"}),
            )
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(eu["region"], "EU");

    let two = json!([target(&base), {
        "provider": "OPENAI_COMPATIBLE",
        "base_url": format!("{base}/backup"),
        "target_model": "qwen-7b-b",
        "secret_id": null,
    }]);
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let patched = ok_json(
        server
            .patch(&path, &json!({"targets": two}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(patched["targets"], two);
    assert_eq!(patched["slug"], "acme/m");
    assert_eq!(patched["created_at"], created["created_at"]);
    assert_ne!(patched["updated_at"], created["updated_at"]);

    let deleted = ok_json(server.delete(&path).send().await.unwrap()).await;
    assert_eq!(deleted, json!({"id": id, "slug": "acme/m"}));
    expect_error(
        server.get(&path).send().await.unwrap(),
        404,
        "not_found",
        "Endpoint not found",
    )
    .await;
    expect_error(
        server.delete(&path).send().await.unwrap(),
        404,
        "not_found",
        "Endpoint not found",
    )
    .await;
    // A deleted endpoint's slug may be used again.
    server.create_endpoint("acme/m", "other").await;
}

#[tokio::test]
async fn slugs_are_unique_across_workspaces() {
    let server = TestServer::start().await;
    let base = server.mock.base_url();
    server.create_endpoint("acme/m", "qwen").await;
    let duplicate = "slug: an endpoint with this slug already exists";
    expect_error(
        server
            .post("/v1/gateway/endpoints", &endpoint_body("acme/m", &base))
            .send()
            .await
            .unwrap(),
        400,
        "duplicate_slug",
        duplicate,
    )
    .await;
    let other = other_workspace(&server, "acme").await;
    expect_error(
        with_key(&server, Method::POST, "/v1/gateway/endpoints", &other)
            .json(&endpoint_body("acme/m", &base))
            .send()
            .await
            .unwrap(),
        400,
        "duplicate_slug",
        duplicate,
    )
    .await;
}

#[tokio::test]
async fn invalid_endpoint_payloads_name_the_field() {
    let server = TestServer::start().await;
    let base = server.mock.base_url();
    let post = |body: Value| server.post("/v1/gateway/endpoints", &body).send();
    expect_error(
        post(endpoint_body("noslash", &base)).await.unwrap(),
        400,
        "invalid_payload",
        "slug: must have the form prefix/name",
    )
    .await;
    expect_error(
        post(endpoint_body("a b/c", &base)).await.unwrap(),
        400,
        "invalid_payload",
        "slug: must have the form prefix/name using letters, digits, '-', '_' and '.'",
    )
    .await;
    expect_error(
        post(json!({"slug": "acme/m", "targets": []}))
            .await
            .unwrap(),
        400,
        "invalid_payload",
        "targets: must list 1..=8 targets",
    )
    .await;
    let nine: Vec<Value> = (0..9).map(|_| target(&base)).collect();
    expect_error(
        post(json!({"slug": "acme/m", "targets": nine}))
            .await
            .unwrap(),
        400,
        "invalid_payload",
        "targets: must list 1..=8 targets",
    )
    .await;
    let eight: Vec<Value> = (0..8).map(|_| target(&base)).collect();
    assert_eq!(
        post(json!({"slug": "acme/eight", "targets": eight}))
            .await
            .unwrap()
            .status(),
        200
    );

    let mut bad_provider = target(&base);
    bad_provider["provider"] = json!("BASETEN");
    expect_error_prefix(
        post(json!({"slug": "acme/m", "targets": [bad_provider]}))
            .await
            .unwrap(),
        400,
        "invalid_payload",
        "targets[0].provider: unknown variant `BASETEN`",
    )
    .await;
    let mut extra = target(&base);
    extra["weight"] = json!(3);
    expect_error_prefix(
        post(json!({"slug": "acme/m", "targets": [extra]}))
            .await
            .unwrap(),
        400,
        "invalid_payload",
        "targets[0].weight: unknown field `weight`",
    )
    .await;
    expect_error(
        post(json!({"slug": "acme/m", "targets": [target(&base), target("ftp://example.com/v1")]}))
            .await
            .unwrap(),
        400,
        "invalid_payload",
        "targets[1].base_url: must use http or https",
    )
    .await;
    expect_error(
        post(endpoint_body("acme/m", "https://user:pw@example.com/v1"))
            .await
            .unwrap(),
        400,
        "invalid_payload",
        "targets[0].base_url: must not carry credentials",
    )
    .await;
    expect_error_prefix(
        post(json!({"slug": "acme/m", "targets": [target(&base)], "region": "MARS"}))
            .await
            .unwrap(),
        400,
        "invalid_payload",
        "region: unknown variant `MARS`",
    )
    .await;
    expect_error(
        post(json!({"targets": [target(&base)]})).await.unwrap(),
        400,
        "invalid_payload",
        "body: missing field `slug`",
    )
    .await;
    let mut crlf = target(&base);
    crlf["target_model"] = json!("qwen\r\nX-Evil: 1");
    expect_error(
        post(json!({"slug": "acme/m", "targets": [crlf]}))
            .await
            .unwrap(),
        400,
        "invalid_payload",
        "targets[0].target_model: must not contain control characters (CR, LF, tab, ...)",
    )
    .await;
    let mut no_model = target(&base);
    no_model["target_model"] = json!("");
    expect_error(
        post(json!({"slug": "acme/m", "targets": [no_model]}))
            .await
            .unwrap(),
        400,
        "invalid_payload",
        "targets[0].target_model: must be 1..=255 characters",
    )
    .await;
    // Enum fields of the wrong JSON type name the field (not "Malformed JSON").
    let mut null_provider = target(&base);
    null_provider["provider"] = Value::Null;
    expect_error(
        post(json!({"slug": "acme/m", "targets": [null_provider]}))
            .await
            .unwrap(),
        400,
        "invalid_payload",
        "targets[0].provider: invalid type: null, expected `OPENAI_COMPATIBLE`",
    )
    .await;
    expect_error(
        post(json!({"slug": "acme/m", "targets": [target(&base)], "region": 1}))
            .await
            .unwrap(),
        400,
        "invalid_payload",
        "region: invalid type: integer `1`, expected `UNRESTRICTED` or `EU`",
    )
    .await;
}

#[tokio::test]
async fn secret_ids_must_name_a_live_secret_of_the_workspace() {
    let server = TestServer::start().await;
    let base = server.mock.base_url();
    let with_secret = |secret: &str| {
        let mut t = target(&base);
        t["secret_id"] = json!(secret);
        json!({"slug": "acme/m", "targets": [target(&base), t]})
    };
    let unknown = "targets[1].secret_id: no secret with this id in this workspace";
    expect_error(
        server
            .post("/v1/gateway/endpoints", &with_secret("sec_nope"))
            .send()
            .await
            .unwrap(),
        400,
        "unknown_secret",
        unknown,
    )
    .await;
    let other = other_workspace(&server, "acme").await;
    let theirs = ok_json(
        with_key(&server, Method::POST, "/v1/gateway/secrets", &other)
            .json(&json!({"name": "k", "value": "v"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    expect_error(
        server
            .post(
                "/v1/gateway/endpoints",
                &with_secret(theirs["id"].as_str().unwrap()),
            )
            .send()
            .await
            .unwrap(),
        400,
        "unknown_secret",
        unknown,
    )
    .await;
    let mine = ok_json(
        server
            .post("/v1/gateway/secrets", &json!({"name": "k", "value": "v"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let secret_id = mine["id"].as_str().unwrap();
    let created = ok_json(
        server
            .post("/v1/gateway/endpoints", &with_secret(secret_id))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(created["targets"][1]["secret_id"], secret_id);
    let path = format!("/v1/gateway/endpoints/{}", created["id"].as_str().unwrap());
    // A secret an endpoint still sends upstream cannot be deleted.
    expect_error(
        server
            .delete(&format!("/v1/gateway/secrets/{secret_id}"))
            .send()
            .await
            .unwrap(),
        400,
        "secret_in_use",
        "Secret is used by endpoint(s) acme/m; point their targets elsewhere first",
    )
    .await;
    ok_json(
        server
            .patch(&path, &json!({"targets": [target(&base)]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    // Once unused it can be deleted, and a deleted secret can no longer be referenced.
    ok_json(
        server
            .delete(&format!("/v1/gateway/secrets/{secret_id}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    expect_error(
        server
            .patch(
                &path,
                &json!({"targets": with_secret(secret_id)["targets"]}),
            )
            .send()
            .await
            .unwrap(),
        400,
        "unknown_secret",
        unknown,
    )
    .await;
}

#[tokio::test]
async fn patch_replaces_targets_only() {
    let server = TestServer::start().await;
    let base = server.mock.base_url();
    let created = server.create_endpoint("acme/m", "qwen").await;
    let path = format!("/v1/gateway/endpoints/{}", created["id"].as_str().unwrap());
    expect_error(
        server
            .patch(&path, &json!({"slug": "acme/n"}))
            .send()
            .await
            .unwrap(),
        400,
        "immutable_field",
        "slug: is immutable; create a new endpoint to rename",
    )
    .await;
    expect_error(
        server
            .patch(&path, &json!({"region": "EU", "targets": [target(&base)]}))
            .send()
            .await
            .unwrap(),
        400,
        "immutable_field",
        "region: is immutable; only targets can be changed",
    )
    .await;
    expect_error(
        server.patch(&path, &json!({})).send().await.unwrap(),
        400,
        "empty_patch",
        "Request body changes nothing; send `targets`",
    )
    .await;
    // `null` was sent: the caller asked for a change, so this is not an empty PATCH.
    expect_error(
        server
            .patch(&path, &json!({"targets": null}))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_payload",
        "targets: must be a list of 1..=8 targets",
    )
    .await;
    expect_error(
        server
            .patch(&path, &json!({"targets": []}))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_payload",
        "targets: must list 1..=8 targets",
    )
    .await;
    expect_error_prefix(
        server
            .patch(&path, &json!({"targets": [target(&base)], "name": "x"}))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_payload",
        "name: unknown field `name`",
    )
    .await;
    expect_error(
        server
            .patch(
                "/v1/gateway/endpoints/ep_missing",
                &json!({"targets": [target(&base)]}),
            )
            .send()
            .await
            .unwrap(),
        404,
        "not_found",
        "Endpoint not found",
    )
    .await;
    // Nothing above changed the endpoint.
    assert_eq!(
        ok_json(server.get(&path).send().await.unwrap()).await,
        created
    );
}

#[tokio::test]
async fn another_workspaces_endpoint_is_403() {
    let server = TestServer::start().await;
    let base = server.mock.base_url();
    let other = other_workspace(&server, "acme").await;
    let theirs = ok_json(
        with_key(&server, Method::POST, "/v1/gateway/endpoints", &other)
            .json(&endpoint_body("acme/theirs", &base))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let path = format!("/v1/gateway/endpoints/{}", theirs["id"].as_str().unwrap());
    let message = "Endpoint belongs to another workspace";
    expect_error(
        server.get(&path).send().await.unwrap(),
        403,
        "forbidden",
        message,
    )
    .await;
    expect_error(
        server
            .patch(&path, &json!({"targets": [target(&base)]}))
            .send()
            .await
            .unwrap(),
        403,
        "forbidden",
        message,
    )
    .await;
    expect_error(
        server.delete(&path).send().await.unwrap(),
        403,
        "forbidden",
        message,
    )
    .await;
    let mine = ok_json(server.get("/v1/gateway/endpoints").send().await.unwrap()).await;
    assert_eq!(mine["items"], json!([]));
}

/// Without `TOLLGATE_ALLOW_PRIVATE_NETWORKS`, upstreams on loopback, private or
/// link-local addresses — literal or by name — are refused, and so are unknown hosts.
#[tokio::test]
async fn private_upstreams_are_refused_unless_allowed() {
    let server = TestServer::start_with(|c| c.allow_private_networks = false).await;
    let post = |base: &str| {
        server
            .post("/v1/gateway/endpoints", &endpoint_body("acme/m", base))
            .send()
    };
    let mock = server.mock.base_url();
    let address = mock
        .trim_start_matches("http://")
        .split(['/', ':'])
        .next()
        .unwrap()
        .to_owned();
    expect_error(
        post(&mock).await.unwrap(),
        400,
        "private_network_url",
        &format!(
            "targets[0].base_url: resolves to a loopback, private or link-local address ({address}); \
             set TOLLGATE_ALLOW_PRIVATE_NETWORKS=true to allow it"
        ),
    )
    .await;
    for private in [
        "http://localhost:8000/v1",
        "http://10.0.0.7/v1",
        "http://169.254.169.254/latest",
        "http://[::1]:8000/v1",
        "http://[::ffff:192.168.1.1]/v1",
    ] {
        expect_error_prefix(
            post(private).await.unwrap(),
            400,
            "private_network_url",
            "targets[0].base_url: resolves to a loopback, private or link-local address",
        )
        .await;
    }
    expect_error(
        post("https://no-such-host.invalid/v1").await.unwrap(),
        400,
        "unresolvable_host",
        "targets[0].base_url: host 'no-such-host.invalid' could not be resolved",
    )
    .await;
    let public = ok_json(post("https://8.8.8.8/v1").await.unwrap()).await;
    assert_eq!(public["targets"][0]["base_url"], "https://8.8.8.8/v1");
}
