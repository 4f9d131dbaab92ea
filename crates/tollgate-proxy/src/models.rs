//! `GET /v1/models`: the caller's callable slugs in the OpenAI list shape — its own
//! group's slugs that name a live endpoint, in the group's order.

use serde::Serialize;
use tollgate_store::Store;

use crate::auth::Caller;
use crate::entitlement::entitlement;
use crate::error::ProxyError;

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelEntry>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ModelEntry {
    pub id: String,
    pub object: &'static str,
    /// Unix seconds: when the endpoint was created.
    pub created: i64,
    /// The slug's prefix (`acme` for `acme/m`).
    pub owned_by: String,
}

pub async fn callable_models(store: &dyn Store, caller: &Caller) -> Result<ModelList, ProxyError> {
    let mut data = Vec::new();
    let own_slugs = caller
        .chain
        .first()
        .map(|g| g.models.as_slice())
        .unwrap_or_default();
    for model in own_slugs {
        match entitlement(store, caller, &model.slug).await {
            Ok(allowed) => data.push(ModelEntry {
                id: model.slug.clone(),
                object: "model",
                created: allowed.endpoint.created_at.millis().div_euclid(1000),
                owned_by: owner(&model.slug).to_owned(),
            }),
            Err(ProxyError::ModelNotFound(_)) => {}
            Err(other) => return Err(other),
        }
    }
    Ok(ModelList {
        object: "list",
        data,
    })
}

fn owner(slug: &str) -> &str {
    slug.split_once('/').map_or(slug, |(prefix, _)| prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_is_the_slug_prefix() {
        assert_eq!(owner("acme/m"), "acme");
        assert_eq!(owner("meta-llama/Llama-3.1-8B"), "meta-llama");
        assert_eq!(owner("bare"), "bare");
    }
}
