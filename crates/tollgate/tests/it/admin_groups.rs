//! `/v1/gateway/groups` (SPEC §1.2–1.3): the group object, `effective_models` in both
//! modes, write-time tree rules, PATCH, recursive delete, filters and the usage report.

use reqwest::Method;
use serde_json::{json, Value};
use tollgate_core::{Clock, SystemClock, Timestamp};
use tollgate_store::{UsageEvent, UsageStatus};

use crate::admin_misc::{
    expect_error, expect_error_prefix, is_rfc3339_utc, other_workspace, with_key,
};
use crate::support::{ok_json, status_json, TestServer};

const EXCEEDS: &str = "Child group exceeds parent group limit.";

fn rate(kind: &str, unit: &str, threshold: u64) -> Value {
    json!({"type": kind, "unit": unit, "threshold": threshold})
}

fn model(slug: &str, rate_limits: Value, usage_limits: Value) -> Value {
    json!({"slug": slug, "rate_limits": rate_limits, "usage_limits": usage_limits})
}

fn token_minute(slug: &str, threshold: u64) -> Value {
    json!([model(
        slug,
        json!([rate("TOKEN", "MINUTE", threshold)]),
        json!([])
    )])
}

fn body(ext: &str, mode: &str, parent: Option<&str>, models: Value) -> Value {
    json!({
        "metadata": {"external_entity_id": ext, "name": null},
        "models": models,
        "hierarchy": {"limit_enforcement": mode, "parent_group_id": parent},
    })
}

fn effective(kind: &str, unit: &str, threshold: u64, source: &str) -> Value {
    json!({"type": kind, "unit": unit, "threshold": threshold, "source_group": source})
}

async fn get_group(server: &TestServer, id: &str) -> Value {
    ok_json(
        server
            .get(&format!("/v1/gateway/groups/{id}"))
            .send()
            .await
            .unwrap(),
    )
    .await
}

