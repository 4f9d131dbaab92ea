//! The OpenAI-compatible data plane: auth → entitlement → limits → upstream → metering.

pub mod tap;

use std::sync::Arc;
use std::time::Duration;

use tollgate_core::secretbox::SecretBox;
use tollgate_core::Clock;
use tollgate_store::Store;

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// `TOLLGATE_MAX_BODY_BYTES`, default 10 MiB.
    pub max_body_bytes: usize,
    /// Time allowed for an upstream's response headers, default 60 s.
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
    pub config: ProxyConfig,
    pub http: reqwest::Client,
}

/// All data-plane routes (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`,
/// `/v1/models`).
pub fn router(state: ProxyState) -> axum::Router {
    axum::Router::new().with_state(state)
}
