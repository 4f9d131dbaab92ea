//! `/v1/gateway/management_keys`: operators' keys within a workspace (SPEC §4). The full
//! key is shown once, in the create answer; lists show prefixes only.

use axum::extract::{RawQuery, State};
use axum::routing::{delete, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tollgate_core::keys::mint_management_key;
use tollgate_store::{ManagementKey, NewManagementKey, PageRequest, Scope, StoreError};

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::fields::check_name;
use crate::json::StrictJson;
use crate::pagination::{page_json, parse_list_query, NoQuery, MAX_LIMIT};
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

/// Makes "is another manage key left? then revoke" one step within this process, so two
/// concurrent revocations cannot take the last two `manage` keys together.
static REVOKE_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Revoking the key making the call is allowed (key rotation ends that way), but not the
/// workspace's last `manage` key: no command mints a key for an existing workspace, so
/// nobody could manage it again
/// (admin_misc::the_last_manage_key_of_a_workspace_cannot_be_revoked).
async fn revoke(
    State(state): State<AdminState>,
    caller: Caller,
    _: NoQuery,
    Path(prefix): Path<String>,
) -> ApiResult<Json<Value>> {
    let _one_revocation_at_a_time = REVOKE_LOCK.lock().await;
    if let Some((key, _)) = state.store.management_key_by_prefix(&prefix).await? {
        caller.owns(&key.workspace_id, "Management key")?;
        if key.scope == Scope::Manage && live_manage_keys(&state, &key.workspace_id).await? <= 1 {
            return Err(ApiError::bad_request(
                "last_manage_key",
                "Cannot revoke the last manage key of this workspace; create another manage key first",
            ));
        }
    }
    let key = state
        .store
        .revoke_management_key(&caller.workspace_id, &prefix, state.clock.now())
        .await?
        .ok_or_else(|| ApiError::not_found("Management key"))?;
    Ok(Json(json!({ "prefix": key.prefix })))
}

/// How many live `manage` keys the workspace has.
async fn live_manage_keys(state: &AdminState, workspace_id: &str) -> ApiResult<usize> {
    let mut count = 0;
    let mut page = PageRequest {
        limit: MAX_LIMIT,
        after: None,
    };
    loop {
        let found = state.store.list_management_keys(workspace_id, page).await?;
        count += found
            .items
            .iter()
            .filter(|k| k.scope == Scope::Manage)
            .count();
        match found.next_after {
            Some(after) => page.after = Some(after),
            None => return Ok(count),
        }
    }
}
