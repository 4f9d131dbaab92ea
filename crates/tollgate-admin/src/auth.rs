//! Management-key authentication, run before every management route.
//!
//! `Authorization: Api-Key <key>` or `Bearer <key>`; the key is found by its 16-character
//! prefix and compared to the stored SHA-256 in constant time. Missing or unknown → 401;
//! a disabled workspace → 403; a `view` key on anything but GET/HEAD → 403. The caller's
//! workspace and scope travel to handlers as a [`Caller`] request extension.

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use tollgate_core::keys::{key_matches, lookup_prefix, single_authorization, AuthorizationError};
use tollgate_store::Scope;

use crate::error::ApiError;
use crate::AdminState;

/// The authenticated operator of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub workspace_id: String,
    pub scope: Scope,
    /// Prefix of the management key used.
    pub key_prefix: String,
}

impl Caller {
    /// 403 unless `workspace_id` is the caller's own workspace.
    pub fn owns(&self, workspace_id: &str, what: &str) -> Result<(), ApiError> {
        if self.workspace_id == workspace_id {
            Ok(())
        } else {
            Err(ApiError::other_workspace(what))
        }
    }
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
}

/// The middleware: authenticates, checks the scope, and stores the [`Caller`].
pub async fn authenticate(
    State(state): State<AdminState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let caller = caller_of(&state, request.headers(), request.method()).await?;
    request.extensions_mut().insert(caller);
    Ok(next.run(request).await)
}

async fn caller_of(
    state: &AdminState,
    headers: &axum::http::HeaderMap,
    method: &Method,
) -> Result<Caller, ApiError> {
    let values = headers.get_all(header::AUTHORIZATION).iter();
    let key = single_authorization(values.map(HeaderValue::as_bytes)).map_err(|e| match e {
        AuthorizationError::Missing => unauthorized(
            "Missing Authorization header; send `Authorization: Api-Key <management key>`",
        ),
        AuthorizationError::Ambiguous => unauthorized("Send exactly one Authorization header."),
        AuthorizationError::Malformed => unauthorized(
            "Malformed Authorization header; send `Api-Key <management key>` or `Bearer <management key>`",
        ),
    })?;
    let invalid = || unauthorized("Invalid management key");
    let prefix = lookup_prefix(key).ok_or_else(invalid)?;
    let (stored, workspace) = state
        .store
        .management_key_by_prefix(prefix)
        .await?
        .ok_or_else(invalid)?;
    if !key_matches(key, &stored.hash) {
        return Err(invalid());
    }
    if !workspace.is_enabled {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "workspace_disabled",
            "This workspace is not enabled for the gateway",
        ));
    }
    if stored.scope == Scope::View && method != Method::GET && method != Method::HEAD {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "insufficient_scope",
            "This management key has the view scope, which allows GET requests only",
        ));
    }
    Ok(Caller {
        workspace_id: workspace.id,
        scope: stored.scope,
        key_prefix: stored.prefix,
    })
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| ApiError::internal("management route reached without authentication"))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::body::Body;
    use axum::http::Request;
    use tollgate_core::secretbox::SecretBox;
    use tollgate_core::SystemClock;
    use tollgate_store::SqliteStore;
    use tower::ServiceExt as _;

    use crate::AdminState;

    /// The management key cannot be checked while the database is away: that is the
    /// database's 503, not the caller's 401.
    #[tokio::test]
    async fn a_key_check_without_a_database_is_503_not_401() {
        let store = Arc::new(SqliteStore::open("sqlite::memory:").await.unwrap());
        // Every call now fails as a database that is gone does.
        store.close().await;
        let router = crate::router(AdminState {
            store,
            clock: Arc::new(SystemClock),
            sealer: Arc::new(SecretBox::new(&[7; 32])),
            allow_private_networks: false,
        });
        for (method, path) in [
            ("GET", "/v1/gateway/groups"),
            ("POST", "/v1/gateway/secrets"),
        ] {
            let request = Request::builder()
                .method(method)
                .uri(path)
                .header("authorization", format!("Api-Key tgm_{}", "a".repeat(40)))
                .header("content-type", "application/json")
                .body(Body::from("{}"))
                .unwrap();
            let response = router.clone().oneshot(request).await.unwrap();
            assert_eq!(response.status(), 503, "{method} {path}");
            assert_eq!(response.headers()["retry-after"], "5");
            let body = axum::body::to_bytes(response.into_body(), 1024)
                .await
                .unwrap();
            assert_eq!(
                serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
                serde_json::json!({
                    "error": "The database is unavailable; retry shortly.",
                    "code": "database_unavailable",
                })
            );
        }
    }
}
