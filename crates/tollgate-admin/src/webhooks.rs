//! `/v1/gateway/webhook_endpoints`: where usage events are delivered (SPEC §3).
//!
//! A signing secret (`whsec_<base64 of 32 random bytes>`) is shown once, in the create or
//! rotate answer, and sealed with the master key before it reaches the store. A rotation
//! keeps the replaced secret signing for 24 hours, so receivers can switch at leisure.
//! Deliveries are cut and sent by `tollgate-billing`; this file lists them and lets an
//! operator send one again (same `webhook-id`, same bytes).

use axum::extract::{RawQuery, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tollgate_core::Timestamp;
use tollgate_store::{WebhookDelivery, WebhookEndpoint};

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::fields::check_text;
use crate::json::{parse_body, RawBody, StrictJson};
use tollgate_core::endpoint::UrlUse;

use crate::network::check_public_url;
use crate::pagination::{page_json, parse_list_query, NoQuery};
use crate::params::Path;
use crate::AdminState;

/// Longest accepted webhook URL.
const MAX_URL_LEN: usize = 2048;
/// Longest accepted description (characters).
const MAX_DESCRIPTION_LEN: usize = 1000;

pub fn router() -> Router<AdminState> {
    Router::new()
        .route("/v1/gateway/webhook_endpoints", post(create).get(list))
        .route(
            "/v1/gateway/webhook_endpoints/{id}",
            get(read).delete(remove),
        )
        .route(
            "/v1/gateway/webhook_endpoints/{id}/rotate_secret",
            post(rotate_secret),
        )
        .route(
            "/v1/gateway/webhook_endpoints/{id}/deliveries",
            get(list_deliveries),
        )
        .route(
            "/v1/gateway/webhook_endpoints/{id}/deliveries/{delivery_id}/retry",
            post(retry_delivery),
        )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateWebhookEndpoint {
    url: String,
    #[serde(default)]
    description: Option<String>,
}

fn endpoint_json(endpoint: &WebhookEndpoint) -> Value {
    json!({
        "id": endpoint.id,
        "url": endpoint.url,
        "description": endpoint.description,
        "created_at": endpoint.created_at.to_rfc3339(),
    })
}

fn delivery_json(delivery: &WebhookDelivery) -> Value {
    json!({
        "id": delivery.id,
        "status": delivery.status.as_str(),
        "attempts": delivery.attempts,
        "event_count": delivery.event_count,
        "created_at": delivery.created_at.to_rfc3339(),
        "last_attempt_at": delivery.last_attempt_at.map(Timestamp::to_rfc3339),
        "next_attempt_at": delivery.next_attempt_at.map(Timestamp::to_rfc3339),
        "last_response_status": delivery.last_http_status,
        "last_error": delivery.last_error,
    })
}

/// Checks a webhook URL: at most 2048 bytes without spaces or control characters,
/// http(s), a host, no credentials or fragment, and — unless private networks are allowed — a host that resolves only to
/// public addresses. A query string is allowed (some receivers authenticate by one,
/// e.g. `?code=`), unlike in an upstream `base_url`.
async fn check_url(state: &AdminState, text: &str) -> ApiResult<()> {
    if text.len() > MAX_URL_LEN {
        return Err(ApiError::invalid_field(
            "url",
            format!("must be at most {MAX_URL_LEN} bytes"),
        ));
    }
    // The URL parser would silently drop tabs and newlines and trim spaces, so what is
    // stored would not be what was checked.
    if text.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ApiError::invalid_field(
            "url",
            "must not contain spaces or control characters",
        ));
    }
    check_public_url(text, UrlUse::Webhook, state.allow_private_networks)
        .await
        .map_err(|refusal| {
            ApiError::bad_request(refusal.code, format!("url: {}", refusal.reason))
        })?;
    Ok(())
}

async fn create(
    State(state): State<AdminState>,
    caller: Caller,
    _: NoQuery,
    StrictJson(body): StrictJson<CreateWebhookEndpoint>,
) -> ApiResult<Json<Value>> {
    check_url(&state, &body.url).await?;
    if let Some(description) = &body.description {
        check_text("description", description, 0, MAX_DESCRIPTION_LEN)?;
    }
    let created = tollgate_billing::create_webhook_endpoint(
        state.store.as_ref(),
        &state.sealer,
        &caller.workspace_id,
        &body.url,
        body.description,
        state.clock.now(),
    )
    .await
    .map_err(ApiError::internal)?;
    let mut answer = endpoint_json(&created.endpoint);
    if let Value::Object(fields) = &mut answer {
        fields.insert("secret".into(), Value::String(created.secret));
    }
    Ok(Json(answer))
}

