//! `/v1/gateway/groups/{id}/api_keys`: customers' keys (SPEC §1.4).
//!
//! Minted keys are shown once and stored as a SHA-256 hash. `register` adopts a key the
//! operator already issued; its raw body must carry an Ed25519 signature by the
//! workspace's signing key (`X-Baseten-Signature`, base64), checked before the body is
//! even parsed. A key under another group of the same workspace answers 404, like a
//! revoked one.

use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ed25519_dalek::{Signature, VerifyingKey};
use serde::Deserialize;
use serde_json::{json, Value};
use tollgate_core::keys::{
    hash_key, lookup_prefix, mint_api_key, validate_registered_key, PREFIX_LEN,
};
use tollgate_store::{ApiKey, NewApiKey, StoreError};

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::fields::check_name;
use crate::groups::owned_group;
use crate::json::{parse_body, RawBody, StrictJson};
use crate::pagination::{page_json, parse_list_query, NoQuery};
use crate::params::Path;
use crate::AdminState;

/// Header carrying the registration signature (the reference API's name).
pub const SIGNATURE_HEADER: &str = "x-baseten-signature";

pub fn router() -> Router<AdminState> {
    Router::new()
        .route("/v1/gateway/groups/{id}/api_keys", post(mint).get(list))
        .route("/v1/gateway/groups/{id}/api_keys/register", post(register))
        .route(
            "/v1/gateway/groups/{id}/api_keys/{prefix}",
            get(read).delete(revoke),
        )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MintKey {
    #[serde(default)]
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterKey {
    key: String,
    #[serde(default)]
    name: Option<String>,
}

fn key_json(key: &ApiKey) -> Value {
    json!({
        "prefix": key.prefix,
        "name": key.name,
        "created_at": key.created_at.to_rfc3339(),
    })
}

fn duplicate_prefix() -> ApiError {
    ApiError::bad_request(
        "duplicate_prefix",
        format!("key: its first {PREFIX_LEN} characters are already the prefix of another key"),
    )
}

async fn mint(
    State(state): State<AdminState>,
    caller: Caller,
    _: NoQuery,
    Path(group_id): Path<String>,
    StrictJson(body): StrictJson<MintKey>,
) -> ApiResult<Json<Value>> {
    owned_group(&state, &caller, &group_id).await?;
    check_name("name", body.name.as_deref())?;
    let minted = mint_api_key();
    let key = state
        .store
        .insert_api_key(NewApiKey {
            group_id,
            prefix: minted.prefix,
            hash: minted.hash.to_vec(),
            name: body.name,
            created_at: state.clock.now(),
        })
        .await?;
    Ok(Json(json!({
        "api_key": minted.full,
        "prefix": key.prefix,
        "name": key.name,
    })))
}

async fn register(
    State(state): State<AdminState>,
    caller: Caller,
    _: NoQuery,
    Path(group_id): Path<String>,
    headers: HeaderMap,
    RawBody(raw): RawBody,
) -> ApiResult<Json<Value>> {
    owned_group(&state, &caller, &group_id).await?;
    let workspace = state
        .store
        .workspace(&caller.workspace_id)
        .await?
        .ok_or_else(|| ApiError::internal("caller's workspace vanished"))?;
    let Some(public_key) = workspace.signing_key else {
        return Err(ApiError::bad_request(
            "signing_key_not_configured",
            "Must configure a public key before registering API keys",
        ));
    };
    if !signature_is_valid(&public_key, &headers, &raw) {
        return Err(ApiError::bad_request(
            "signature_verification_failed",
            "Signature verification failed",
        ));
    }
    let body: RegisterKey = parse_body(&raw)?;
    check_name("name", body.name.as_deref())?;
    validate_registered_key(&body.key).map_err(|e| {
        // The error's text already starts with `key: `.
        ApiError::bad_request("invalid_key", e.to_string())
    })?;
    let prefix = lookup_prefix(&body.key)
        .ok_or_else(|| ApiError::invalid_field("key", "too short"))?
        .to_owned();
    if state.store.api_key_prefix_exists(&prefix).await? {
        return Err(duplicate_prefix());
    }
    state
        .store
        .insert_api_key(NewApiKey {
            group_id,
            prefix,
            hash: hash_key(&body.key).to_vec(),
            name: body.name,
            created_at: state.clock.now(),
        })
        .await
        .map_err(|e| match e {
            StoreError::Duplicate(_) => duplicate_prefix(),
            other => other.into(),
        })?;
    Ok(Json(json!({ "ok": true })))
}

/// True when `X-Baseten-Signature` holds a base64 Ed25519 signature of exactly `body` by
/// `public_key`. Strict verification: no malleable or small-order signatures.
fn signature_is_valid(public_key: &[u8], headers: &HeaderMap, body: &[u8]) -> bool {
    let Ok(key_bytes) = <[u8; 32]>::try_from(public_key) else {
        return false;
    };
    let Ok(key) = VerifyingKey::from_bytes(&key_bytes) else {
        return false;
    };
    let Some(encoded) = headers
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
    else {
        return false;
    };
    let Ok(sig_bytes) = STANDARD.decode(encoded) else {
        return false;
    };
    let Ok(signature) = Signature::from_slice(&sig_bytes) else {
        return false;
    };
    key.verify_strict(body, &signature).is_ok()
}

async fn list(
    State(state): State<AdminState>,
    caller: Caller,
    Path(group_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> ApiResult<Json<Value>> {
    // Each group's keys are a list of their own.
    let list = format!("api_keys/{group_id}");
    let query = parse_list_query(raw.as_deref(), &list, &[])?;
    owned_group(&state, &caller, &group_id).await?;
    let page = state.store.list_api_keys(&group_id, query.page).await?;
    Ok(Json(page_json(&list, page, |k| key_json(&k))))
}

async fn read(
    State(state): State<AdminState>,
    caller: Caller,
    _: NoQuery,
    Path((group_id, prefix)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    owned_group(&state, &caller, &group_id).await?;
    let key = state
        .store
        .api_key(&group_id, &prefix)
        .await?
        .ok_or_else(|| ApiError::not_found("API key"))?;
    Ok(Json(key_json(&key)))
}

async fn revoke(
    State(state): State<AdminState>,
    caller: Caller,
    _: NoQuery,
    Path((group_id, prefix)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    owned_group(&state, &caller, &group_id).await?;
    let key = state
        .store
        .revoke_api_key(&group_id, &prefix, state.clock.now())
        .await?
        .ok_or_else(|| ApiError::not_found("API key"))?;
    Ok(Json(json!({ "prefix": key.prefix })))
}
