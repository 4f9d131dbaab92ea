//! `GET /v1/spec`: the OpenAPI 3.1 document of Tollgate's HTTP routes (SPEC §1.1).
//!
//! Written by hand next to the handlers rather than derived, so it stays readable; the
//! integration test `spec_lists_only_routes_that_exist` requests every management
//! operation it lists and fails if one is not routed.

use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use crate::AdminState;

pub fn router() -> Router<AdminState> {
    Router::new().route("/v1/spec", get(spec))
}

async fn spec() -> Json<Value> {
    Json(document())
}

fn schema(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn list_of(item: &str) -> Value {
    json!({
        "type": "object",
        "required": ["items", "pagination"],
        "properties": {
            "items": { "type": "array", "items": schema(item) },
            "pagination": schema("Pagination"),
        }
    })
}

fn object(required: &[&str], properties: Value) -> Value {
    json!({
        "type": "object",
        "additionalProperties": false,
        "required": required,
        "properties": properties,
    })
}

/// One operation: its summary, request body schema (if any), 200 schema and the error
/// statuses it can answer besides 401/403 (which every management route has).
fn operation(summary: &str, body: Option<Value>, ok: Value, errors: &[u16]) -> Value {
    let mut responses = Map::new();
    responses.insert(
        "200".into(),
        json!({ "description": "Success", "content": { "application/json": { "schema": ok } } }),
    );
    for status in errors.iter().chain(&[401, 403]) {
        responses.insert(
            status.to_string(),
            json!({ "$ref": "#/components/responses/Error" }),
        );
    }
    let mut op = json!({ "summary": summary, "responses": responses });
    if let (Some(body), Value::Object(fields)) = (body, &mut op) {
        fields.insert(
            "requestBody".into(),
            json!({ "required": true, "content": { "application/json": { "schema": body } } }),
        );
    }
    op
}

fn with_params(mut op: Value, params: &[&str]) -> Value {
    let list: Vec<Value> = params
        .iter()
        .map(|p| json!({ "$ref": format!("#/components/parameters/{p}") }))
        .collect();
    if let Value::Object(fields) = &mut op {
        fields.insert("parameters".into(), Value::Array(list));
    }
    op
}

fn management_paths() -> Value {
    let id = ["id"];
    let group_key = ["id", "prefix"];
    let list = ["limit", "cursor"];
    json!({
        "/v1/gateway/endpoints": {
            "post": operation("Create an endpoint", Some(schema("CreateEndpoint")), schema("Endpoint"), &[400]),
            "get": with_params(operation("List endpoints", None, list_of("Endpoint"), &[400]), &list),
        },
        "/v1/gateway/endpoints/{id}": {
            "get": with_params(operation("Get an endpoint", None, schema("Endpoint"), &[404]), &id),
            "patch": with_params(operation("Replace an endpoint's targets", Some(object(&["targets"], json!({"targets": {"type": "array", "minItems": 1, "maxItems": 8, "items": schema("Target")}}))), schema("Endpoint"), &[400, 404]), &id),
            "delete": with_params(operation("Delete an endpoint", None, object(&["id", "slug"], json!({"id": {"type": "string"}, "slug": {"type": "string"}})), &[404]), &id),
        },
        "/v1/gateway/secrets": {
            "post": operation("Store a secret", Some(object(&["name", "value"], json!({"name": {"type": "string", "minLength": 1, "maxLength": 255}, "value": {"type": "string", "minLength": 1}}))), schema("SecretRef"), &[400]),
            "get": with_params(operation("List secrets", None, list_of("Secret"), &[400]), &list),
        },
        "/v1/gateway/secrets/{id}": {
            "get": with_params(operation("Get a secret's metadata", None, schema("Secret"), &[404]), &id),
            "delete": with_params(operation("Delete a secret", None, schema("SecretRef"), &[404]), &id),
        },
        "/v1/gateway/groups": {
            "post": operation("Create a group", Some(schema("CreateGroup")), schema("Group"), &[400, 404]),
            "get": with_params(operation("List groups", None, list_of("Group"), &[400]), &["limit", "cursor", "external_entity_id", "parent_group_id"]),
        },
        "/v1/gateway/groups/{id}": {
            "get": with_params(operation("Get a group", None, schema("Group"), &[404]), &id),
            "patch": with_params(operation("Change a group's name or models", Some(schema("PatchGroup")), schema("Group"), &[400, 404]), &id),
            "delete": with_params(operation("Delete a group, its subtree and their keys", None, object(&["id", "metadata", "deleted_at"], json!({"id": {"type": "string"}, "metadata": schema("GroupMetadata"), "deleted_at": {"type": "string", "format": "date-time"}})), &[404]), &id),
        },
        "/v1/gateway/groups/{id}/usage": {
            "get": with_params(operation("Today's usage against each DAY limit", None, schema("GroupUsage"), &[404]), &id),
        },
        "/v1/gateway/groups/{id}/api_keys": {
            "post": with_params(operation("Mint an API key (shown once)", Some(object(&[], json!({"name": {"type": ["string", "null"], "maxLength": 255}}))), object(&["api_key", "prefix", "name"], json!({"api_key": {"type": "string"}, "prefix": {"type": "string"}, "name": {"type": ["string", "null"]}})), &[400, 404]), &id),
            "get": with_params(operation("List a group's API keys", None, list_of("ApiKey"), &[400, 404]), &["id", "limit", "cursor"]),
        },
        "/v1/gateway/groups/{id}/api_keys/register": {
            "post": with_params(operation("Adopt an operator-issued key (body signed with Ed25519 in X-Baseten-Signature)", Some(object(&["key"], json!({"key": {"type": "string", "minLength": 32, "maxLength": 128}, "name": {"type": ["string", "null"]}}))), schema("Ok"), &[400, 404]), &["id", "signature"]),
        },
        "/v1/gateway/groups/{id}/api_keys/{prefix}": {
            "get": with_params(operation("Get an API key", None, schema("ApiKey"), &[404]), &group_key),
            "delete": with_params(operation("Revoke an API key", None, object(&["prefix"], json!({"prefix": {"type": "string"}})), &[404]), &group_key),
        },
        "/v1/gateway/signing_key": {
            "put": operation("Set the workspace's Ed25519 public key", Some(object(&["public_key"], json!({"public_key": {"type": "string", "description": "base64 of the raw 32-byte key"}}))), schema("Ok"), &[400]),
            "get": operation("Show the workspace's public key", None, object(&["public_key"], json!({"public_key": {"type": ["string", "null"]}})), &[]),
        },
        "/v1/gateway/management_keys": {
            "post": operation("Mint a management key (shown once)", Some(object(&["scope"], json!({"name": {"type": ["string", "null"]}, "scope": {"enum": ["manage", "view"]}}))), schema("NewManagementKey"), &[400]),
            "get": with_params(operation("List management keys", None, list_of("ManagementKey"), &[400]), &list),
        },
        "/v1/gateway/management_keys/{prefix}": {
            "delete": with_params(operation("Revoke a management key", None, object(&["prefix"], json!({"prefix": {"type": "string"}})), &[404]), &["prefix"]),
        },
        "/v1/gateway/webhook_endpoints": {
            "post": operation("Create a webhook endpoint (its secret is shown once)", Some(schema("CreateWebhookEndpoint")), schema("CreatedWebhookEndpoint"), &[400]),
            "get": with_params(operation("List webhook endpoints", None, list_of("WebhookEndpoint"), &[400]), &list),
        },
        "/v1/gateway/webhook_endpoints/{id}": {
            "get": with_params(operation("Get a webhook endpoint", None, schema("WebhookEndpoint"), &[404]), &id),
            "delete": with_params(operation("Delete a webhook endpoint", None, object(&["id"], json!({"id": {"type": "string"}})), &[404]), &id),
        },
        "/v1/gateway/webhook_endpoints/{id}/rotate_secret": {
            "post": with_params(operation("Replace the signing secret (shown once); the old one keeps signing for 24 h", None, object(&["id", "secret"], json!({"id": {"type": "string"}, "secret": {"type": "string", "pattern": "^whsec_"}})), &[400, 404]), &id),
        },
        "/v1/gateway/webhook_endpoints/{id}/deliveries": {
            "get": with_params(operation("List an endpoint's deliveries, oldest first", None, list_of("WebhookDelivery"), &[400, 404]), &["id", "limit", "cursor"]),
        },
        "/v1/gateway/webhook_endpoints/{id}/deliveries/{delivery_id}/retry": {
            "post": with_params(operation("Send a delivery again (same id, same bytes)", None, schema("WebhookDelivery"), &[400, 404]), &["id", "delivery_id"]),
        },
        "/v1/gateway/events": {
            "get": with_params(operation("Usage events in storage order, filtered", None, list_of("UsageEvent"), &[400]), &["limit", "cursor", "start_time", "end_time", "external_entity_id", "api_key_prefix"]),
        },
    })
}

fn data_plane_paths() -> Value {
    let proxied = |summary: &str| {
        json!({
            "post": {
                "summary": summary,
                "security": [{ "bearer": [] }],
                "requestBody": { "required": true, "content": { "application/json": { "schema": { "type": "object", "required": ["model"], "properties": { "model": { "type": "string", "description": "the endpoint slug" } } } } } },
                "responses": {
                    "200": { "description": "The upstream's answer (JSON, or text/event-stream when streaming)" },
                    "400": { "description": "Malformed request" },
                    "401": { "description": "Missing, unknown or revoked key" },
                    "404": { "description": "Model not callable by this key" },
                    "413": { "description": "Body over the configured limit" },
                    "429": { "description": "Rate or usage limit reached; see Retry-After" },
                    "502": { "description": "Upstream unreachable" },
                    "504": { "description": "Upstream timed out before the first byte" },
                }
            }
        })
    };
    json!({
        "/v1/chat/completions": proxied("OpenAI-compatible chat completion"),
        "/v1/completions": proxied("OpenAI-compatible completion"),
        "/v1/embeddings": proxied("OpenAI-compatible embeddings"),
        "/v1/models": { "get": { "summary": "The key's callable slugs", "security": [{ "bearer": [] }], "responses": { "200": { "description": "OpenAI list of models" }, "401": { "description": "Missing, unknown or revoked key" } } } },
    })
}

fn limit_entry(unit: &[&str], with_source: bool) -> Value {
    let mut properties = json!({
        "type": { "enum": ["TOKEN", "REQUEST"] },
        "unit": { "enum": unit },
        "threshold": { "type": "integer", "minimum": 0, "maximum": 1_000_000_000_000_000_u64, "description": "0 blocks every request" },
    });
    let mut required = vec!["type", "unit", "threshold"];
    if with_source {
        if let Value::Object(p) = &mut properties {
            p.insert("source_group".into(), json!({ "type": "string" }));
        }
        required.push("source_group");
    }
    object(&required, properties)
}

fn model_access(with_source: bool) -> Value {
    object(
        &["slug"],
        json!({
            "slug": { "type": "string" },
            "rate_limits": { "type": "array", "items": limit_entry(&["SECOND", "MINUTE"], with_source) },
            "usage_limits": { "type": "array", "items": limit_entry(&["DAY"], with_source) },
        }),
    )
}

fn schemas() -> Value {
    let time = json!({ "type": "string", "format": "date-time" });
    let nullable_string = json!({ "type": ["string", "null"] });
    json!({
        "Error": object(&["error", "code"], json!({"error": {"type": "string"}, "code": {"type": "string"}})),
        "Ok": object(&["ok"], json!({"ok": {"const": true}})),
        "Pagination": object(&["has_more", "cursor"], json!({"has_more": {"type": "boolean"}, "cursor": nullable_string})),
        "Target": object(&["provider", "base_url", "target_model"], json!({
            "provider": {"enum": ["OPENAI_COMPATIBLE"]},
            "base_url": {"type": "string", "format": "uri"},
            "target_model": {"type": "string"},
            "secret_id": nullable_string,
        })),
        "CreateEndpoint": object(&["slug", "targets"], json!({
            "slug": {"type": "string", "pattern": "^[A-Za-z0-9._-]+/[A-Za-z0-9._-]+$"},
            "targets": {"type": "array", "minItems": 1, "maxItems": 8, "items": schema("Target")},
            "region": {"enum": ["UNRESTRICTED", "EU"]},
        })),
        "Endpoint": object(&["id", "slug", "region", "targets", "created_at", "updated_at"], json!({
            "id": {"type": "string"}, "slug": {"type": "string"}, "region": {"enum": ["UNRESTRICTED", "EU"]},
            "targets": {"type": "array", "items": schema("Target")}, "created_at": time, "updated_at": time,
        })),
        "SecretRef": object(&["id", "name"], json!({"id": {"type": "string"}, "name": {"type": "string"}})),
        "Secret": object(&["id", "name", "created_at"], json!({"id": {"type": "string"}, "name": {"type": "string"}, "created_at": time})),
        "ModelAccess": model_access(false),
        "EffectiveModel": model_access(true),
        "GroupMetadata": object(&["external_entity_id"], json!({"name": nullable_string, "external_entity_id": {"type": "string", "minLength": 1, "maxLength": 255}})),
        "Hierarchy": object(&["limit_enforcement", "parent_group_id"], json!({"limit_enforcement": {"enum": ["INDEPENDENT", "CASCADING"]}, "parent_group_id": nullable_string})),
        "CreateGroup": object(&["metadata", "models", "hierarchy"], json!({
            "metadata": schema("GroupMetadata"),
            "models": {"type": "array", "minItems": 1, "items": schema("ModelAccess")},
            "hierarchy": schema("Hierarchy"),
        })),
        "PatchGroup": object(&[], json!({
            "metadata": object(&[], json!({"name": nullable_string})),
            "models": {"type": "array", "items": schema("ModelAccess")},
        })),
        "Group": object(&["id", "metadata", "models", "effective_models", "hierarchy", "created_at"], json!({
            "id": {"type": "string"},
            "metadata": schema("GroupMetadata"),
            "models": {"type": "array", "items": schema("ModelAccess")},
            "effective_models": {"type": "array", "items": schema("EffectiveModel")},
            "hierarchy": schema("Hierarchy"),
            "created_at": time,
        })),
        "GroupUsage": object(&["customer_id", "usage"], json!({
            "customer_id": {"type": "string"},
            "usage": {"type": "object", "additionalProperties": {"type": "array", "items": object(
                &["type", "unit", "threshold", "current_usage", "reset_at", "source_group"],
                json!({
                    "type": {"enum": ["TOKEN", "REQUEST"]}, "unit": {"const": "DAY"},
                    "threshold": {"type": "integer"}, "current_usage": {"type": ["integer", "null"]},
                    "reset_at": {"type": ["string", "null"], "format": "date-time"}, "source_group": {"type": "string"},
                }),
            )}},
        })),
        "ApiKey": object(&["prefix", "name", "created_at"], json!({"prefix": {"type": "string"}, "name": nullable_string, "created_at": time})),
        "ManagementKey": object(&["prefix", "name", "scope", "created_at"], json!({"prefix": {"type": "string"}, "name": nullable_string, "scope": {"enum": ["manage", "view"]}, "created_at": time})),
        "CreateWebhookEndpoint": object(&["url"], json!({
            "url": {"type": "string", "format": "uri", "maxLength": 2048},
            "description": {"type": ["string", "null"], "maxLength": 1000},
        })),
        "WebhookEndpoint": object(&["id", "url", "description", "created_at"], json!({
            "id": {"type": "string"}, "url": {"type": "string"}, "description": nullable_string, "created_at": time,
        })),
        "CreatedWebhookEndpoint": object(&["id", "url", "description", "secret", "created_at"], json!({
            "id": {"type": "string"}, "url": {"type": "string"}, "description": nullable_string,
            "secret": {"type": "string", "pattern": "^whsec_"}, "created_at": time,
        })),
        "WebhookDelivery": object(&["id", "status", "attempts", "event_count", "created_at", "last_attempt_at", "next_attempt_at", "last_response_status", "last_error"], json!({
            "id": {"type": "string", "description": "also the webhook-id and X-Baseten-Request-ID of every attempt"},
            "status": {"enum": ["pending", "delivered", "failed"]},
            "attempts": {"type": "integer"}, "event_count": {"type": "integer"},
            "created_at": time,
            "last_attempt_at": {"type": ["string", "null"], "format": "date-time"},
            "next_attempt_at": {"type": ["string", "null"], "format": "date-time"},
            "last_response_status": {"type": ["integer", "null"]},
            "last_error": nullable_string,
        })),
        "UsageEvent": object(&["idempotencyKey", "timestamp", "requestId", "requestMetadata", "modelSlug", "externalEntityId", "externalCustomerId", "apiKeyPrefix", "groupId", "status", "tokens"], json!({
            "idempotencyKey": {"type": "string"},
            "timestamp": {"type": "integer", "description": "milliseconds since the epoch, UTC"},
            "requestId": {"type": "string"},
            "requestMetadata": {"type": ["object", "null"], "description": "the X-Request-Metadata object as sent"},
            "modelSlug": {"type": "string"},
            "externalEntityId": {"type": "string"},
            "externalCustomerId": {"type": "string", "description": "the same value as externalEntityId"},
            "apiKeyPrefix": {"type": "string"},
            "groupId": {"type": "string"},
            "status": {"enum": ["completed", "client_cancelled", "upstream_error_mid_stream"]},
            "tokens": object(&["inputTokens", "outputTokens", "cachedInputTokens"], json!({
                "inputTokens": {"type": "integer"}, "outputTokens": {"type": "integer"}, "cachedInputTokens": {"type": "integer"},
            })),
        })),
        "NewManagementKey": object(&["key", "prefix", "name", "scope", "created_at"], json!({"key": {"type": "string"}, "prefix": {"type": "string"}, "name": nullable_string, "scope": {"enum": ["manage", "view"]}, "created_at": time})),
    })
}

fn parameters() -> Value {
    let path = |name: &str| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}});
    let query = |name: &str, schema: Value| json!({"name": name, "in": "query", "required": false, "schema": schema});
    json!({
        "id": path("id"),
        "prefix": path("prefix"),
        "limit": query("limit", json!({"type": "integer", "minimum": 1, "maximum": 1000, "default": 100})),
        "cursor": query("cursor", json!({"type": "string"})),
        "external_entity_id": query("external_entity_id", json!({"type": "string"})),
        "parent_group_id": query("parent_group_id", json!({"type": "string"})),
        "delivery_id": path("delivery_id"),
        "start_time": query("start_time", json!({"type": "string", "format": "date-time", "description": "inclusive"})),
        "end_time": query("end_time", json!({"type": "string", "format": "date-time", "description": "exclusive; after start_time"})),
        "api_key_prefix": query("api_key_prefix", json!({"type": "string"})),
        "signature": {"name": "X-Baseten-Signature", "in": "header", "required": true, "schema": {"type": "string"}, "description": "base64 Ed25519 signature of the raw body"},
    })
}

