//! `/v1/gateway/endpoints`: a public slug mapped to 1..=8 upstream targets (SPEC §1.5).
//! Slugs are unique across the installation and immutable; PATCH replaces the targets.

use axum::extract::{RawQuery, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tollgate_core::endpoint::{Region, Target, MAX_TARGETS};
use tollgate_core::ids::{new_id, IdKind};
use tollgate_core::slug::validate_slug;
use tollgate_store::{Endpoint, NewEndpoint, StoreError};

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::fields::{check_text, MAX_TEXT_LEN};
use crate::json::{patch_field, present, StrictJson};
use tollgate_core::endpoint::UrlUse;

use crate::network::check_public_url;
use crate::pagination::{page_json, parse_list_query, NoQuery};
use crate::params::Path;
use crate::AdminState;

/// Longest accepted `base_url`.
const MAX_URL_LEN: usize = 2048;

pub fn router() -> Router<AdminState> {
    Router::new()
        .route("/v1/gateway/endpoints", post(create).get(list))
        .route(
            "/v1/gateway/endpoints/{id}",
            get(read).patch(update).delete(remove),
        )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateEndpoint {
    slug: String,
    targets: Vec<Target>,
    #[serde(default)]
    region: Region,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchEndpoint {
    #[serde(default, deserialize_with = "patch_field")]
    targets: Option<Option<Vec<Target>>>,
    #[serde(default, deserialize_with = "present")]
    slug: bool,
    #[serde(default, deserialize_with = "present")]
    region: bool,
}

fn endpoint_json(endpoint: &Endpoint) -> Value {
    json!({
        "id": endpoint.id,
        "slug": endpoint.slug,
        "region": endpoint.region,
        "targets": endpoint.targets,
        "created_at": endpoint.created_at.to_rfc3339(),
        "updated_at": endpoint.updated_at.to_rfc3339(),
    })
}

/// Checks a target list: its length, each URL (shape and network), each model name and
/// each secret reference (a live secret of the caller's workspace).
async fn check_targets(state: &AdminState, caller: &Caller, targets: &[Target]) -> ApiResult<()> {
    if targets.is_empty() || targets.len() > MAX_TARGETS {
        return Err(ApiError::invalid_field(
            "targets",
            format!("must list 1..={MAX_TARGETS} targets"),
        ));
    }
    for (i, target) in targets.iter().enumerate() {
        let field = format!("targets[{i}].base_url");
        if target.base_url.len() > MAX_URL_LEN {
            return Err(ApiError::invalid_field(
                &field,
                format!("must be at most {MAX_URL_LEN} bytes"),
            ));
        }
        check_public_url(
            &target.base_url,
            UrlUse::Upstream,
            state.allow_private_networks,
        )
        .await
        .map_err(|refusal| {
            ApiError::bad_request(refusal.code, format!("{field}: {}", refusal.reason))
        })?;
        check_text(
            &format!("targets[{i}].target_model"),
            &target.target_model,
            1,
            MAX_TEXT_LEN,
        )?;
        if let Some(secret_id) = &target.secret_id {
            let secret = state.store.secret(secret_id).await?;
            if secret.is_none_or(|s| s.workspace_id != caller.workspace_id) {
                return Err(ApiError::bad_request(
                    "unknown_secret",
                    format!("targets[{i}].secret_id: no secret with this id in this workspace"),
                ));
            }
        }
    }
    Ok(())
}

async fn create(
    State(state): State<AdminState>,
    caller: Caller,
    _: NoQuery,
    StrictJson(body): StrictJson<CreateEndpoint>,
) -> ApiResult<Json<Value>> {
    validate_slug(&body.slug).map_err(|why| ApiError::invalid_field("slug", why))?;
    check_targets(&state, &caller, &body.targets).await?;
    let endpoint = state
        .store
        .insert_endpoint(NewEndpoint {
            id: new_id(IdKind::Endpoint),
            workspace_id: caller.workspace_id,
            slug: body.slug,
            region: body.region,
            targets: body.targets,
            created_at: state.clock.now(),
        })
        .await
        .map_err(|e| match e {
            StoreError::Duplicate(_) => ApiError::bad_request(
                "duplicate_slug",
                "slug: an endpoint with this slug already exists",
            ),
            other => other.into(),
        })?;
    Ok(Json(endpoint_json(&endpoint)))
}

async fn list(
    State(state): State<AdminState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> ApiResult<Json<Value>> {
    let query = parse_list_query(raw.as_deref(), "endpoints", &[])?;
    let page = state
        .store
        .list_endpoints(&caller.workspace_id, query.page)
        .await?;
    Ok(Json(page_json("endpoints", page, |e| endpoint_json(&e))))
}

async fn owned_endpoint(state: &AdminState, caller: &Caller, id: &str) -> ApiResult<Endpoint> {
    let endpoint = state
        .store
        .endpoint(id)
        .await?
        .ok_or_else(|| ApiError::not_found("Endpoint"))?;
    caller.owns(&endpoint.workspace_id, "Endpoint")?;
    Ok(endpoint)
}

async fn read(
    State(state): State<AdminState>,
    caller: Caller,
    _: NoQuery,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let endpoint = owned_endpoint(&state, &caller, &id).await?;
    Ok(Json(endpoint_json(&endpoint)))
}

async fn update(
    State(state): State<AdminState>,
    caller: Caller,
    _: NoQuery,
    Path(id): Path<String>,
    StrictJson(body): StrictJson<PatchEndpoint>,
) -> ApiResult<Json<Value>> {
    owned_endpoint(&state, &caller, &id).await?;
    if body.slug {
        return Err(ApiError::bad_request(
            "immutable_field",
            "slug: is immutable; create a new endpoint to rename",
        ));
    }
    if body.region {
        return Err(ApiError::bad_request(
            "immutable_field",
            "region: is immutable; only targets can be changed",
        ));
    }
    let targets = match body.targets {
        Some(Some(targets)) => targets,
        Some(None) => {
            return Err(ApiError::invalid_field(
                "targets",
                format!("must be a list of 1..={MAX_TARGETS} targets"),
            ))
        }
        None => {
            return Err(ApiError::bad_request(
                "empty_patch",
                "Request body changes nothing; send `targets`",
            ))
        }
    };
    check_targets(&state, &caller, &targets).await?;
    let endpoint = state
        .store
        .update_endpoint_targets(&id, &targets, state.clock.now())
        .await?
        .ok_or_else(|| ApiError::not_found("Endpoint"))?;
    Ok(Json(endpoint_json(&endpoint)))
}

async fn remove(
    State(state): State<AdminState>,
    caller: Caller,
    _: NoQuery,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    owned_endpoint(&state, &caller, &id).await?;
    let endpoint = state
        .store
        .delete_endpoint(&id, state.clock.now())
        .await?
        .ok_or_else(|| ApiError::not_found("Endpoint"))?;
    Ok(Json(json!({ "id": endpoint.id, "slug": endpoint.slug })))
}
