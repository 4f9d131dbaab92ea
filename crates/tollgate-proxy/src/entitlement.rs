//! What a caller may call: a slug in its own group's `models` that names a live endpoint
//! of its workspace. Both failures are the same 404, so a key learns nothing about slugs
//! outside its group.

use tollgate_core::hierarchy::{limits_for_slug, EffectiveLimit};
use tollgate_store::{Endpoint, Store};

use crate::auth::Caller;
use crate::error::ProxyError;

/// A call the caller may make: where it goes and the limits that gate it.
#[derive(Debug, Clone)]
pub struct Entitlement {
    pub endpoint: Endpoint,
    /// Every limit gating this (group, slug), for admission.
    pub limits: Vec<EffectiveLimit>,
}

pub async fn entitlement(
    store: &dyn Store,
    caller: &Caller,
    slug: &str,
) -> Result<Entitlement, ProxyError> {
    let not_found = || ProxyError::ModelNotFound(slug.to_owned());
    let limits = limits_for_slug(&caller.chain, slug).ok_or_else(not_found)?;
    let endpoint = store
        .endpoint_by_slug(slug)
        .await
        .map_err(|e| ProxyError::from_store(&format!("reading endpoint {slug}"), &e))?
        .filter(|endpoint| endpoint.workspace_id == caller.workspace_id)
        .ok_or_else(not_found)?;
    Ok(Entitlement { endpoint, limits })
}