/// The whole document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for group in [management_paths(), data_plane_paths()] {
        if let Value::Object(entries) = group {
            paths.extend(entries);
        }
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Tollgate",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Self-hosted inference gateway: management API (/v1/gateway/*) and OpenAI-compatible data plane.",
        },
        "servers": [{ "url": "/" }],
        "security": [{ "apiKey": [] }, { "bearer": [] }],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "apiKey": { "type": "apiKey", "in": "header", "name": "Authorization", "description": "`Api-Key <key>`" },
                "bearer": { "type": "http", "scheme": "bearer" },
            },
            "parameters": parameters(),
            "responses": {
                "Error": { "description": "Error", "content": { "application/json": { "schema": schema("Error") } } },
            },
            "schemas": schemas(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `$ref` in the document resolves to a component.
    #[test]
    fn references_resolve() {
        let doc = document();
        let mut refs = Vec::new();
        collect_refs(&doc, &mut refs);
        assert!(refs.len() > 50);
        for reference in refs {
            let pointer = reference.trim_start_matches('#');
            assert!(doc.pointer(pointer).is_some(), "dangling {reference}");
        }
        assert_eq!(doc["openapi"], "3.1.0");
    }

    fn collect_refs(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, v) in map {
                    match (key.as_str(), v) {
                        ("$ref", Value::String(r)) => out.push(r.clone()),
                        _ => collect_refs(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
            _ => {}
        }
    }
}
