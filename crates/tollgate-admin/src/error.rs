//! The one error type management handlers return, and its wire shape.
//!
//! A caller's mistake becomes `{"error": "<message>", "code": "<stable_snake_case>"}` with
//! a 4xx status; the codes are listed in `docs/management-api.md` and never change
//! meaning. An internal failure is answered as an opaque 500 `internal_error` so no
//! store detail reaches the caller; its detail rides in a response extension to
//! [`log_internal_errors`], which logs it once with the request id. A database that cannot
//! be reached (`StoreError::is_unavailable`) is a 503 `database_unavailable` with
//! `Retry-After: 5` instead — also when the management key itself could not be looked up.

use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tollgate_core::hierarchy::HierarchyError;
use tollgate_core::ids::RequestId;
use tollgate_store::{GroupWriteError, StoreError};

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Logged (never sent) for internal errors.
    internal: Option<String>,
    /// Seconds for a `Retry-After` header.
    retry_after: Option<u32>,
}

/// Seconds a caller is told to wait (`Retry-After`) while the database is unavailable.
pub const DATABASE_RETRY_AFTER_SECS: u32 = 5;

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            internal: None,
            retry_after: None,
        }
    }

    /// 400 `invalid_payload`: a field of the body has a wrong value; `field` is its JSON
    /// path (`models[0].slug`).
    pub fn invalid_field(field: &str, reason: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_payload",
            format!("{field}: {reason}"),
        )
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }

    /// 403 for an object that exists but belongs to another workspace.
    pub fn other_workspace(what: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("{what} belongs to another workspace"),
        )
    }

    /// An unexpected failure: logged at the boundary, answered as an opaque 500.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal_error",
            message: "Internal server error".to_owned(),
            internal: Some(detail.to_string()),
            retry_after: None,
        }
    }

    /// 503 `database_unavailable` with `Retry-After: 5`: the database cannot be reached
    /// for now. The detail is logged at the boundary like an internal error's.
    pub fn database_unavailable(detail: impl std::fmt::Display) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "database_unavailable",
            message: "The database is unavailable; retry shortly.".to_owned(),
            internal: Some(detail.to_string()),
            retry_after: Some(DATABASE_RETRY_AFTER_SECS),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn code(&self) -> &'static str {
        self.code
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

/// The detail of an internal error, carried from the handler to the logging layer.
#[derive(Debug, Clone)]
struct InternalDetail(String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message, "code": self.code });
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(detail) = self.internal {
            response.extensions_mut().insert(InternalDetail(detail));
        }
        response
    }
}

/// Middleware: logs each internal error once, with the request id set by the server's
/// outer layer (when there is one).
pub async fn log_internal_errors(request: Request, next: Next) -> Response {
    let request_id = request
        .extensions()
        .get::<RequestId>()
        .map(|id| id.0.clone())
        .unwrap_or_default();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let mut response = next.run(request).await;
    let detail = response.extensions_mut().remove::<InternalDetail>();
    if let Some(InternalDetail(detail)) = detail {
        if response.status() == StatusCode::SERVICE_UNAVAILABLE {
            tracing::warn!(
                request_id = %request_id,
                %method,
                %path,
                error = %detail,
                "management API: database unavailable"
            );
            return response;
        }
        tracing::error!(
            request_id = %request_id,
            %method,
            %path,
            error = %detail,
            "management API internal error"
        );
    }
    response
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if e.is_unavailable() {
            ApiError::database_unavailable(e)
        } else {
            ApiError::internal(e)
        }
    }
}

impl From<HierarchyError> for ApiError {
    fn from(e: HierarchyError) -> Self {
        let code = match e {
            HierarchyError::ExceedsParent => "exceeds_parent_limit",
            HierarchyError::ModeMismatch { .. } => "mode_mismatch",
            HierarchyError::TooDeep => "max_depth_exceeded",
        };
        ApiError::bad_request(code, e.to_string())
    }
}

impl From<GroupWriteError> for ApiError {
    fn from(e: GroupWriteError) -> Self {
        match e {
            GroupWriteError::Hierarchy(h) => h.into(),
            GroupWriteError::ParentNotFound => ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "hierarchy.parent_group_id: parent group not found",
            ),
            GroupWriteError::DuplicateExternalId => ApiError::bad_request(
                "duplicate_external_entity_id",
                "metadata.external_entity_id: a live group of this workspace already has this id",
            ),
            GroupWriteError::NotFound => ApiError::not_found("Group"),
            GroupWriteError::Store(s) => s.into(),
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exceeds_parent_keeps_the_reference_message() {
        let e = ApiError::from(GroupWriteError::Hierarchy(HierarchyError::ExceedsParent));
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(e.code(), "exceeds_parent_limit");
        assert_eq!(e.message(), "Child group exceeds parent group limit.");
    }

    #[tokio::test]
    async fn an_unreachable_database_is_a_503_with_retry_after() {
        let e = ApiError::from(StoreError::Database(sqlx::Error::PoolTimedOut));
        let response = e.into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "5");
        assert_eq!(
            response
                .extensions()
                .get::<InternalDetail>()
                .map(|d| d.0.as_str()),
            Some("database error: pool timed out while waiting for an open connection")
        );
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
        // A store error that is not about reaching the database stays an opaque 500.
        let e = ApiError::from(StoreError::Corrupt("status".into()));
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn internal_errors_are_opaque() {
        let e = ApiError::internal("disk I/O error at /var/lib/tollgate.db");
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(e.code(), "internal_error");
        assert_eq!(e.message(), "Internal server error");
        let response = e.into_response();
        assert_eq!(
            response
                .extensions()
                .get::<InternalDetail>()
                .map(|d| d.0.as_str()),
            Some("disk I/O error at /var/lib/tollgate.db")
        );
    }
}