async fn list(
    State(state): State<AdminState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> ApiResult<Json<Value>> {
    let query = parse_list_query(raw.as_deref(), "webhook_endpoints", &[])?;
    let page = state
        .store
        .list_webhook_endpoints(&caller.workspace_id, query.page)
        .await?;
    Ok(Json(page_json("webhook_endpoints", page, |e| {
        endpoint_json(&e)
    })))
}

/// A live endpoint of the caller's workspace (404 absent or deleted, 403 another's).
async fn owned_endpoint(
    state: &AdminState,
    caller: &Caller,
    id: &str,
) -> ApiResult<WebhookEndpoint> {
    let endpoint = state
        .store
        .webhook_endpoint(id)
        .await?
        .ok_or_else(|| ApiError::not_found("Webhook endpoint"))?;
    caller.owns(&endpoint.workspace_id, "Webhook endpoint")?;
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

async fn remove(
    State(state): State<AdminState>,
    caller: Caller,
    _: NoQuery,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    owned_endpoint(&state, &caller, &id).await?;
    let endpoint = state
        .store
        .delete_webhook_endpoint(&id, state.clock.now())
        .await?
        .ok_or_else(|| ApiError::not_found("Webhook endpoint"))?;
    Ok(Json(json!({ "id": endpoint.id })))
}

/// A rotation takes no body; an empty one (or `{}`) is accepted.
async fn rotate_secret(
    State(state): State<AdminState>,
    caller: Caller,
    _: NoQuery,
    Path(id): Path<String>,
    RawBody(body): RawBody,
) -> ApiResult<Json<Value>> {
    owned_endpoint(&state, &caller, &id).await?;
    if !body.iter().all(u8::is_ascii_whitespace) {
        parse_body::<NoFields>(&body)?;
    }
    let secret = tollgate_billing::rotate_webhook_secret(
        state.store.as_ref(),
        &state.sealer,
        &id,
        state.clock.now(),
    )
    .await
    .map_err(ApiError::internal)?
    .ok_or_else(|| ApiError::not_found("Webhook endpoint"))?;
    Ok(Json(json!({ "id": id, "secret": secret })))
}

/// A body with no fields: `{}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoFields {}

async fn list_deliveries(
    State(state): State<AdminState>,
    caller: Caller,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> ApiResult<Json<Value>> {
    // Each endpoint's deliveries are a list of their own.
    let list = format!("webhook_deliveries/{id}");
    let query = parse_list_query(raw.as_deref(), &list, &[])?;
    owned_endpoint(&state, &caller, &id).await?;
    let page = state.store.list_webhook_deliveries(&id, query.page).await?;
    Ok(Json(page_json(&list, page, |d| delivery_json(&d))))
}

/// Sends a delivery again as soon as the worker's next round, with the same id and
/// bytes, whatever its status: a failed one leaves the dead letters, and a delivered one
/// is sent again for a receiver that lost it (receivers deduplicate by
/// `idempotencyKey`). Its retry schedule starts over.
async fn retry_delivery(
    State(state): State<AdminState>,
    caller: Caller,
    _: NoQuery,
    Path((id, delivery_id)): Path<(String, String)>,
    RawBody(body): RawBody,
) -> ApiResult<Json<Value>> {
    owned_endpoint(&state, &caller, &id).await?;
    if !body.iter().all(u8::is_ascii_whitespace) {
        parse_body::<NoFields>(&body)?;
    }
    let not_found = || ApiError::not_found("Delivery");
    let delivery = state
        .store
        .webhook_delivery(&delivery_id)
        .await?
        .ok_or_else(not_found)?;
    // Another endpoint's delivery is not in this endpoint's list: 404, as for an API
    // key under another group.
    if delivery.webhook_id != id {
        return Err(not_found());
    }
    let delivery = state
        .store
        .retry_webhook_delivery(&delivery_id, state.clock.now())
        .await?
        .ok_or_else(not_found)?;
    Ok(Json(delivery_json(&delivery)))
}