async fn post_group(server: &TestServer, body: &Value) -> reqwest::Response {
    server
        .post("/v1/gateway/groups", body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_group_object_has_the_documented_shape() {
    let server = TestServer::start().await;
    server.create_endpoint("acme/m", "m").await;
    let models = json!([model(
        "acme/m",
        json!([rate("REQUEST", "SECOND", 1), rate("REQUEST", "MINUTE", 3)]),
        json!([rate("TOKEN", "DAY", 1000)])
    )]);
    let created = server
        .create_group(json!({
            "metadata": {"external_entity_id": "cust-1", "name": "Équipe 🚀 Δ"},
            "models": models,
            "hierarchy": {"limit_enforcement": "INDEPENDENT", "parent_group_id": null},
        }))
        .await;
    let id = created["id"].as_str().unwrap();
    assert!(id.starts_with("grp_"));
    assert!(is_rfc3339_utc(&created["created_at"]));
    assert_eq!(
        created,
        json!({
            "id": id,
            "metadata": {"name": "Équipe 🚀 Δ", "external_entity_id": "cust-1"},
            "models": models,
            "effective_models": [{
                "slug": "acme/m",
                "rate_limits": [
                    effective("REQUEST", "SECOND", 1, id),
                    effective("REQUEST", "MINUTE", 3, id),
                ],
                "usage_limits": [effective("TOKEN", "DAY", 1000, id)],
            }],
            "hierarchy": {"limit_enforcement": "INDEPENDENT", "parent_group_id": null},
            "created_at": created["created_at"],
        })
    );
    assert_eq!(get_group(&server, id).await, created);
    // Limit lists may be omitted on input; they are always present on output.
    let bare = server
        .create_group(body(
            "cust-2",
            "INDEPENDENT",
            None,
            json!([{"slug": "acme/m"}]),
        ))
        .await;
    assert_eq!(
        bare["models"],
        json!([model("acme/m", json!([]), json!([]))])
    );
    assert_eq!(
        bare["effective_models"],
        json!([model("acme/m", json!([]), json!([]))])
    );
}

/// SPEC §1.3 worked example, CASCADING: O declares TOKEN/MINUTE 100, F and E 70.
#[tokio::test]
async fn worked_example_cascading_effective_models() {
    let server = TestServer::start().await;
    server.create_endpoint("acme/m", "m").await;
    let o = server
        .group("O", "CASCADING", None, token_minute("acme/m", 100))
        .await;
    let f = server
        .group("F", "CASCADING", Some(&o), token_minute("acme/m", 70))
        .await;
    let e = server
        .group("E", "CASCADING", Some(&o), token_minute("acme/m", 70))
        .await;
    for (child, name) in [(&f, "F"), (&e, "E")] {
        let group = get_group(&server, child).await;
        assert_eq!(
            group["effective_models"],
            json!([{
                "slug": "acme/m",
                "rate_limits": [
                    effective("TOKEN", "MINUTE", 70, child),
                    effective("TOKEN", "MINUTE", 100, &o),
                ],
                "usage_limits": [],
            }]),
            "{name}"
        );
        assert_eq!(
            group["hierarchy"],
            json!({"limit_enforcement": "CASCADING", "parent_group_id": o})
        );
    }
    assert_eq!(
        get_group(&server, &o).await["effective_models"][0]["rate_limits"],
        json!([effective("TOKEN", "MINUTE", 100, &o)])
    );
    // A child that declares nothing is still gated by its parent's pool.
    let quiet = server
        .group("Q", "CASCADING", Some(&o), json!([{"slug": "acme/m"}]))
        .await;
    assert_eq!(
        get_group(&server, &quiet).await["effective_models"][0]["rate_limits"],
        json!([effective("TOKEN", "MINUTE", 100, &o)])
    );
}

/// The same tree in INDEPENDENT mode: each group's own declaration, or the nearest one.
#[tokio::test]
async fn worked_example_independent_effective_models() {
    let server = TestServer::start().await;
    server.create_endpoint("acme/m", "m").await;
    let o = server
        .group("O", "INDEPENDENT", None, token_minute("acme/m", 100))
        .await;
    let f = server
        .group("F", "INDEPENDENT", Some(&o), token_minute("acme/m", 70))
        .await;
    let e = server
        .group("E", "INDEPENDENT", Some(&o), token_minute("acme/m", 70))
        .await;
    for child in [&f, &e] {
        assert_eq!(
            get_group(&server, child).await["effective_models"],
            json!([{
                "slug": "acme/m",
                "rate_limits": [effective("TOKEN", "MINUTE", 70, child)],
                "usage_limits": [],
            }])
        );
    }
    assert_eq!(
        get_group(&server, &o).await["effective_models"][0]["rate_limits"],
        json!([effective("TOKEN", "MINUTE", 100, &o)])
    );
    // Inheriting: a grandchild declaring nothing gets the nearest declaration (F's).
    let g = server
        .group("G", "INDEPENDENT", Some(&f), json!([{"slug": "acme/m"}]))
        .await;
    assert_eq!(
        get_group(&server, &g).await["effective_models"][0]["rate_limits"],
        json!([effective("TOKEN", "MINUTE", 70, &f)])
    );
    // Changing an ancestor's value changes every descendant that inherits it.
    let inherit = server
        .group("I", "INDEPENDENT", Some(&o), json!([{"slug": "acme/m"}]))
        .await;
    ok_json(
        server
            .patch(
                &format!("/v1/gateway/groups/{o}"),
                &json!({"models": token_minute("acme/m", 40)}),
            )
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        get_group(&server, &inherit).await["effective_models"][0]["rate_limits"],
        json!([effective("TOKEN", "MINUTE", 40, &o)])
    );
    assert_eq!(
        get_group(&server, &f).await["effective_models"][0]["rate_limits"],
        json!([effective("TOKEN", "MINUTE", 70, &f)])
    );
}

/// CASES C08: a child above its parent is refused in CASCADING and free in INDEPENDENT.
#[tokio::test]
async fn c08_child_above_parent() {
    let server = TestServer::start().await;
    server.create_endpoint("acme/m", "m").await;
    let per_minute = |n| {
        json!([model(
            "acme/m",
            json!([rate("REQUEST", "MINUTE", n)]),
            json!([])
        )])
    };
    let a = server.group("A", "CASCADING", None, per_minute(60)).await;
    expect_error(
        post_group(&server, &body("B", "CASCADING", Some(&a), per_minute(600))).await,
        400,
        "exceeds_parent_limit",
        EXCEEDS,
    )
    .await;
    // Equal is fine; so is a grandchild checked against its grandparent.
    let b = server
        .group("B", "CASCADING", Some(&a), json!([{"slug": "acme/m"}]))
        .await;
    expect_error(
        post_group(&server, &body("C", "CASCADING", Some(&b), per_minute(61))).await,
        400,
        "exceeds_parent_limit",
        EXCEEDS,
    )
    .await;
    server
        .group("C", "CASCADING", Some(&b), per_minute(60))
        .await;

    let ia = server
        .group("IA", "INDEPENDENT", None, per_minute(60))
        .await;
    let ib = server
        .group("IB", "INDEPENDENT", Some(&ia), per_minute(600))
        .await;
    assert_eq!(
        get_group(&server, &ib).await["effective_models"][0]["rate_limits"],
        json!([effective("REQUEST", "MINUTE", 600, &ib)])
    );
}

/// CASES C09: bad numbers are refused with the field named; 0 is accepted.
#[tokio::test]
async fn c09_thresholds_must_be_integers_in_range() {
    let server = TestServer::start().await;
    server.create_endpoint("acme/m", "m").await;
    let field = "models[0].rate_limits[0].threshold";
    for bad in [
        json!(-1),
        json!(1.5),
        json!("10"),
        json!(18_446_744_073_709_551_616_f64),
        json!(null),
    ] {
        let models = json!([{"slug": "acme/m", "rate_limits": [{"type": "REQUEST", "unit": "MINUTE", "threshold": bad}]}]);
        expect_error_prefix(
            post_group(&server, &body("c", "CASCADING", None, models)).await,
            400,
            "invalid_payload",
            &format!("{field}: invalid "),
        )
        .await;
    }
    // 2^64 as an integer literal, exactly as a client would send it.
    let raw = r#"{"metadata": {"external_entity_id": "c"}, "hierarchy": {"limit_enforcement": "CASCADING", "parent_group_id": null},
        "models": [{"slug": "acme/m", "usage_limits": [{"type": "TOKEN", "unit": "DAY", "threshold": 18446744073709551616}]}]}"#;
    let response = server
        .http
        .post(server.url("/v1/gateway/groups"))
        .header("Authorization", format!("Api-Key {}", server.admin_key))
        .body(raw)
        .send()
        .await
        .unwrap();
    expect_error_prefix(
        response,
        400,
        "invalid_payload",
        "models[0].usage_limits[0].threshold: ",
    )
    .await;
    let missing =
        json!([{"slug": "acme/m", "rate_limits": [{"type": "REQUEST", "unit": "MINUTE"}]}]);
    expect_error(
        post_group(&server, &body("c", "CASCADING", None, missing)).await,
        400,
        "invalid_payload",
        "models[0].rate_limits[0]: missing field `threshold`",
    )
    .await;
    expect_error(
        post_group(
            &server,
            &body(
                "c",
                "CASCADING",
                None,
                token_minute("acme/m", 1_000_000_000_000_001),
            ),
        )
        .await,
        400,
        "invalid_payload",
        &format!("{field}: must be an integer in 0..=1000000000000000"),
    )
    .await;
    let max = server
        .create_group(body(
            "max",
            "CASCADING",
            None,
            token_minute("acme/m", 1_000_000_000_000_000),
        ))
        .await;
    assert_eq!(
        max["models"][0]["rate_limits"][0]["threshold"],
        1_000_000_000_000_000_u64
    );
    let zero = server
        .create_group(body("zero", "CASCADING", None, token_minute("acme/m", 0)))
        .await;
    assert_eq!(zero["models"][0]["rate_limits"][0]["threshold"], 0);
    assert_eq!(
        zero["effective_models"][0]["rate_limits"][0],
        effective("TOKEN", "MINUTE", 0, zero["id"].as_str().unwrap())
    );
}

#[tokio::test]
async fn limit_lists_follow_the_unit_rules() {
    let server = TestServer::start().await;
    server.create_endpoint("acme/m", "m").await;
    let server = &server;
    let post = |models: Value| {
        let b = body("c", "INDEPENDENT", None, models);
        async move { post_group(server, &b).await }
    };
    // CASES C14 needs per-second and per-minute limits of one type on one slug.
    let c14 = json!([model(
        "acme/m",
        json!([rate("REQUEST", "SECOND", 1), rate("REQUEST", "MINUTE", 3)]),
        json!([])
    )]);
    assert_eq!(post(c14).await.status(), 200);
    expect_error(
        post(json!([model(
            "acme/m",
            json!([rate("REQUEST", "MINUTE", 1), rate("REQUEST", "MINUTE", 2)]),
            json!([])
        )]))
        .await,
        400,
        "invalid_payload",
        "models[0].rate_limits[1]: duplicate rate limit REQUEST/MINUTE",
    )
    .await;
    expect_error(
        post(json!([model("acme/m", json!([rate("TOKEN", "DAY", 1)]), json!([]))])).await,
        400,
        "invalid_payload",
        "models[0].rate_limits[0].unit: rate limits use SECOND or MINUTE; DAY belongs in usage_limits",
    )
    .await;
    expect_error(
        post(json!([model(
            "acme/m",
            json!([]),
            json!([rate("TOKEN", "MINUTE", 1)])
        )]))
        .await,
        400,
        "invalid_payload",
        "models[0].usage_limits[0].unit: usage limits use DAY",
    )
    .await;
    expect_error(
        post(json!([model(
            "acme/m",
            json!([]),
            json!([rate("TOKEN", "DAY", 1), rate("TOKEN", "DAY", 2)])
        )]))
        .await,
        400,
        "invalid_payload",
        "models[0].usage_limits[1]: duplicate usage limit TOKEN/DAY",
    )
    .await;
    expect_error_prefix(
        post(json!([model(
            "acme/m",
            json!([rate("BYTES", "MINUTE", 1)]),
            json!([])
        )]))
        .await,
        400,
        "invalid_payload",
        "models[0].rate_limits[0].type: unknown variant `BYTES`",
    )
    .await;
    expect_error_prefix(
        post(json!([model(
            "acme/m",
            json!([rate("TOKEN", "HOUR", 1)]),
            json!([])
        )]))
        .await,
        400,
        "invalid_payload",
        "models[0].rate_limits[0].unit: unknown variant `HOUR`",
    )
    .await;
    expect_error(
        post(json!([{"slug": "acme/m"}, {"slug": "acme/m"}])).await,
        400,
        "invalid_payload",
        "models[1].slug: duplicate slug 'acme/m'",
    )
    .await;
}

#[tokio::test]
async fn create_payload_rules_name_the_field() {
    let server = TestServer::start().await;
    server.create_endpoint("acme/m", "m").await;
    let ok_models = json!([{"slug": "acme/m"}]);
    let server = &server;
    let post = |b: Value| async move { post_group(server, &b).await };
    expect_error(
        post(json!({"metadata": {"external_entity_id": "c"}, "hierarchy": {"limit_enforcement": "CASCADING", "parent_group_id": null}})).await,
        400,
        "invalid_payload",
        "body: missing field `models`",
    )
    .await;
    expect_error(
        post(body("c", "CASCADING", None, json!([]))).await,
        400,
        "invalid_payload",
        "models: must list at least one model",
    )
    .await;
    expect_error(
        post(json!({"metadata": {"external_entity_id": "c"}, "models": ok_models, "hierarchy": {"limit_enforcement": "CASCADING"}})).await,
        400,
        "invalid_payload",
        "hierarchy: missing field `parent_group_id`",
    )
    .await;
    expect_error(
        post(json!({"metadata": {"external_entity_id": "c"}, "models": ok_models, "hierarchy": {"parent_group_id": null}})).await,
        400,
        "invalid_payload",
        "hierarchy: missing field `limit_enforcement`",
    )
    .await;
    expect_error_prefix(
        post(body("c", "BOTH", None, ok_models.clone())).await,
        400,
        "invalid_payload",
        "hierarchy.limit_enforcement: unknown variant `BOTH`",
    )
    .await;
    expect_error(
        post(json!({"metadata": {"name": "x"}, "models": ok_models, "hierarchy": {"limit_enforcement": "CASCADING", "parent_group_id": null}})).await,
        400,
        "invalid_payload",
        "metadata: missing field `external_entity_id`",
    )
    .await;
    expect_error_prefix(
        post(json!({"metadata": {"external_entity_id": "c", "tier": "gold"}, "models": ok_models, "hierarchy": {"limit_enforcement": "CASCADING", "parent_group_id": null}})).await,
        400,
        "invalid_payload",
        "metadata.tier: unknown field `tier`",
    )
    .await;
    for (ext, message) in [
        (
            "".to_owned(),
            "metadata.external_entity_id: must be 1..=255 characters",
        ),
        (
            "x".repeat(256),
            "metadata.external_entity_id: must be 1..=255 characters",
        ),
        (
            "cust\r\n42".to_owned(),
            "metadata.external_entity_id: must not contain control characters (CR, LF, tab, ...)",
        ),
    ] {
        expect_error(
            post(body(&ext, "CASCADING", None, ok_models.clone())).await,
            400,
            "invalid_payload",
            message,
        )
        .await;
    }
    let mut long_name = body("c", "CASCADING", None, ok_models.clone());
    long_name["metadata"]["name"] = json!("n".repeat(256));
    expect_error(
        post(long_name).await,
        400,
        "invalid_payload",
        "metadata.name: must be at most 255 characters",
    )
    .await;
    let mut crlf_name = body("c", "CASCADING", None, ok_models.clone());
    crlf_name["metadata"]["name"] = json!("a\nb");
    expect_error(
        post(crlf_name).await,
        400,
        "invalid_payload",
        "metadata.name: must not contain control characters (CR, LF, tab, ...)",
    )
    .await;
    expect_error(
        post(body("c", "CASCADING", None, json!([{"slug": "acme/none"}]))).await,
        400,
        "unknown_model",
        "models[0].slug: no endpoint 'acme/none' exists in this workspace",
    )
    .await;
    expect_error(
        post(body("c", "CASCADING", None, json!([{"slug": "bad slug"}]))).await,
        400,
        "invalid_payload",
        "models[0].slug: must have the form prefix/name",
    )
    .await;
    // 255 characters are fine.
    let ok = server
        .create_group(body(&"x".repeat(255), "CASCADING", None, ok_models))
        .await;
    assert_eq!(
        ok["metadata"]["external_entity_id"].as_str().unwrap().len(),
        255
    );
}

/// An enum field (`type`, `unit`, `limit_enforcement`) holding a number, `null`, a list
/// or an object is a wrong type in valid JSON: 400 `invalid_payload` naming the field,
/// never `invalid_json` "expected value at line 1 column N".
#[tokio::test]
async fn enum_fields_of_the_wrong_type_name_the_field() {
    let server = TestServer::start().await;
    server.create_endpoint("acme/m", "m").await;
    for (bad, shown) in [
        (json!(null), "null"),
        (json!(1), "integer `1`"),
        (json!(true), "boolean `true`"),
        (json!(["TOKEN"]), "sequence"),
        (json!({"TOKEN": null}), "map"),
    ] {
        let models = json!([{"slug": "acme/m", "rate_limits": [{"type": bad, "unit": "MINUTE", "threshold": 1}]}]);
        expect_error(
            post_group(&server, &body("c", "CASCADING", None, models)).await,
            400,
            "invalid_payload",
            &format!(
                "models[0].rate_limits[0].type: invalid type: {shown}, expected `TOKEN` or `REQUEST`"
            ),
        )
        .await;
        let models = json!([{"slug": "acme/m", "usage_limits": [{"type": "TOKEN", "unit": bad, "threshold": 1}]}]);
        expect_error(
            post_group(&server, &body("c", "CASCADING", None, models)).await,
            400,
            "invalid_payload",
            &format!(
                "models[0].usage_limits[0].unit: invalid type: {shown}, expected one of `SECOND`, `MINUTE`, `DAY`"
            ),
        )
        .await;
        let mut wrong_mode = body("c", "CASCADING", None, json!([{"slug": "acme/m"}]));
        wrong_mode["hierarchy"]["limit_enforcement"] = bad;
        expect_error(
            post_group(&server, &wrong_mode).await,
            400,
            "invalid_payload",
            &format!(
                "hierarchy.limit_enforcement: invalid type: {shown}, expected `INDEPENDENT` or `CASCADING`"
            ),
        )
        .await;
    }
    // Strings still parse, and unknown strings keep serde's wording.
    expect_error(
        post_group(
            &server,
            &body(
                "c",
                "CASCADING",
                None,
                json!([{"slug": "acme/m", "rate_limits": [rate("WORD", "MINUTE", 1)]}]),
            ),
        )
        .await,
        400,
        "invalid_payload",
        "models[0].rate_limits[0].type: unknown variant `WORD`, expected `TOKEN` or `REQUEST`",
    )
    .await;
    server
        .create_group(body("c", "CASCADING", None, token_minute("acme/m", 1)))
        .await;
}

/// A number too large for any JSON parser's float (`1e400`) is valid JSON with an
/// out-of-range value: 400 `invalid_payload` naming the field.
#[tokio::test]
async fn numbers_beyond_any_float_name_the_field() {
    let server = TestServer::start().await;
    server.create_endpoint("acme/m", "m").await;
    for literal in ["1e400", "-1e400"] {
        let raw = format!(
            r#"{{"metadata": {{"external_entity_id": "c"}}, "hierarchy": {{"limit_enforcement": "CASCADING", "parent_group_id": null}},
            "models": [{{"slug": "acme/m", "rate_limits": [{{"type": "TOKEN", "unit": "MINUTE", "threshold": {literal}}}]}}]}}"#
        );
        let response = server
            .http
            .post(server.url("/v1/gateway/groups"))
            .header("Authorization", format!("Api-Key {}", server.admin_key))
            .body(raw)
            .send()
            .await
            .unwrap();
        expect_error(
            response,
            400,
            "invalid_payload",
            "models[0].rate_limits[0].threshold: number out of range",
        )
        .await;
    }
}

