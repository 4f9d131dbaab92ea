//! `/v1/gateway/groups/{id}/api_keys` (SPEC §1.4): minting, listing, revoking, hashes
//! only at rest, and Ed25519-signed registration of operator-issued keys.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::{Signer, SigningKey};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::admin_misc::{
    expect_error, expect_error_prefix, is_rfc3339_utc, other_workspace, with_key,
};
use crate::support::{ok_json, TestServer};

async fn group_with_model(server: &TestServer, ext: &str) -> String {
    if server
        .store
        .endpoint_by_slug("acme/m")
        .await
        .unwrap()
        .is_none()
    {
        server.create_endpoint("acme/m", "m").await;
    }
    server
        .group(ext, "INDEPENDENT", None, json!([{"slug": "acme/m"}]))
        .await
}

/// Every byte the server has written to disk (the SQLite file and its WAL).
fn stored_bytes(server: &TestServer) -> Vec<u8> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(server.dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            all.extend(std::fs::read(&path).unwrap());
        }
    }
    all
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn keys_are_minted_listed_read_and_revoked() {
    let server = TestServer::start().await;
    let group = group_with_model(&server, "cust").await;
    let base = format!("/v1/gateway/groups/{group}/api_keys");
    let minted = ok_json(
        server
            .post(&base, &json!({"name": "prod"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let full = minted["api_key"].as_str().unwrap().to_owned();
    let prefix = minted["prefix"].as_str().unwrap().to_owned();
    assert_eq!(
        minted,
        json!({"api_key": full, "prefix": prefix, "name": "prod"})
    );
    assert_eq!(prefix.len(), 16);
    assert!(prefix.starts_with("tg_"));
    assert_eq!(&full[..16], prefix);
    assert_eq!(&full[16..17], ".");
    assert!(full[17..].len() >= 32);
    assert!(full[17..].bytes().all(|c| c.is_ascii_alphanumeric()));

    let unnamed = ok_json(
        server
            .post(&base, &json!({"name": null}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(unnamed["name"], Value::Null);
    let defaulted = ok_json(server.post(&base, &json!({})).send().await.unwrap()).await;
    assert_eq!(defaulted["name"], Value::Null);

    let one = ok_json(
        server
            .get(&format!("{base}/{prefix}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(one["prefix"], prefix.as_str());
    assert_eq!(one["name"], "prod");
    assert!(is_rfc3339_utc(&one["created_at"]));
    assert_eq!(one.as_object().unwrap().len(), 3);
    let list = ok_json(server.get(&base).send().await.unwrap()).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 3);
    assert_eq!(list["items"][0], one);
    assert!(!list.to_string().contains(&full[17..]));

    let revoked = ok_json(
        server
            .delete(&format!("{base}/{prefix}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(revoked, json!({"prefix": prefix}));
    for response in [
        server
            .get(&format!("{base}/{prefix}"))
            .send()
            .await
            .unwrap(),
        server
            .delete(&format!("{base}/{prefix}"))
            .send()
            .await
            .unwrap(),
    ] {
        expect_error(response, 404, "not_found", "API key not found").await;
    }
    assert!(server
        .store
        .resolve_api_key(&prefix)
        .await
        .unwrap()
        .is_none());
    let list = ok_json(server.get(&base).send().await.unwrap()).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
}

/// Only the SHA-256 of a key is stored: the key's secret part appears nowhere on disk.
#[tokio::test]
async fn keys_are_stored_only_as_hashes() {
    let server = TestServer::start().await;
    let group = group_with_model(&server, "cust").await;
    let full = server.create_key(&group).await;
    let grant = server
        .store
        .resolve_api_key(&full[..16])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(grant.key.hash, Sha256::digest(full.as_bytes()).to_vec());
    assert_eq!(grant.chain[0].id, group);

    let management = ok_json(
        server
            .post(
                "/v1/gateway/management_keys",
                &json!({"name": "m", "scope": "view"}),
            )
            .send()
            .await
            .unwrap(),
    )
    .await;
    let management_key = management["key"].as_str().unwrap();
    let disk = stored_bytes(&server);
    assert!(contains(&disk, &full[..16]), "the prefix is stored");
    assert!(
        !contains(&disk, &full[17..]),
        "the API key's secret is on disk"
    );
    assert!(
        !contains(&disk, &management_key[17..]),
        "the management key's secret is on disk"
    );
}

#[tokio::test]
async fn key_names_are_checked() {
    let server = TestServer::start().await;
    let group = group_with_model(&server, "cust").await;
    let base = format!("/v1/gateway/groups/{group}/api_keys");
    expect_error(
        server
            .post(&base, &json!({"name": "n".repeat(256)}))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_payload",
        "name: must be at most 255 characters",
    )
    .await;
    expect_error(
        server
            .post(&base, &json!({"name": "a\r\nb"}))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_payload",
        "name: must not contain control characters (CR, LF, tab, ...)",
    )
    .await;
    expect_error_prefix(
        server
            .post(&base, &json!({"name": "a", "scopes": ["all"]}))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_payload",
        "scopes: unknown field `scopes`",
    )
    .await;
    expect_error(
        server
            .post(&base, &json!({"name": 5}))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_payload",
        "name: invalid type: integer `5`, expected a string",
    )
    .await;
}

#[tokio::test]
async fn keys_are_scoped_to_their_group_and_workspace() {
    let server = TestServer::start().await;
    let a = group_with_model(&server, "a").await;
    let b = group_with_model(&server, "b").await;
    let key_a = server.create_key(&a).await;
    // A prefix under another group of the same workspace answers 404.
    let wrong = format!("/v1/gateway/groups/{b}/api_keys/{}", &key_a[..16]);
    expect_error(
        server.get(&wrong).send().await.unwrap(),
        404,
        "not_found",
        "API key not found",
    )
    .await;
    expect_error(
        server.delete(&wrong).send().await.unwrap(),
        404,
        "not_found",
        "API key not found",
    )
    .await;
    assert!(server
        .store
        .resolve_api_key(&key_a[..16])
        .await
        .unwrap()
        .is_some());

    // An absent group is 404, a deleted one too; another workspace's is 403.
    for response in [
        server
            .post("/v1/gateway/groups/grp_nope/api_keys", &json!({}))
            .send()
            .await
            .unwrap(),
        server
            .get("/v1/gateway/groups/grp_nope/api_keys")
            .send()
            .await
            .unwrap(),
    ] {
        expect_error(response, 404, "not_found", "Group not found").await;
    }
    let c = group_with_model(&server, "c").await;
    ok_json(
        server
            .delete(&format!("/v1/gateway/groups/{c}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    expect_error(
        server
            .post(&format!("/v1/gateway/groups/{c}/api_keys"), &json!({}))
            .send()
            .await
            .unwrap(),
        404,
        "not_found",
        "Group not found",
    )
    .await;

    let other = other_workspace(&server, "acme").await;
    for response in [
        with_key(
            &server,
            Method::POST,
            &format!("/v1/gateway/groups/{a}/api_keys"),
            &other,
        )
        .json(&json!({}))
        .send()
        .await
        .unwrap(),
        with_key(
            &server,
            Method::GET,
            &format!("/v1/gateway/groups/{a}/api_keys/{}", &key_a[..16]),
            &other,
        )
        .send()
        .await
        .unwrap(),
        with_key(
            &server,
            Method::DELETE,
            &format!("/v1/gateway/groups/{a}/api_keys/{}", &key_a[..16]),
            &other,
        )
        .send()
        .await
        .unwrap(),
    ] {
        expect_error(
            response,
            403,
            "forbidden",
            "Group belongs to another workspace",
        )
        .await;
    }
}

// --- registration ---------------------------------------------------------------------

const OPERATOR_KEY: &str = "acme_live_9fK2mQ7xLp3Rt8Vw1Zy4Bn6Cd0Ej5Gh";

fn signer() -> SigningKey {
    SigningKey::from_bytes(&[11; 32])
}

async fn set_public_key(server: &TestServer, key: &SigningKey) {
    let answer = ok_json(
        server
            .http
            .put(server.url("/v1/gateway/signing_key"))
            .header("Authorization", format!("Api-Key {}", server.admin_key))
            .json(&json!({"public_key": STANDARD.encode(key.verifying_key().as_bytes())}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(answer, json!({"ok": true}));
}

/// POSTs `body` to `register`, signed by `key` when given.
async fn register(
    server: &TestServer,
    group: &str,
    body: &[u8],
    key: Option<&SigningKey>,
) -> reqwest::Response {
    let mut request = server
        .http
        .post(server.url(&format!("/v1/gateway/groups/{group}/api_keys/register")))
        .header("Authorization", format!("Api-Key {}", server.admin_key))
        .header("Content-Type", "application/json")
        .body(body.to_vec());
    if let Some(key) = key {
        request = request.header(
            "X-Baseten-Signature",
            STANDARD.encode(key.sign(body).to_bytes()),
        );
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn registration_needs_a_configured_public_key() {
    let server = TestServer::start().await;
    let group = group_with_model(&server, "cust").await;
    let body = serde_json::to_vec(&json!({"key": OPERATOR_KEY, "name": "x"})).unwrap();
    expect_error(
        register(&server, &group, &body, Some(&signer())).await,
        400,
        "signing_key_not_configured",
        "Must configure a public key before registering API keys",
    )
    .await;
}

#[tokio::test]
async fn a_signed_registration_adopts_the_key() {
    let server = TestServer::start().await;
    let group = group_with_model(&server, "cust").await;
    set_public_key(&server, &signer()).await;
    let body = serde_json::to_vec(&json!({"key": OPERATOR_KEY, "name": "legacy"})).unwrap();
    let answer = ok_json(register(&server, &group, &body, Some(&signer())).await).await;
    assert_eq!(answer, json!({"ok": true}));

    let prefix = &OPERATOR_KEY[..16];
    let grant = server.store.resolve_api_key(prefix).await.unwrap().unwrap();
    assert_eq!(
        grant.key.hash,
        Sha256::digest(OPERATOR_KEY.as_bytes()).to_vec()
    );
    assert_eq!(grant.key.name.as_deref(), Some("legacy"));
    assert_eq!(grant.chain[0].id, group);
    let listed = ok_json(
        server
            .get(&format!("/v1/gateway/groups/{group}/api_keys/{prefix}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(listed["name"], "legacy");
    assert!(!contains(&stored_bytes(&server), &OPERATOR_KEY[16..]));

    // The same first 16 characters cannot be registered twice (nor after revocation).
    let clash = format!("{}{}", &OPERATOR_KEY[..16], "Zq8Wm3Xr7Tn2Ys6Vk1Jp");
    let body = serde_json::to_vec(&json!({"key": clash, "name": null})).unwrap();
    let duplicate = "key: its first 16 characters are already the prefix of another key";
    expect_error(
        register(&server, &group, &body, Some(&signer())).await,
        400,
        "duplicate_prefix",
        duplicate,
    )
    .await;
    ok_json(
        server
            .delete(&format!("/v1/gateway/groups/{group}/api_keys/{prefix}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    expect_error(
        register(&server, &group, &body, Some(&signer())).await,
        400,
        "duplicate_prefix",
        duplicate,
    )
    .await;
    // A minted key's prefix is taken too.
    let minted = server.create_key(&group).await;
    let body =
        serde_json::to_vec(&json!({"key": format!("{}{}", &minted[..16], "Zq8Wm3Xr7Tn2Ys6Vk1Jp")}))
            .unwrap();
    expect_error(
        register(&server, &group, &body, Some(&signer())).await,
        400,
        "duplicate_prefix",
        duplicate,
    )
    .await;
}

#[tokio::test]
async fn bad_signatures_are_refused() {
    let server = TestServer::start().await;
    let group = group_with_model(&server, "cust").await;
    set_public_key(&server, &signer()).await;
    let body = serde_json::to_vec(&json!({"key": OPERATOR_KEY, "name": "x"})).unwrap();
    let failed = "Signature verification failed";
    // Missing header.
    expect_error(
        register(&server, &group, &body, None).await,
        400,
        "signature_verification_failed",
        failed,
    )
    .await;
    // Signed by another key.
    let stranger = SigningKey::from_bytes(&[12; 32]);
    expect_error(
        register(&server, &group, &body, Some(&stranger)).await,
        400,
        "signature_verification_failed",
        failed,
    )
    .await;
    // A valid signature of different bytes (the body was re-serialised with a space).
    let signature = STANDARD.encode(signer().sign(&body).to_bytes());
    let mut altered = body.clone();
    altered.insert(1, b' ');
    for (sig, sent) in [
        (signature.as_str(), altered.as_slice()),
        ("not base64 at all", body.as_slice()),
        ("AAAA", body.as_slice()),
    ] {
        let response = server
            .http
            .post(server.url(&format!("/v1/gateway/groups/{group}/api_keys/register")))
            .header("Authorization", format!("Api-Key {}", server.admin_key))
            .header("X-Baseten-Signature", sig)
            .body(sent.to_vec())
            .send()
            .await
            .unwrap();
        expect_error(response, 400, "signature_verification_failed", failed).await;
    }
    assert!(server
        .store
        .resolve_api_key(&OPERATOR_KEY[..16])
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn registered_keys_need_length_entropy_and_a_valid_body() {
    let server = TestServer::start().await;
    let group = group_with_model(&server, "cust").await;
    set_public_key(&server, &signer()).await;
    let send = |value: Value| {
        let body = serde_json::to_vec(&value).unwrap();
        let server = &server;
        let group = group.clone();
        async move { register(server, &group, &body, Some(&signer())).await }
    };
    for key in ["k".repeat(31), "k".repeat(129)] {
        expect_error(
            send(json!({"key": key, "name": "x"})).await,
            400,
            "invalid_key",
            "key: must be 32..=128 characters",
        )
        .await;
    }
    expect_error(
        send(json!({"key": "ab".repeat(20), "name": "x"})).await,
        400,
        "invalid_key",
        "key: entropy too low (at least 3 bits per character)",
    )
    .await;
    expect_error(
        send(json!({"key": "acme live 9fK2mQ7xLp3Rt8Vw1Zy4Bn6Cd0Ej5Gh", "name": "x"})).await,
        400,
        "invalid_key",
        "key: must be printable ASCII without spaces",
    )
    .await;
    expect_error(
        send(json!({"name": "x"})).await,
        400,
        "invalid_payload",
        "body: missing field `key`",
    )
    .await;
    expect_error_prefix(
        send(json!({"key": OPERATOR_KEY, "group": "g"})).await,
        400,
        "invalid_payload",
        "group: unknown field `group`",
    )
    .await;
    let malformed = b"{\"key\": ";
    expect_error_prefix(
        register(&server, &group, malformed, Some(&signer())).await,
        400,
        "invalid_json",
        "Malformed JSON: ",
    )
    .await;
    // Exactly 32 and 128 characters are accepted.
    let k32 = "Kx7Qm2Wp9Zr4Tb6Yn1Vc8Jd3Lf5Hg0Sa";
    assert_eq!(k32.len(), 32);
    assert_eq!(
        ok_json(send(json!({"key": k32, "name": null})).await).await,
        json!({"ok": true})
    );
    let k128: String = (0..128)
        .map(|i| char::from(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEF"[(i * 7 + i / 42) % 42]))
        .collect();
    assert_eq!(
        ok_json(send(json!({"key": k128, "name": null})).await).await,
        json!({"ok": true})
    );
}
