//! `/v1/gateway/management_keys`: operators' keys within a workspace (SPEC §4). The full
//! key is shown once, in the create answer; lists show prefixes only.

use axum::extract::{RawQuery, State};
use axum::routing::{delete, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tollgate_core::keys::mint_management_key;
use tollgate_store::{ManagementKey, NewManagementKey, Scope, StoreError};

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::fields::check_name;
use crate::json::StrictJson;
use crate::pagination::{page_json, parse_list_query, NoQuery};
use crate::params::Path;
use crate::AdminState;

pub fn router() -> Router<AdminState> {
    Router::new()
        .route("/v1/gateway/management_keys", post(create).get(list))
        .route("/v1/gateway/management_keys/{prefix}", delete(revoke))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateManagementKey {
    #[serde(default)]
    name: Option<String>,
    scope: Scope,
}

fn key_json(key: &ManagementKey) -> Value {
    json!({
        "prefix": key.prefix,
        "name": key.name,
        "scope": key.scope,
        "created_at": key.created_at.to_rfc3339(),
    })
}

async fn create(
    State(state): State<AdminState>,
    caller: Caller,
    _: NoQuery,
    StrictJson(body): StrictJson<CreateManagementKey>,
) -> ApiResult<Json<Value>> {
    check_name("name", body.name.as_deref())?;
    let minted = mint_management_key();
    let key = state
        .store
        .insert_management_key(NewManagementKey {
            workspace_id: caller.workspace_id,
            prefix: minted.prefix,
            hash: minted.hash.to_vec(),
            name: body.name,
            scope: body.scope,
            created_at: state.clock.now(),
        })
        .await
        .map_err(|e| match e {
            // 13 random base62 characters: a clash is a broken random source.
            StoreError::Duplicate(what) => {
                ApiError::internal(format!("minted management key clashed on {what}"))
            }
            other => other.into(),
        })?;
    let mut answer = key_json(&key);
    if let Value::Object(fields) = &mut answer {
        fields.insert("key".to_owned(), Value::String(minted.full));
    }
    Ok(Json(answer))
}

async fn list(
    State(state): State<AdminState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> ApiResult<Json<Value>> {
    let query = parse_list_query(raw.as_deref(), "management_keys", &[])?;
    let page = state
        .store
        .list_management_keys(&caller.workspace_id, query.page)
        .await?;
    Ok(Json(page_json("management_keys", page, |k| key_json(&k))))
}

/// Revoking the key making the call is allowed (key rotation ends that way).
async fn revoke(
    State(state): State<AdminState>,
    caller: Caller,
    _: NoQuery,
    Path(prefix): Path<String>,
) -> ApiResult<Json<Value>> {
    if let Some((key, _)) = state.store.management_key_by_prefix(&prefix).await? {
        caller.owns(&key.workspace_id, "Management key")?;
    }
    let key = state
        .store
        .revoke_management_key(&caller.workspace_id, &prefix, state.clock.now())
        .await?
        .ok_or_else(|| ApiError::not_found("Management key"))?;
    Ok(Json(json!({ "prefix": key.prefix })))
}
