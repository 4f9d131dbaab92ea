//! `/v1/gateway/groups`: the customer tree (SPEC §1.2–1.3).
//!
//! Handlers check the payload's shape and the model list on their own
//! (`validate_models`), that every newly listed slug is an endpoint of the workspace, and
//! leave the tree rules (mode, depth, CASCADING thresholds against ancestors and
//! descendants, external-id uniqueness) to the store, which runs them in the write's
//! transaction. `effective_models` and the usage report come from
//! `tollgate_core::hierarchy`, the same resolution the data plane enforces.

use std::collections::HashMap;

use axum::extract::{RawQuery, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tollgate_core::group::validate_models;
use tollgate_core::hierarchy::{effective_models, EffectiveLimit};
use tollgate_core::ids::{new_id, IdKind};
use tollgate_core::{Group, LimitMode, LimitType, LimitUnit, ModelAccess, Timestamp};
use tollgate_store::{GroupFilter, GroupPatch, NewGroup, Page};

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::fields::{check_name, check_text, MAX_TEXT_LEN};
use crate::json::{patch_field, present, required_nullable, StrictJson};
use crate::pagination::{page_json, parse_list_query, NoQuery};
use crate::params::Path;
use crate::AdminState;

pub fn router() -> Router<AdminState> {
    Router::new()
        .route("/v1/gateway/groups", post(create).get(list))
        .route(
            "/v1/gateway/groups/{id}",
            get(read).patch(update).delete(remove),
        )
        .route("/v1/gateway/groups/{id}/usage", get(usage))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateGroup {
    metadata: CreateMetadata,
    models: Vec<ModelAccess>,
    hierarchy: Hierarchy,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateMetadata {
    #[serde(default)]
    name: Option<String>,
    external_entity_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Hierarchy {
    limit_enforcement: LimitMode,
    #[serde(deserialize_with = "required_nullable")]
    parent_group_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchGroup {
    #[serde(default, deserialize_with = "patch_field")]
    metadata: Option<Option<PatchMetadata>>,
    #[serde(default, deserialize_with = "patch_field")]
    models: Option<Option<Vec<ModelAccess>>>,
    #[serde(default, deserialize_with = "present")]
    hierarchy: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchMetadata {
    #[serde(default, deserialize_with = "patch_field")]
    name: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    external_entity_id: bool,
}

fn limit_json(limit: &EffectiveLimit) -> Value {
    json!({
        "type": limit.kind,
        "unit": limit.unit,
        "threshold": limit.threshold,
        "source_group": limit.source_group,
    })
}

/// The group object of SPEC §1.2; `chain` is `[group, parent, ..., root]`.
pub fn group_json(chain: &[Group]) -> Value {
    let Some(group) = chain.first() else {
        return Value::Null;
    };
    let effective: Vec<Value> = effective_models(chain)
        .iter()
        .map(|model| {
            let (rate, usage): (Vec<&EffectiveLimit>, Vec<&EffectiveLimit>) =
                model.limits.iter().partition(|l| l.is_rate());
            json!({
                "slug": model.slug,
                "rate_limits": rate.into_iter().map(limit_json).collect::<Vec<_>>(),
                "usage_limits": usage.into_iter().map(limit_json).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "id": group.id,
        "metadata": metadata_json(group),
        "models": group.models,
        "effective_models": effective,
        "hierarchy": {
            "limit_enforcement": group.mode,
            "parent_group_id": group.parent_id,
        },
        "created_at": group.created_at.to_rfc3339(),
    })
}

fn metadata_json(group: &Group) -> Value {
    json!({ "name": group.name, "external_entity_id": group.external_entity_id })
}

/// A live group of the caller's workspace (404 absent or deleted, 403 another's).
pub async fn owned_group(state: &AdminState, caller: &Caller, id: &str) -> ApiResult<Group> {
    let group = state
        .store
        .group(id)
        .await?
        .ok_or_else(|| ApiError::not_found("Group"))?;
    caller.owns(&group.workspace_id, "Group")?;
    Ok(group)
}

/// The group object as stored now, with its chain for `effective_models`.
async fn current_json(state: &AdminState, group: Group) -> ApiResult<Value> {
    let mut chain = state.store.group_chain(&group.id).await?;
    if chain.is_empty() {
        // Deleted between the write and this read: answer with what was written.
        chain.push(group);
    }
    Ok(group_json(&chain))
}

/// Every slug not in `already_listed` must name a live endpoint of the workspace. Slugs a
/// group already lists are kept even when their endpoint was deleted since (SPEC §1.5:
/// calls answer 404 until the endpoint exists again).
async fn check_slugs_exist(
    state: &AdminState,
    caller: &Caller,
    models: &[ModelAccess],
    already_listed: &[ModelAccess],
) -> ApiResult<()> {
    for (i, model) in models.iter().enumerate() {
        if already_listed.iter().any(|m| m.slug == model.slug) {
            continue;
        }
        let endpoint = state.store.endpoint_by_slug(&model.slug).await?;
        if endpoint.is_none_or(|e| e.workspace_id != caller.workspace_id) {
            return Err(ApiError::bad_request(
                "unknown_model",
                format!(
                    "models[{i}].slug: no endpoint '{}' exists in this workspace",
                    model.slug
                ),
            ));
        }
    }
    Ok(())
}

async fn create(
    State(state): State<AdminState>,
    caller: Caller,
    _: NoQuery,
    StrictJson(body): StrictJson<CreateGroup>,
) -> ApiResult<Json<Value>> {
    check_text(
        "metadata.external_entity_id",
        &body.metadata.external_entity_id,
        1,
        MAX_TEXT_LEN,
    )?;
    check_name("metadata.name", body.metadata.name.as_deref())?;
    if let Some(parent) = &body.hierarchy.parent_group_id {
        check_text("hierarchy.parent_group_id", parent, 1, MAX_TEXT_LEN)?;
    }
    if body.models.is_empty() {
        return Err(ApiError::invalid_field(
            "models",
            "must list at least one model",
        ));
    }
    validate_models(&body.models, "models")
        .map_err(|e| ApiError::invalid_field(&e.field, e.reason))?;
    check_slugs_exist(&state, &caller, &body.models, &[]).await?;
    let group = state
        .store
        .create_group(NewGroup {
            id: new_id(IdKind::Group),
            workspace_id: caller.workspace_id.clone(),
            name: body.metadata.name,
            external_entity_id: body.metadata.external_entity_id,
            models: body.models,
            mode: body.hierarchy.limit_enforcement,
            parent_id: body.hierarchy.parent_group_id,
            created_at: state.clock.now(),
        })
        .await?;
    Ok(Json(current_json(&state, group).await?))
}

async fn list(
    State(state): State<AdminState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> ApiResult<Json<Value>> {
    let mut query = parse_list_query(
        raw.as_deref(),
        "groups",
        &["external_entity_id", "parent_group_id"],
    )?;
    let filter = GroupFilter {
        external_entity_id: query.filters.remove("external_entity_id"),
        parent_group_id: query.filters.remove("parent_group_id"),
    };
    let page = state
        .store
        .list_groups(&caller.workspace_id, &filter, query.page)
        .await?;
    // Siblings share their ancestors: fetch each parent's chain once per page.
    let mut ancestors: HashMap<String, Vec<Group>> = HashMap::new();
    let mut chains = Vec::with_capacity(page.items.len());
    for group in page.items {
        let cached = group.parent_id.as_ref().and_then(|p| ancestors.get(p));
        let chain = match (&group.parent_id, cached) {
            (None, _) => vec![group],
            (Some(_), Some(above)) => std::iter::once(group)
                .chain(above.iter().cloned())
                .collect(),
            (Some(parent), None) => {
                let chain = state.store.group_chain(&group.id).await?;
                if chain.is_empty() {
                    vec![group]
                } else {
                    ancestors.insert(parent.clone(), chain[1..].to_vec());
                    chain
                }
            }
        };
        chains.push(chain);
    }
    let page = Page {
        items: chains,
        next_after: page.next_after,
    };
    Ok(Json(page_json("groups", page, |chain| group_json(&chain))))
}

async fn read(
    State(state): State<AdminState>,
    caller: Caller,
    _: NoQuery,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let group = owned_group(&state, &caller, &id).await?;
    Ok(Json(current_json(&state, group).await?))
}

async fn update(
    State(state): State<AdminState>,
    caller: Caller,
    _: NoQuery,
    Path(id): Path<String>,
    StrictJson(body): StrictJson<PatchGroup>,
) -> ApiResult<Json<Value>> {
    let current = owned_group(&state, &caller, &id).await?;
    if body.hierarchy {
        return Err(ApiError::bad_request(
            "immutable_field",
            "hierarchy: is immutable (a group's mode and parent never change)",
        ));
    }
    let metadata = match body.metadata {
        Some(None) => return Err(ApiError::invalid_field("metadata", "must be an object")),
        Some(Some(m)) => Some(m),
        None => None,
    };
    if metadata.as_ref().is_some_and(|m| m.external_entity_id) {
        return Err(ApiError::bad_request(
            "immutable_field",
            "metadata.external_entity_id: is immutable",
        ));
    }
    let name = metadata.and_then(|m| m.name);
    if let Some(name) = &name {
        check_name("metadata.name", name.as_deref())?;
    }
    let models = match body.models {
        Some(None) => {
            return Err(ApiError::invalid_field(
                "models",
                "must be a list (`[]` removes all access)",
            ))
        }
        Some(Some(models)) => Some(models),
        None => None,
    };
    if name.is_none() && models.is_none() {
        return Err(ApiError::bad_request(
            "empty_patch",
            "Request body changes nothing; send `metadata.name` and/or `models`",
        ));
    }
    if let Some(models) = &models {
        validate_models(models, "models")
            .map_err(|e| ApiError::invalid_field(&e.field, e.reason))?;
        check_slugs_exist(&state, &caller, models, &current.models).await?;
    }
    let group = state
        .store
        .update_group(&id, GroupPatch { name, models })
        .await?;
    Ok(Json(current_json(&state, group).await?))
}

async fn remove(
    State(state): State<AdminState>,
    caller: Caller,
    _: NoQuery,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    owned_group(&state, &caller, &id).await?;
    let (group, deleted_at) = state
        .store
        .delete_group(&id, state.clock.now())
        .await?
        .ok_or_else(|| ApiError::not_found("Group"))?;
    Ok(Json(json!({
        "id": group.id,
        "metadata": metadata_json(&group),
        "deleted_at": deleted_at.to_rfc3339(),
    })))
}

/// SPEC §1.2 usage report: one entry per effective DAY limit, read on the counter that
/// limit is enforced on. A CASCADING limit's pool holds the traffic of the declaring group
/// and of every live descendant; an INDEPENDENT limit counts the group alone.
async fn usage(
    State(state): State<AdminState>,
    caller: Caller,
    _: NoQuery,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let group = owned_group(&state, &caller, &id).await?;
    let mut chain = state.store.group_chain(&group.id).await?;
    if chain.is_empty() {
        chain.push(group.clone());
    }
    let now = state.clock.now();
    let day_start = now.utc_day_start();
    let reset_at = now.next_utc_midnight();
    let mut pools: HashMap<String, Vec<String>> = HashMap::new();
    let mut report = Map::new();
    for model in effective_models(&chain) {
        let mut entries = Vec::new();
        for limit in model.limits.iter().filter(|l| l.unit == LimitUnit::Day) {
            let counted = match pools.get(&limit.counter_group) {
                Some(ids) => ids.clone(),
                None => {
                    let ids = pool_members(&state, group.mode, &limit.counter_group).await?;
                    pools.insert(limit.counter_group.clone(), ids.clone());
                    ids
                }
            };
            let used = state
                .store
                .day_usage(&counted, &model.slug, day_start)
                .await?
                .map(|u| match limit.kind {
                    LimitType::Request => u.requests,
                    LimitType::Token => u.tokens,
                });
            entries.push(usage_entry(limit, used, reset_at));
        }
        report.insert(model.slug, Value::Array(entries));
    }
    Ok(Json(json!({
        "customer_id": group.external_entity_id,
        "usage": report,
    })))
}

/// The groups whose traffic a counter holds.
async fn pool_members(
    state: &AdminState,
    mode: LimitMode,
    counter_group: &str,
) -> ApiResult<Vec<String>> {
    let mut ids = vec![counter_group.to_owned()];
    if mode == LimitMode::Cascading {
        ids.extend(state.store.pool_descendant_ids(counter_group).await?);
    }
    Ok(ids)
}

fn usage_entry(limit: &EffectiveLimit, used: Option<u64>, reset_at: Timestamp) -> Value {
    json!({
        "type": limit.kind,
        "unit": limit.unit,
        "threshold": limit.threshold,
        "current_usage": used,
        "reset_at": used.map(|_| reset_at.to_rfc3339()),
        "source_group": limit.source_group,
    })
}
