//! `GET /v1/models`: the key's callable slugs in the OpenAI list shape.

use serde_json::{json, Value};
use tollgate_core::Timestamp;

use crate::support::{ok_json, status_json, TestServer};

fn created_secs(endpoint: &Value) -> i64 {
    let at = Timestamp::parse_rfc3339(endpoint["created_at"].as_str().unwrap()).unwrap();
    at.millis().div_euclid(1000)
}

#[tokio::test]
async fn lists_the_groups_own_slugs_that_have_a_live_endpoint() {
    let server = TestServer::start().await;
    let m = server.create_endpoint("acme/m", "echo").await;
    let x = server.create_endpoint("acme/x", "echo").await;
    let y = server.create_endpoint("other-lab/y.1", "echo").await;
    server.create_endpoint("acme/not-listed", "echo").await;
    let group = server
        .group(
            "cust-1",
            "CASCADING",
            None,
            json!([{"slug": "other-lab/y.1"}, {"slug": "acme/m"}, {"slug": "acme/x"}]),
        )
        .await;
    let key = server.create_key(&group).await;
    let list = || {
        server
            .http
            .get(server.url("/v1/models"))
            .bearer_auth(&key)
            .send()
    };

    let listed = ok_json(list().await.unwrap()).await;
    assert_eq!(
        listed,
        json!({"object": "list", "data": [
            {"id": "other-lab/y.1", "object": "model", "created": created_secs(&y), "owned_by": "other-lab"},
            {"id": "acme/m", "object": "model", "created": created_secs(&m), "owned_by": "acme"},
            {"id": "acme/x", "object": "model", "created": created_secs(&x), "owned_by": "acme"},
        ]})
    );

    // A deleted endpoint's slug disappears from the list.
    let x_id = x["id"].as_str().unwrap();
    ok_json(
        server
            .delete(&format!("/v1/gateway/endpoints/{x_id}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let listed = ok_json(list().await.unwrap()).await;
    let ids: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["other-lab/y.1", "acme/m"]);
    assert!(server.mock.requests().is_empty());
}

#[tokio::test]
async fn a_child_lists_only_its_own_slugs() {
    let server = TestServer::start().await;
    server.create_endpoint("acme/m", "echo").await;
    server.create_endpoint("acme/x", "echo").await;
    let root = server
        .group(
            "root",
            "INDEPENDENT",
            None,
            json!([{"slug": "acme/m"}, {"slug": "acme/x"}]),
        )
        .await;
    let child = server
        .group(
            "child",
            "INDEPENDENT",
            Some(&root),
            json!([{"slug": "acme/x"}]),
        )
        .await;
    let key = server.create_key(&child).await;
    let listed = ok_json(
        server
            .http
            .get(server.url("/v1/models"))
            .header("Authorization", format!("Api-Key {key}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1);
    assert_eq!(listed["data"][0]["id"], "acme/x");
}

#[tokio::test]
async fn listing_needs_a_valid_key() {
    let server = TestServer::start().await;
    let response = server
        .http
        .get(server.url("/v1/models"))
        .send()
        .await
        .unwrap();
    assert!(response.headers().contains_key("x-request-id"));
    let (status, body) = status_json(response).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "invalid_api_key");

    let response = server
        .http
        .get(server.url("/v1/models"))
        .bearer_auth(format!("tg_0000000000000.{}", "z".repeat(32)))
        .send()
        .await
        .unwrap();
    let (status, body) = status_json(response).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "invalid_api_key");
}
