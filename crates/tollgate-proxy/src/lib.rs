//! The OpenAI-compatible data plane: auth → entitlement → limits → upstream → metering
//! (→ the usage outbox's group commit).
//!
//! `routes` holds the thin handlers; each stage is its own module. The binary wraps
//! [`router`] in the middleware that sets [`tollgate_core::ids::RequestId`].

pub mod auth;
pub mod entitlement;
pub mod error;
pub mod limits;
pub mod metering;
pub mod models;
pub mod outbox;
pub mod relay;
pub mod request;
mod routes;
pub mod spool;
pub mod tap;
pub mod upstream;

use std::sync::Arc;
use std::time::Duration;

use tollgate_core::secretbox::SecretBox;
use tollgate_core::Clock;
use tollgate_limits::Limiter;
use tollgate_store::Store;

pub use upstream::http_client;

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// `TOLLGATE_MAX_BODY_BYTES`, default 10 MiB.
    pub max_body_bytes: usize,
    /// Time allowed for an upstream's response headers, default 60 s; also the longest
    /// silence allowed between two reads of its body (a stalled stream ends there).
    pub first_byte_timeout: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 10 * 1024 * 1024,
            first_byte_timeout: Duration::from_secs(60),
        }
    }
}

/// What every data-plane handler can reach.
#[derive(Clone)]
pub struct ProxyState {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub sealer: Arc<SecretBox>,
    /// Admits every inference request before its upstream is contacted.
    pub limiter: Arc<dyn Limiter>,
    pub config: ProxyConfig,
    /// Build it with [`http_client`]: no total timeout, no redirects, Nagle off.
    pub http: reqwest::Client,
    /// Where usage events are committed, grouped ([`outbox::Outbox::start`]).
    pub outbox: outbox::Outbox,
}

/// All data-plane routes (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`,
/// `/v1/models`).
pub fn router(state: ProxyState) -> axum::Router {
    routes::router(state)
}
