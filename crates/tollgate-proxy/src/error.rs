//! The data plane's boundary error: what a caller sees, OpenAI-shaped
//! (`{"error": {"message", "type", "param", "code"}}`).
//!
//! Caller mistakes map to a 4xx with a stable `code`; upstream failures to 502 / 504;
//! a configuration or limit store that cannot be read to an opaque 503; anything else
//! internal is logged once, with the request id, and answered as an opaque 500.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.")]
    MissingKey,
    #[error("The Authorization header must be 'Bearer <key>' or 'Api-Key <key>'.")]
    MalformedKey,
    #[error("Send exactly one Authorization header.")]
    AmbiguousKey,
    /// Unknown, revoked, of a deleted group, or of a disabled workspace: one answer.
    #[error("Incorrect API key provided.")]
    InvalidKey,
    /// Outside the group's models, or no live endpoint: one answer for both.
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotFound(String),
    #[error("{message}")]
    BadRequest {
        message: String,
        /// The request field at fault, when there is one.
        param: Option<&'static str>,
    },
    #[error("Request body exceeds the limit of {limit} bytes.")]
    PayloadTooLarge { limit: usize },
    #[error("The model server could not be reached.")]
    UpstreamUnreachable,
    #[error("The model server sent no response within {} s.", .0.as_secs_f64())]
    UpstreamTimeout(Duration),
    /// The upstream refused the gateway's credentials (its status: 401 or 403).
    #[error("The model server refused the gateway's credentials.")]
    UpstreamAuthFailed(u16),
    /// The upstream answered something the gateway cannot pass on (a redirect, a body
    /// over the size bound).
    #[error("The model server sent an invalid response.")]
    UpstreamInvalid,
    /// The limiter could not decide (its stored day usage could not be read): nothing
    /// was admitted. The context is logged, the caller gets an opaque 503.
    #[error("limits unavailable: {0}")]
    LimitsUnavailable(String),
    /// The configuration a request needs could not be read (an API key not yet in memory
    /// while the database is unreachable). The database's loss is logged once by the
    /// configuration mirror; the caller gets an opaque 503.
    #[error("configuration unavailable: {0}")]
    ConfigUnavailable(String),
    /// Never shown: the context is logged, the caller gets an opaque 500.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ProxyError {
    pub fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ProxyError::BadRequest {
            message: message.into(),
            param,
        }
    }

    /// A store failure while doing `context`: 503 when the database is unavailable (the
    /// request may succeed shortly), 500 otherwise.
    pub fn from_store(context: &str, error: &tollgate_store::StoreError) -> Self {
        if error.is_unavailable() {
            ProxyError::ConfigUnavailable(format!("{context}: {error}"))
        } else {
            ProxyError::Internal(format!("{context}: {error}"))
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::MissingKey
            | ProxyError::MalformedKey
            | ProxyError::AmbiguousKey
            | ProxyError::InvalidKey => StatusCode::UNAUTHORIZED,
            ProxyError::ModelNotFound(_) => StatusCode::NOT_FOUND,
            ProxyError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ProxyError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::UpstreamUnreachable
            | ProxyError::UpstreamAuthFailed(_)
            | ProxyError::UpstreamInvalid => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::LimitsUnavailable(_) | ProxyError::ConfigUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// `(type, code)` of the OpenAI error object.
    fn kind(&self) -> (&'static str, &'static str) {
        match self {
            ProxyError::MissingKey
            | ProxyError::MalformedKey
            | ProxyError::AmbiguousKey
            | ProxyError::InvalidKey => ("invalid_request_error", "invalid_api_key"),
            ProxyError::ModelNotFound(_) => ("invalid_request_error", "model_not_found"),
            ProxyError::BadRequest { .. } => ("invalid_request_error", "invalid_request_error"),
            ProxyError::PayloadTooLarge { .. } => ("invalid_request_error", "request_too_large"),
            ProxyError::UpstreamUnreachable => ("upstream_error", "upstream_unreachable"),
            ProxyError::UpstreamTimeout(_) => ("upstream_error", "upstream_timeout"),
            ProxyError::UpstreamAuthFailed(_) => ("upstream_error", "upstream_auth_failed"),
            ProxyError::UpstreamInvalid => ("upstream_error", "upstream_invalid_response"),
            ProxyError::LimitsUnavailable(_) => ("server_error", "limits_unavailable"),
            ProxyError::ConfigUnavailable(_) => ("server_error", "service_unavailable"),
            ProxyError::Internal(_) => ("server_error", "internal_error"),
        }
    }

    /// The response, logging server-side failures once with the request id.
    pub fn into_logged_response(self, request_id: &str) -> Response {
        match &self {
            ProxyError::Internal(context) => {
                tracing::error!(request_id, error = %context, "data-plane request failed");
            }
            ProxyError::LimitsUnavailable(context) => {
                tracing::error!(request_id, error = %context, "limits could not be checked");
            }
            ProxyError::ConfigUnavailable(context) => {
                tracing::debug!(request_id, error = %context, "configuration could not be read");
            }
            ProxyError::UpstreamAuthFailed(status) => {
                tracing::warn!(
                    request_id,
                    upstream_status = status,
                    "the model server refused the target's secret; check the endpoint's secret_id"
                );
            }
            ProxyError::UpstreamUnreachable
            | ProxyError::UpstreamTimeout(_)
            | ProxyError::UpstreamInvalid => {
                tracing::warn!(request_id, error = %self, "upstream failure");
            }
            _ => {}
        }
        self.into_response()
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let message = match &self {
            ProxyError::Internal(_) => "Internal error.".to_owned(),
            ProxyError::LimitsUnavailable(_) => {
                "Limits could not be checked; retry shortly.".to_owned()
            }
            ProxyError::ConfigUnavailable(_) => {
                "The gateway cannot read its configuration right now; retry shortly.".to_owned()
            }
            other => other.to_string(),
        };
        let param = match &self {
            ProxyError::BadRequest { param, .. } => *param,
            _ => None,
        };
        let (kind, code) = self.kind();
        error_response(self.status(), &message, kind, param, Some(code))
    }
}

/// An OpenAI-shaped error body with `status`.
pub fn error_response(
    status: StatusCode,
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Response {
    let body = error_body(message, kind, param, code);
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body.to_string(),
    )
        .into_response()
}

pub fn error_body(
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> serde_json::Value {
    json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn parts(error: ProxyError) -> (u16, serde_json::Value) {
        let response = error.into_logged_response("req_test");
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn auth_errors_are_401_invalid_api_key() {
        for error in [
            ProxyError::MissingKey,
            ProxyError::MalformedKey,
            ProxyError::AmbiguousKey,
            ProxyError::InvalidKey,
        ] {
            let (status, body) = parts(error).await;
            assert_eq!(status, 401);
            assert_eq!(body["error"]["code"], "invalid_api_key");
            assert_eq!(body["error"]["type"], "invalid_request_error");
            assert_eq!(body["error"]["param"], serde_json::Value::Null);
        }
    }

    #[tokio::test]
    async fn model_not_found_names_the_slug() {
        let (status, body) = parts(ProxyError::ModelNotFound("acme/m".into())).await;
        assert_eq!(status, 404);
        assert_eq!(
            body,
            json!({"error": {
                "message": "The model `acme/m` does not exist or you do not have access to it.",
                "type": "invalid_request_error",
                "param": null,
                "code": "model_not_found",
            }})
        );
    }

    #[tokio::test]
    async fn too_large_names_the_limit() {
        let (status, body) = parts(ProxyError::PayloadTooLarge { limit: 1024 }).await;
        assert_eq!(status, 413);
        assert_eq!(
            body["error"]["message"],
            "Request body exceeds the limit of 1024 bytes."
        );
        assert_eq!(body["error"]["code"], "request_too_large");
    }

    #[tokio::test]
    async fn upstream_failures_are_502_and_504() {
        let (status, body) = parts(ProxyError::UpstreamUnreachable).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (502, Some("upstream_unreachable"))
        );
        let (status, body) = parts(ProxyError::UpstreamTimeout(Duration::from_millis(1500))).await;
        assert_eq!(status, 504);
        assert_eq!(
            body["error"]["message"],
            "The model server sent no response within 1.5 s."
        );
    }

    #[tokio::test]
    async fn internal_errors_are_opaque() {
        let (status, body) = parts(ProxyError::Internal("database is locked".into())).await;
        assert_eq!(status, 500);
        assert_eq!(body["error"]["message"], "Internal error.");
        assert_eq!(body["error"]["code"], "internal_error");
    }

    #[tokio::test]
    async fn a_limiter_failure_is_an_opaque_503() {
        let (status, body) =
            parts(ProxyError::LimitsUnavailable("database is locked".into())).await;
        assert_eq!(status, 503);
        assert_eq!(
            body,
            json!({"error": {
                "message": "Limits could not be checked; retry shortly.",
                "type": "server_error",
                "param": null,
                "code": "limits_unavailable",
            }})
        );
    }

    #[tokio::test]
    async fn an_unreadable_configuration_is_an_opaque_503() {
        let (status, body) = parts(ProxyError::ConfigUnavailable("pool timed out".into())).await;
        assert_eq!(status, 503);
        assert_eq!(
            body,
            json!({"error": {
                "message": "The gateway cannot read its configuration right now; retry shortly.",
                "type": "server_error",
                "param": null,
                "code": "service_unavailable",
            }})
        );
    }

    #[tokio::test]
    async fn an_unavailable_store_is_503_and_a_broken_one_500() {
        let down = tollgate_store::StoreError::Database(sqlx::Error::PoolTimedOut);
        let (status, _) = parts(ProxyError::from_store("resolving an API key", &down)).await;
        assert_eq!(status, 503);
        let corrupt = tollgate_store::StoreError::Corrupt("bad targets".into());
        let (status, _) = parts(ProxyError::from_store("resolving an API key", &corrupt)).await;
        assert_eq!(status, 500);
    }

    #[tokio::test]
    async fn bad_request_names_the_param() {
        let (status, body) = parts(ProxyError::bad_request(
            "`model` must be a string.",
            Some("model"),
        ))
        .await;
        assert_eq!(status, 400);
        assert_eq!(body["error"]["param"], "model");
        assert_eq!(body["error"]["message"], "`model` must be a string.");
    }
}
