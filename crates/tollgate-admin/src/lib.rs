//! The management API (`/v1/gateway/*`), wire-compatible with the Frontier Gateway API.
//!
//! One router file per resource, merged in [`router`]. Handlers are thin: they parse and
//! validate input, call the [`Store`](tollgate_store::Store) and map outcomes to
//! `{"error", "code"}` answers. Every route sits behind [`auth::authenticate`]; unknown
//! paths under `/v1/gateway` and unsupported methods answer in the same JSON shape.

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::any;
use tollgate_core::secretbox::SecretBox;
use tollgate_core::Clock;
use tollgate_store::Store;

mod api_keys;
pub mod auth;
mod endpoints;
pub mod error;
mod events;
mod fields;
mod groups;
pub mod json;
mod management_keys;
pub mod network;
mod objects_only;
mod openapi;
pub mod pagination;
mod params;
mod secrets;
mod signing_key;
mod webhooks;

pub use api_keys::SIGNATURE_HEADER;
pub use error::ApiError;

/// Largest management request body (a group with hundreds of models is far smaller).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// What every management handler can reach.
#[derive(Clone)]
pub struct AdminState {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub sealer: Arc<SecretBox>,
    /// `TOLLGATE_ALLOW_PRIVATE_NETWORKS`: lets upstream and webhook URLs resolve to
    /// loopback / private / link-local addresses.
    pub allow_private_networks: bool,
}

/// All management routes, ready to merge into the server's router. It sets no router
/// fallback (so merging never clashes); unknown `/v1/gateway/*` paths are caught by a
/// wildcard route instead.
pub fn router(state: AdminState) -> axum::Router {
    axum::Router::new()
        .merge(endpoints::router())
        .merge(secrets::router())
        .merge(groups::router())
        .merge(api_keys::router())
        .merge(management_keys::router())
        .merge(signing_key::router())
        .merge(webhooks::router())
        .merge(events::router())
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        // The OpenAPI document is public: it describes routes, never data.
        .merge(openapi::router())
        .method_not_allowed_fallback(method_not_allowed)
        .route("/v1/gateway", any(unknown_route))
        .route("/v1/gateway/", any(unknown_route))
        .route("/v1/gateway/{*rest}", any(unknown_route))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(error::log_internal_errors))
        .with_state(state)
}

async fn unknown_route() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "No such management route",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "This route does not support this HTTP method",
    )
}