#[tokio::test]
async fn another_workspaces_endpoint_is_not_a_model() {
    let server = TestServer::start().await;
    let other = other_workspace(&server, "acme").await;
    let base = server.mock.base_url();
    ok_json(
        with_key(&server, Method::POST, "/v1/gateway/endpoints", &other)
            .json(&json!({"slug": "acme/theirs", "targets": [{"provider": "OPENAI_COMPATIBLE", "base_url": base, "target_model": "m"}]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    expect_error(
        post_group(
            &server,
            &body("c", "CASCADING", None, json!([{"slug": "acme/theirs"}])),
        )
        .await,
        400,
        "unknown_model",
        "models[0].slug: no endpoint 'acme/theirs' exists in this workspace",
    )
    .await;
}

#[tokio::test]
async fn external_ids_are_unique_among_live_groups_and_reusable_after_delete() {
    let server = TestServer::start().await;
    server.create_endpoint("acme/m", "m").await;
    let models = json!([{"slug": "acme/m"}]);
    let first = server
        .group("cust-42", "INDEPENDENT", None, models.clone())
        .await;
    expect_error(
        post_group(
            &server,
            &body("cust-42", "INDEPENDENT", None, models.clone()),
        )
        .await,
        400,
        "duplicate_external_entity_id",
        "metadata.external_entity_id: a live group of this workspace already has this id",
    )
    .await;
    ok_json(
        server
            .delete(&format!("/v1/gateway/groups/{first}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let second = server
        .group("cust-42", "INDEPENDENT", None, models.clone())
        .await;
    assert_ne!(first, second);
    // Another workspace may use the same external id.
    let other = other_workspace(&server, "acme").await;
    let base = server.mock.base_url();
    ok_json(
        with_key(&server, Method::POST, "/v1/gateway/endpoints", &other)
            .json(&json!({"slug": "acme/o", "targets": [{"provider": "OPENAI_COMPATIBLE", "base_url": base, "target_model": "m"}]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let theirs = with_key(&server, Method::POST, "/v1/gateway/groups", &other)
        .json(&body(
            "cust-42",
            "INDEPENDENT",
            None,
            json!([{"slug": "acme/o"}]),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(theirs.status(), 200);
}

#[tokio::test]
async fn parents_must_exist_share_the_mode_and_stay_within_five_levels() {
    let server = TestServer::start().await;
    server.create_endpoint("acme/m", "m").await;
    let models = json!([{"slug": "acme/m"}]);
    let parent_missing = "hierarchy.parent_group_id: parent group not found";
    expect_error(
        post_group(
            &server,
            &body("c", "CASCADING", Some("grp_missing"), models.clone()),
        )
        .await,
        404,
        "not_found",
        parent_missing,
    )
    .await;
    let root = server.group("L1", "CASCADING", None, models.clone()).await;
    expect_error(
        post_group(
            &server,
            &body("c", "INDEPENDENT", Some(&root), models.clone()),
        )
        .await,
        400,
        "mode_mismatch",
        "hierarchy.limit_enforcement: must match the parent group's mode (CASCADING)",
    )
    .await;
    let mut parent = root.clone();
    for level in 2..=5 {
        parent = server
            .group(
                &format!("L{level}"),
                "CASCADING",
                Some(&parent),
                models.clone(),
            )
            .await;
    }
    expect_error(
        post_group(
            &server,
            &body("L6", "CASCADING", Some(&parent), models.clone()),
        )
        .await,
        400,
        "max_depth_exceeded",
        "hierarchy.parent_group_id: the tree would be deeper than 5 levels",
    )
    .await;
    // A deleted parent, or one of another workspace, is not visible.
    let gone = server
        .group("gone", "CASCADING", None, models.clone())
        .await;
    ok_json(
        server
            .delete(&format!("/v1/gateway/groups/{gone}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    expect_error(
        post_group(
            &server,
            &body("c", "CASCADING", Some(&gone), models.clone()),
        )
        .await,
        404,
        "not_found",
        parent_missing,
    )
    .await;
    let other = other_workspace(&server, "acme").await;
    let base = server.mock.base_url();
    ok_json(
        with_key(&server, Method::POST, "/v1/gateway/endpoints", &other)
            .json(&json!({"slug": "acme/o", "targets": [{"provider": "OPENAI_COMPATIBLE", "base_url": base, "target_model": "m"}]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    expect_error(
        with_key(&server, Method::POST, "/v1/gateway/groups", &other)
            .json(&body(
                "c",
                "CASCADING",
                Some(&root),
                json!([{"slug": "acme/o"}]),
            ))
            .send()
            .await
            .unwrap(),
        404,
        "not_found",
        parent_missing,
    )
    .await;
}

#[tokio::test]
async fn patch_changes_name_and_models_only() {
    let server = TestServer::start().await;
    server.create_endpoint("acme/m", "m").await;
    server.create_endpoint("acme/x", "x").await;
    let id = server
        .group("cust", "INDEPENDENT", None, token_minute("acme/m", 10))
        .await;
    let path = format!("/v1/gateway/groups/{id}");
    let before = get_group(&server, &id).await;

    let renamed = ok_json(
        server
            .patch(&path, &json!({"metadata": {"name": "Renamed"}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        renamed["metadata"],
        json!({"name": "Renamed", "external_entity_id": "cust"})
    );
    assert_eq!(renamed["models"], before["models"]);
    let cleared = ok_json(
        server
            .patch(&path, &json!({"metadata": {"name": null}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(cleared["metadata"]["name"], Value::Null);

    let new_models = json!([model(
        "acme/x",
        json!([]),
        json!([rate("REQUEST", "DAY", 5)])
    )]);
    let replaced = ok_json(
        server
            .patch(&path, &json!({"models": new_models}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(replaced["models"], new_models);
    assert_eq!(
        replaced["effective_models"],
        json!([{"slug": "acme/x", "rate_limits": [], "usage_limits": [effective("REQUEST", "DAY", 5, &id)]}])
    );
    assert_eq!(replaced["created_at"], before["created_at"]);
    let emptied = ok_json(
        server
            .patch(&path, &json!({"models": []}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(emptied["models"], json!([]));
    assert_eq!(emptied["effective_models"], json!([]));

    for (patch, code, message) in [
        (
            json!({}),
            "empty_patch",
            "Request body changes nothing; send `metadata.name` and/or `models`",
        ),
        (
            json!({"metadata": {}}),
            "empty_patch",
            "Request body changes nothing; send `metadata.name` and/or `models`",
        ),
        (
            json!({"metadata": {"external_entity_id": "new"}}),
            "immutable_field",
            "metadata.external_entity_id: is immutable",
        ),
        (
            json!({"hierarchy": {"limit_enforcement": "CASCADING", "parent_group_id": null}}),
            "immutable_field",
            "hierarchy: is immutable (a group's mode and parent never change)",
        ),
        (
            json!({"hierarchy": null}),
            "immutable_field",
            "hierarchy: is immutable (a group's mode and parent never change)",
        ),
        (
            json!({"models": null}),
            "invalid_payload",
            "models: must be a list (`[]` removes all access)",
        ),
        (
            json!({"metadata": null}),
            "invalid_payload",
            "metadata: must be an object",
        ),
        (
            json!({"metadata": {"name": "x".repeat(256)}}),
            "invalid_payload",
            "metadata.name: must be at most 255 characters",
        ),
        (
            json!({"metadata": {"name": "a\r\nb"}}),
            "invalid_payload",
            "metadata.name: must not contain control characters (CR, LF, tab, ...)",
        ),
        (
            json!({"models": [{"slug": "acme/none"}]}),
            "unknown_model",
            "models[0].slug: no endpoint 'acme/none' exists in this workspace",
        ),
    ] {
        expect_error(
            server.patch(&path, &patch).send().await.unwrap(),
            400,
            code,
            message,
        )
        .await;
    }
    expect_error_prefix(
        server
            .patch(&path, &json!({"id": "grp_x"}))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_payload",
        "id: unknown field `id`",
    )
    .await;
    expect_error_prefix(
        server.patch(&path, &json!({"models": [model("acme/m", json!([{"type": "TOKEN", "unit": "MINUTE", "threshold": -5}]), json!([]))]})).send().await.unwrap(),
        400,
        "invalid_payload",
        "models[0].rate_limits[0].threshold: invalid value",
    )
    .await;
    expect_error(
        server
            .patch("/v1/gateway/groups/grp_missing", &json!({"models": []}))
            .send()
            .await
            .unwrap(),
        404,
        "not_found",
        "Group not found",
    )
    .await;
}

/// SPEC §1.5: a group keeps a slug whose endpoint was deleted; a PATCH may keep it too,
/// but may not add a slug that has no endpoint.
#[tokio::test]
async fn patch_keeps_slugs_whose_endpoint_was_deleted() {
    let server = TestServer::start().await;
    let endpoint = server.create_endpoint("acme/m", "m").await;
    server.create_endpoint("acme/x", "x").await;
    let id = server
        .group("cust", "INDEPENDENT", None, json!([{"slug": "acme/m"}]))
        .await;
    ok_json(
        server
            .delete(&format!(
                "/v1/gateway/endpoints/{}",
                endpoint["id"].as_str().unwrap()
            ))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let path = format!("/v1/gateway/groups/{id}");
    assert_eq!(get_group(&server, &id).await["models"][0]["slug"], "acme/m");
    let kept = ok_json(
        server
            .patch(&path, &json!({"models": [{"slug": "acme/x"}, model("acme/m", json!([rate("REQUEST", "MINUTE", 1)]), json!([]))]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(kept["models"][1]["slug"], "acme/m");
    ok_json(
        server
            .patch(&path, &json!({"models": [{"slug": "acme/x"}]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    expect_error(
        server
            .patch(
                &path,
                &json!({"models": [{"slug": "acme/x"}, {"slug": "acme/m"}]}),
            )
            .send()
            .await
            .unwrap(),
        400,
        "unknown_model",
        "models[1].slug: no endpoint 'acme/m' exists in this workspace",
    )
    .await;
}

/// CASCADING PATCH is checked both ways: a child may not rise above an ancestor, and a
/// parent may not drop below a descendant's declaration.
#[tokio::test]
async fn cascading_patch_is_checked_against_ancestors_and_descendants() {
    let server = TestServer::start().await;
    server.create_endpoint("acme/m", "m").await;
    let o = server
        .group("O", "CASCADING", None, token_minute("acme/m", 100))
        .await;
    let f = server
        .group("F", "CASCADING", Some(&o), token_minute("acme/m", 70))
        .await;
    let leaf = server
        .group("L", "CASCADING", Some(&f), token_minute("acme/m", 50))
        .await;
    let o_path = format!("/v1/gateway/groups/{o}");
    let f_path = format!("/v1/gateway/groups/{f}");
    let patch = |path: &str, n: u64| {
        server
            .patch(path, &json!({"models": token_minute("acme/m", n)}))
            .send()
    };

    expect_error(
        patch(&f_path, 101).await.unwrap(),
        400,
        "exceeds_parent_limit",
        EXCEEDS,
    )
    .await;
    expect_error(
        patch(&o_path, 69).await.unwrap(),
        400,
        "exceeds_parent_limit",
        EXCEEDS,
    )
    .await;
    expect_error(
        patch(&f_path, 49).await.unwrap(),
        400,
        "exceeds_parent_limit",
        EXCEEDS,
    )
    .await;
    // Refused PATCHes changed nothing.
    assert_eq!(
        get_group(&server, &o).await["models"],
        token_minute("acme/m", 100)
    );
    assert_eq!(
        get_group(&server, &f).await["models"],
        token_minute("acme/m", 70)
    );

    ok_json(patch(&f_path, 100).await.unwrap()).await;
    ok_json(patch(&o_path, 100).await.unwrap()).await;
    ok_json(patch(&f_path, 50).await.unwrap()).await;
    assert_eq!(
        get_group(&server, &leaf).await["effective_models"][0]["rate_limits"],
        json!([
            effective("TOKEN", "MINUTE", 50, &leaf),
            effective("TOKEN", "MINUTE", 50, &f),
            effective("TOKEN", "MINUTE", 100, &o),
        ])
    );
    // With F declaring nothing, the grandchild's 50 still bounds the root.
    ok_json(
        server
            .patch(&f_path, &json!({"models": [{"slug": "acme/m"}]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    expect_error(
        patch(&o_path, 49).await.unwrap(),
        400,
        "exceeds_parent_limit",
        EXCEEDS,
    )
    .await;
    // Removing the root's limit is always allowed (unlimited is above everything).
    ok_json(
        server
            .patch(&o_path, &json!({"models": [{"slug": "acme/m"}]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
}

#[tokio::test]
async fn delete_removes_the_subtree_and_revokes_its_keys() {
    let server = TestServer::start().await;
    server.create_endpoint("acme/m", "m").await;
    let models = json!([{"slug": "acme/m"}]);
    let o = server.group("O", "CASCADING", None, models.clone()).await;
    let a = server
        .group("A", "CASCADING", Some(&o), models.clone())
        .await;
    let b = server
        .group("B", "CASCADING", Some(&a), models.clone())
        .await;
    let sibling = server
        .group("S", "CASCADING", Some(&o), models.clone())
        .await;
    let key_a = server.create_key(&a).await;
    let key_b = server.create_key(&b).await;
    let key_o = server.create_key(&o).await;

    let deleted = ok_json(
        server
            .delete(&format!("/v1/gateway/groups/{a}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(deleted["id"], a.as_str());
    assert_eq!(
        deleted["metadata"],
        json!({"name": "A", "external_entity_id": "A"})
    );
    assert!(is_rfc3339_utc(&deleted["deleted_at"]));
    assert_eq!(deleted.as_object().unwrap().len(), 3);

    for gone in [&a, &b] {
        expect_error(
            server
                .get(&format!("/v1/gateway/groups/{gone}"))
                .send()
                .await
                .unwrap(),
            404,
            "not_found",
            "Group not found",
        )
        .await;
    }
    for key in [&key_a, &key_b] {
        assert!(server
            .store
            .resolve_api_key(&key[..16])
            .await
            .unwrap()
            .is_none());
    }
    assert!(server
        .store
        .resolve_api_key(&key_o[..16])
        .await
        .unwrap()
        .is_some());
    get_group(&server, &o).await;
    get_group(&server, &sibling).await;
    let list = ok_json(server.get("/v1/gateway/groups").send().await.unwrap()).await;
    let ids: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![o.as_str(), sibling.as_str()]);
    for response in [
        server
            .delete(&format!("/v1/gateway/groups/{a}"))
            .send()
            .await
            .unwrap(),
        server
            .delete(&format!("/v1/gateway/groups/{b}"))
            .send()
            .await
            .unwrap(),
        server
            .get(&format!("/v1/gateway/groups/{b}/usage"))
            .send()
            .await
            .unwrap(),
        server
            .patch(&format!("/v1/gateway/groups/{b}"), &json!({"models": []}))
            .send()
            .await
            .unwrap(),
    ] {
        expect_error(response, 404, "not_found", "Group not found").await;
    }
}

#[tokio::test]
async fn list_filters_and_pages_groups() {
    let server = TestServer::start().await;
    server.create_endpoint("acme/m", "m").await;
    let models = json!([{"slug": "acme/m"}]);
    let root = server
        .group("root", "INDEPENDENT", None, token_minute("acme/m", 100))
        .await;
    let c1 = server
        .group("c1", "INDEPENDENT", Some(&root), models.clone())
        .await;
    let c2 = server
        .group("c2", "INDEPENDENT", Some(&root), models.clone())
        .await;
    server
        .group("gc", "INDEPENDENT", Some(&c1), models.clone())
        .await;

    let ids_of = |page: &Value| -> Vec<String> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let by_ext = ok_json(
        server
            .get("/v1/gateway/groups?external_entity_id=c2")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(ids_of(&by_ext), vec![c2.clone()]);
    assert_eq!(by_ext["items"][0], get_group(&server, &c2).await);
    let none = ok_json(
        server
            .get("/v1/gateway/groups?external_entity_id=C2")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(ids_of(&none), Vec::<String>::new());
    let children = ok_json(
        server
            .get(&format!("/v1/gateway/groups?parent_group_id={root}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(ids_of(&children), vec![c1.clone(), c2.clone()]);
    let first = ok_json(
        server
            .get("/v1/gateway/groups?limit=3")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(first["items"].as_array().unwrap().len(), 3);
    assert_eq!(first["pagination"]["has_more"], true);
    let cursor = first["pagination"]["cursor"].as_str().unwrap();
    let second = ok_json(
        server
            .get(&format!("/v1/gateway/groups?limit=3&cursor={cursor}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(second["items"].as_array().unwrap().len(), 1);
    assert_eq!(
        second["pagination"],
        json!({"has_more": false, "cursor": null})
    );
    expect_error(
        server.get("/v1/gateway/groups?parent=x").send().await.unwrap(),
        400,
        "invalid_query",
        "parent: unknown query parameter (accepted: limit, cursor, external_entity_id, parent_group_id)",
    )
    .await;
}

#[tokio::test]
async fn another_workspaces_group_is_403_and_absent_is_404() {
    let server = TestServer::start().await;
    let other = other_workspace(&server, "acme").await;
    let base = server.mock.base_url();
    ok_json(
        with_key(&server, Method::POST, "/v1/gateway/endpoints", &other)
            .json(&json!({"slug": "acme/o", "targets": [{"provider": "OPENAI_COMPATIBLE", "base_url": base, "target_model": "m"}]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let theirs = ok_json(
        with_key(&server, Method::POST, "/v1/gateway/groups", &other)
            .json(&body("t", "CASCADING", None, json!([{"slug": "acme/o"}])))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let id = theirs["id"].as_str().unwrap();
    let path = format!("/v1/gateway/groups/{id}");
    let message = "Group belongs to another workspace";
    for response in [
        server.get(&path).send().await.unwrap(),
        server
            .patch(&path, &json!({"models": []}))
            .send()
            .await
            .unwrap(),
        server.delete(&path).send().await.unwrap(),
        server.get(&format!("{path}/usage")).send().await.unwrap(),
        server
            .get(&format!("{path}/api_keys"))
            .send()
            .await
            .unwrap(),
    ] {
        expect_error(response, 403, "forbidden", message).await;
    }
    let mine = ok_json(server.get("/v1/gateway/groups").send().await.unwrap()).await;
    assert_eq!(mine["items"], json!([]));
    let (status, body) = status_json(
        server
            .get("/v1/gateway/groups/grp_nope")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body),
        (
            404,
            json!({"error": "Group not found", "code": "not_found"})
        )
    );
}

fn event(group: &Value, slug: &str, tokens: u64, at: Timestamp) -> UsageEvent {
    let id = tollgate_core::ids::new_id(tollgate_core::ids::IdKind::Event);
    UsageEvent {
        idempotency_key: id.clone(),
        timestamp: at,
        request_id: id,
        request_metadata: None,
        model_slug: slug.into(),
        external_entity_id: group["metadata"]["external_entity_id"]
            .as_str()
            .unwrap()
            .into(),
        api_key_prefix: "tg_test000000000".into(),
        group_id: group["id"].as_str().unwrap().into(),
        workspace_id: String::new(),
        status: UsageStatus::Completed,
        input_tokens: tokens / 2,
        output_tokens: tokens - tokens / 2,
        cached_input_tokens: 0,
        is_estimated: false,
    }
}

async fn record(server: &TestServer, group: &Value, slug: &str, tokens: u64, at: Timestamp) {
    let mut e = event(group, slug, tokens, at);
    let stored = server
        .store
        .group(group["id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    e.workspace_id = stored.workspace_id;
    server.store.insert_usage_event(&e).await.unwrap();
}

/// SPEC §1.2 usage report, CASCADING: an ancestor's DAY limit reads the ancestor's pool
/// (its own traffic and every descendant's); the group's own limit reads its own.
#[tokio::test]
async fn usage_reports_each_day_limit_on_its_counter_cascading() {
    let server = TestServer::start().await;
    server.create_endpoint("acme/m", "m").await;
    server.create_endpoint("acme/x", "x").await;
    let day = |kind: &str, n: u64| rate(kind, "DAY", n);
    let o = server
        .create_group(body(
            "O",
            "CASCADING",
            None,
            json!([
                model("acme/m", json!([rate("REQUEST", "MINUTE", 10)]), json!([day("TOKEN", 1000), day("REQUEST", 50)])),
                {"slug": "acme/x"},
            ]),
        ))
        .await;
    let o_id = o["id"].as_str().unwrap();
    let c = server
        .create_group(body(
            "C",
            "CASCADING",
            Some(o_id),
            json!([model("acme/m", json!([]), json!([day("TOKEN", 100)])), {"slug": "acme/x"}]),
        ))
        .await;
    let s = server
        .create_group(body(
            "S",
            "CASCADING",
            Some(o_id),
            json!([{"slug": "acme/m"}]),
        ))
        .await;
    let c_id = c["id"].as_str().unwrap();
    let usage_path = format!("/v1/gateway/groups/{c_id}/usage");

    let empty = ok_json(server.get(&usage_path).send().await.unwrap()).await;
    assert_eq!(
        empty,
        json!({"customer_id": "C", "usage": {
            "acme/m": [
                {"type": "TOKEN", "unit": "DAY", "threshold": 100, "current_usage": null, "reset_at": null, "source_group": c_id},
                {"type": "TOKEN", "unit": "DAY", "threshold": 1000, "current_usage": null, "reset_at": null, "source_group": o_id},
                {"type": "REQUEST", "unit": "DAY", "threshold": 50, "current_usage": null, "reset_at": null, "source_group": o_id},
            ],
            "acme/x": [],
        }})
    );

    let now = SystemClock.now();
    record(&server, &c, "acme/m", 30, now).await;
    record(&server, &c, "acme/m", 10, now).await;
    record(&server, &s, "acme/m", 50, now).await;
    record(&server, &o, "acme/m", 7, now).await;
    record(&server, &c, "acme/x", 999, now).await;
    // Yesterday's traffic is not today's.
    record(
        &server,
        &c,
        "acme/m",
        500,
        Timestamp(now.utc_day_start().0 - 1),
    )
    .await;

    let report = ok_json(server.get(&usage_path).send().await.unwrap()).await;
    let reset = now.next_utc_midnight().to_rfc3339();
    assert_eq!(
        report["usage"]["acme/m"],
        json!([
            {"type": "TOKEN", "unit": "DAY", "threshold": 100, "current_usage": 40, "reset_at": reset, "source_group": c_id},
            {"type": "TOKEN", "unit": "DAY", "threshold": 1000, "current_usage": 97, "reset_at": reset, "source_group": o_id},
            {"type": "REQUEST", "unit": "DAY", "threshold": 50, "current_usage": 4, "reset_at": reset, "source_group": o_id},
        ])
    );
    assert_eq!(report["usage"]["acme/x"], json!([]));
}

/// INDEPENDENT: an inherited DAY limit is enforced on the group's own counter, so the
/// report counts the group's traffic alone.
#[tokio::test]
async fn usage_reports_own_counter_independent() {
    let server = TestServer::start().await;
    server.create_endpoint("acme/m", "m").await;
    let o = server
        .create_group(body(
            "O",
            "INDEPENDENT",
            None,
            json!([model(
                "acme/m",
                json!([]),
                json!([rate("TOKEN", "DAY", 1000)])
            )]),
        ))
        .await;
    let o_id = o["id"].as_str().unwrap();
    let c = server
        .create_group(body(
            "C",
            "INDEPENDENT",
            Some(o_id),
            json!([{"slug": "acme/m"}]),
        ))
        .await;
    let now = SystemClock.now();
    record(&server, &c, "acme/m", 30, now).await;
    record(&server, &o, "acme/m", 500, now).await;
    let reset = now.next_utc_midnight().to_rfc3339();
    let child = ok_json(
        server
            .get(&format!(
                "/v1/gateway/groups/{}/usage",
                c["id"].as_str().unwrap()
            ))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        child,
        json!({"customer_id": "C", "usage": {"acme/m": [
            {"type": "TOKEN", "unit": "DAY", "threshold": 1000, "current_usage": 30, "reset_at": reset, "source_group": o_id},
        ]}})
    );
    let root = ok_json(
        server
            .get(&format!("/v1/gateway/groups/{o_id}/usage"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(root["usage"]["acme/m"][0]["current_usage"], 500);
}

/// A deleted child's spend today stays in its ancestors' CASCADING pools: deleting
/// children must never refill a parent's daily budget.
#[tokio::test]
async fn a_deleted_childs_spend_stays_in_the_parents_pool() {
    let server = TestServer::start().await;
    server.create_endpoint("acme/m", "m").await;
    let o = server
        .create_group(body(
            "O",
            "CASCADING",
            None,
            json!([model(
                "acme/m",
                json!([]),
                json!([rate("TOKEN", "DAY", 30)])
            )]),
        ))
        .await;
    let o_id = o["id"].as_str().unwrap();
    let c = server
        .create_group(body(
            "C",
            "CASCADING",
            Some(o_id),
            json!([{"slug": "acme/m"}]),
        ))
        .await;
    record(&server, &c, "acme/m", 15, SystemClock.now()).await;
    let usage_path = format!("/v1/gateway/groups/{o_id}/usage");
    let before = ok_json(server.get(&usage_path).send().await.unwrap()).await;
    assert_eq!(before["usage"]["acme/m"][0]["current_usage"], 15);

    let c_id = c["id"].as_str().unwrap();
    ok_json(
        server
            .delete(&format!("/v1/gateway/groups/{c_id}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let after = ok_json(server.get(&usage_path).send().await.unwrap()).await;
    assert_eq!(after["usage"]["acme/m"][0]["current_usage"], 15);
}
