//! `/v1/gateway/secrets`: upstream credentials, sealed with the master key before they
//! reach the store and never returned by any route.

use axum::extract::{RawQuery, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tollgate_core::ids::{new_id, IdKind};
use tollgate_store::{NewSecret, PageRequest, Secret, StoreError};

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::fields::{check_text, MAX_TEXT_LEN};
use crate::json::StrictJson;
use crate::pagination::{page_json, parse_list_query, NoQuery, MAX_LIMIT};
use crate::params::Path;
use crate::AdminState;

/// Largest secret value accepted (bytes).
pub const MAX_SECRET_LEN: usize = 16 * 1024;

pub fn router() -> Router<AdminState> {
    Router::new()
        .route("/v1/gateway/secrets", post(create).get(list))
        .route("/v1/gateway/secrets/{id}", get(read).delete(remove))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSecret {
    name: String,
    value: String,
}

fn secret_json(secret: &Secret) -> Value {
    json!({
        "id": secret.id,
        "name": secret.name,
        "created_at": secret.created_at.to_rfc3339(),
    })
}

async fn create(
    State(state): State<AdminState>,
    caller: Caller,
    _: NoQuery,
    StrictJson(body): StrictJson<CreateSecret>,
) -> ApiResult<Json<Value>> {
    check_text("name", &body.name, 1, MAX_TEXT_LEN)?;
    if body.value.is_empty() || body.value.len() > MAX_SECRET_LEN {
        return Err(ApiError::invalid_field(
            "value",
            format!("must be 1..={MAX_SECRET_LEN} bytes"),
        ));
    }
    // The value is sent upstream as `Authorization: Bearer <value>`, which no control
    // character may be part of (admin_misc::secret_values_must_fit_an_authorization_header).
    if body.value.chars().any(char::is_control) {
        return Err(ApiError::invalid_field(
            "value",
            "must not contain control characters (CR, LF, tab, ...)",
        ));
    }
    let ciphertext = state
        .sealer
        .seal(body.value.as_bytes())
        .map_err(ApiError::internal)?;
    let secret = state
        .store
        .insert_secret(NewSecret {
            id: new_id(IdKind::Secret),
            workspace_id: caller.workspace_id,
            name: body.name,
            ciphertext,
            created_at: state.clock.now(),
        })
        .await
        .map_err(|e| match e {
            StoreError::Duplicate("name") => duplicate_name(),
            other => other.into(),
        })?;
    Ok(Json(json!({ "id": secret.id, "name": secret.name })))
}

fn duplicate_name() -> ApiError {
    ApiError::bad_request(
        "duplicate_name",
        "name: a secret with this name already exists in this workspace",
    )
}

/// The slugs of the workspace's live endpoints whose targets send this secret upstream.
async fn endpoints_using(
    state: &AdminState,
    workspace_id: &str,
    secret_id: &str,
) -> ApiResult<Vec<String>> {
    let mut page = PageRequest {
        limit: MAX_LIMIT,
        after: None,
    };
    let mut slugs = Vec::new();
    loop {
        let found = state.store.list_endpoints(workspace_id, page).await?;
        slugs.extend(
            found
                .items
                .into_iter()
                .filter(|e| {
                    e.targets
                        .iter()
                        .any(|t| t.secret_id.as_deref() == Some(secret_id))
                })
                .map(|e| e.slug),
        );
        match found.next_after {
            Some(after) => page.after = Some(after),
            None => return Ok(slugs),
        }
    }
}

async fn list(
    State(state): State<AdminState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> ApiResult<Json<Value>> {
    let query = parse_list_query(raw.as_deref(), "secrets", &[])?;
    let page = state
        .store
        .list_secrets(&caller.workspace_id, query.page)
        .await?;
    Ok(Json(page_json("secrets", page, |s| secret_json(&s))))
}

/// A live secret of the caller's workspace (404 absent or deleted, 403 another's).
pub async fn owned_secret(state: &AdminState, caller: &Caller, id: &str) -> ApiResult<Secret> {
    let secret = state
        .store
        .secret(id)
        .await?
        .ok_or_else(|| ApiError::not_found("Secret"))?;
    caller.owns(&secret.workspace_id, "Secret")?;
    Ok(secret)
}

async fn read(
    State(state): State<AdminState>,
    caller: Caller,
    _: NoQuery,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let secret = owned_secret(&state, &caller, &id).await?;
    Ok(Json(secret_json(&secret)))
}

async fn remove(
    State(state): State<AdminState>,
    caller: Caller,
    _: NoQuery,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    owned_secret(&state, &caller, &id).await?;
    let users = endpoints_using(&state, &caller.workspace_id, &id).await?;
    if !users.is_empty() {
        return Err(ApiError::bad_request(
            "secret_in_use",
            format!(
                "Secret is used by endpoint(s) {}; point their targets elsewhere first",
                users.join(", ")
            ),
        ));
    }
    let secret = state
        .store
        .delete_secret(&id, state.clock.now())
        .await?
        .ok_or_else(|| ApiError::not_found("Secret"))?;
    Ok(Json(json!({ "id": secret.id, "name": secret.name })))
}
