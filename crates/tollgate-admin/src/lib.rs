//! The management API (`/v1/gateway/*`), wire-compatible with the Frontier Gateway API.
//!
//! One router file per resource, merged in [`router`]. Handlers are thin: they parse and
//! validate input, call the [`Store`](tollgate_store::Store) and map outcomes to
//! `{"error", "code"}` answers.

use std::sync::Arc;

use tollgate_core::secretbox::SecretBox;
use tollgate_core::Clock;
use tollgate_store::Store;

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

/// All management routes, ready to merge into the server's router.
pub fn router(state: AdminState) -> axum::Router {
    axum::Router::new().with_state(state)
}
