//! Calling the model server: target order, failover, health memory, the HTTP call.
//!
//! Targets are tried in their configured order, except that a target which failed in the
//! last [`UNHEALTHY_FOR_MS`] goes after the healthy ones. A target that refuses the
//! connection, fails before answering, or answers 5xx is given up for the next one —
//! safe because nothing has reached the client yet. A 4xx is the caller's and is
//! returned as is. No response headers within `first_byte_timeout` ends the request (504).

use std::collections::HashMap;
use std::time::Duration;

use axum::http::{header, HeaderMap};
use bytes::Bytes;
use tokio::sync::Mutex;
use tollgate_core::endpoint::Target;
use tollgate_core::Timestamp;

use crate::error::ProxyError;
use crate::request::{InferenceRoute, ParsedRequest};
use crate::ProxyState;

/// How long a failed target stays behind the healthy ones.
pub const UNHEALTHY_FOR_MS: i64 = 10_000;

/// The shared upstream client: no total timeout (streams last minutes), a connect
/// timeout, Nagle off so tokens leave as they come, and no redirects (an upstream
/// redirect is answered 502, never followed with the secret attached).
pub fn http_client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
}

/// When each target last failed. A target is named by its base URL and model.
#[derive(Debug, Default)]
pub struct TargetHealth {
    failed_at: Mutex<HashMap<String, Timestamp>>,
}

fn target_name(target: &Target) -> String {
    format!("{} {}", target.base_url, target.target_model)
}

impl TargetHealth {
    /// `targets` with the recently failed ones moved last, each part in configured order.
    pub async fn order<'a>(&self, targets: &'a [Target], now: Timestamp) -> Vec<&'a Target> {
        let failed_at = self.failed_at.lock().await;
        let is_healthy = |t: &Target| {
            failed_at
                .get(&target_name(t))
                .is_none_or(|at| now.0.saturating_sub(at.0) >= UNHEALTHY_FOR_MS)
        };
        let (healthy, failing): (Vec<&Target>, Vec<&Target>) =
            targets.iter().partition(|t| is_healthy(t));
        healthy.into_iter().chain(failing).collect()
    }

    pub async fn record_failure(&self, target: &Target, now: Timestamp) {
        let mut failed_at = self.failed_at.lock().await;
        failed_at.insert(target_name(target), now);
    }

    pub async fn record_success(&self, target: &Target) {
        let mut failed_at = self.failed_at.lock().await;
        failed_at.remove(&target_name(target));
    }
}

/// One request to send, the same for every target but for `model`.
pub struct UpstreamCall<'a> {
    pub route: InferenceRoute,
    pub request: &'a ParsedRequest,
    /// The client's `Accept`, the only client header forwarded.
    pub client_headers: &'a HeaderMap,
    pub request_id: &'a str,
}

/// Sends the request to the endpoint's targets in health order. Returns the first
/// non-5xx response, else the last 5xx one; 502 when no target answered at all and 504
/// when one did not answer in time.
pub async fn send(
    state: &ProxyState,
    health: &TargetHealth,
    targets: &[Target],
    call: &UpstreamCall<'_>,
) -> Result<reqwest::Response, ProxyError> {
    let mut last_server_error = None;
    for target in health.order(targets, state.clock.now()).await {
        let attempt = send_to(state, target, call);
        let outcome = tokio::time::timeout(state.config.first_byte_timeout, attempt).await;
        match outcome {
            Err(_elapsed) => {
                health.record_failure(target, state.clock.now()).await;
                return Err(ProxyError::UpstreamTimeout(state.config.first_byte_timeout));
            }
            Ok(Err(failure)) => {
                tracing::warn!(
                    request_id = call.request_id,
                    base_url = %target.base_url,
                    error = %failure,
                    "upstream target failed; trying the next one"
                );
                health.record_failure(target, state.clock.now()).await;
            }
            Ok(Ok(response)) if response.status().is_server_error() => {
                tracing::warn!(
                    request_id = call.request_id,
                    base_url = %target.base_url,
                    status = response.status().as_u16(),
                    "upstream target answered a server error; trying the next one"
                );
                health.record_failure(target, state.clock.now()).await;
                last_server_error = Some(response);
            }
            Ok(Ok(response)) => {
                health.record_success(target).await;
                return Ok(response);
            }
        }
    }
    last_server_error.ok_or(ProxyError::UpstreamUnreachable)
}

/// Why one target could not be used.
#[derive(Debug, thiserror::Error)]
enum TargetFailure {
    #[error("{0}")]
    Http(#[from] reqwest::Error),
    #[error("secret {0} is missing or cannot be opened")]
    Secret(String),
    #[error("{0}")]
    Store(#[from] tollgate_store::StoreError),
    #[error("{0}")]
    Request(String),
}

async fn send_to(
    state: &ProxyState,
    target: &Target,
    call: &UpstreamCall<'_>,
) -> Result<reqwest::Response, TargetFailure> {
    let url = format!(
        "{}/{}",
        target.base_url.trim_end_matches('/'),
        call.route.upstream_path()
    );
    let body: Bytes = call
        .request
        .upstream_body(&target.target_model)
        .map_err(|e| TargetFailure::Request(e.to_string()))?;
    let mut builder = state
        .http
        .post(url)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body);
    if let Some(accept) = call.client_headers.get(header::ACCEPT) {
        builder = builder.header(header::ACCEPT, accept.clone());
    }
    if let Some(secret_id) = &target.secret_id {
        builder = builder.bearer_auth(open_secret(state, secret_id).await?);
    }
    Ok(builder.send().await?)
}

async fn open_secret(state: &ProxyState, secret_id: &str) -> Result<String, TargetFailure> {
    let missing = || TargetFailure::Secret(secret_id.to_owned());
    let secret = state.store.secret(secret_id).await?.ok_or_else(missing)?;
    let plain = state
        .sealer
        .open(&secret.ciphertext)
        .map_err(|_| missing())?;
    String::from_utf8(plain).map_err(|_| missing())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::endpoint::Provider;

    fn target(url: &str) -> Target {
        Target {
            provider: Provider::OpenaiCompatible,
            base_url: url.into(),
            target_model: "m".into(),
            secret_id: None,
        }
    }

    fn urls(order: &[&Target]) -> Vec<String> {
        order.iter().map(|t| t.base_url.clone()).collect()
    }

    #[tokio::test]
    async fn recently_failed_targets_go_last_for_ten_seconds() {
        let targets = [target("http://a"), target("http://b"), target("http://c")];
        let health = TargetHealth::default();
        assert_eq!(
            urls(&health.order(&targets, Timestamp(0)).await),
            ["http://a", "http://b", "http://c"]
        );

        health.record_failure(&targets[0], Timestamp(1_000)).await;
        health.record_failure(&targets[1], Timestamp(2_000)).await;
        assert_eq!(
            urls(&health.order(&targets, Timestamp(10_999)).await),
            ["http://c", "http://a", "http://b"]
        );
        assert_eq!(
            urls(&health.order(&targets, Timestamp(11_000)).await),
            ["http://a", "http://c", "http://b"]
        );
        health.record_success(&targets[1]).await;
        assert_eq!(
            urls(&health.order(&targets, Timestamp(11_000)).await),
            ["http://a", "http://b", "http://c"]
        );
    }
}
