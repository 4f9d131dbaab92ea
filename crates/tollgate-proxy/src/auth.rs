//! Who is calling: the API key in `Authorization: Bearer|Api-Key <key>`, found by its
//! first 16 characters and compared in constant time against the stored hash.
//!
//! Every failure after the header shape (unknown, revoked, deleted group, disabled
//! workspace, wrong secret) is the same `InvalidKey`, so a caller learns nothing.

use axum::http::{header, HeaderMap, HeaderValue};
use tollgate_core::keys::{key_matches, lookup_prefix, single_authorization, AuthorizationError};
use tollgate_core::Group;
use tollgate_store::Store;

use crate::error::ProxyError;

/// An authenticated caller: its key and the key's live group chain.
#[derive(Debug, Clone)]
pub struct Caller {
    pub key_prefix: String,
    /// `[group, parent, ..., root]`, never empty.
    pub chain: Vec<Group>,
    pub workspace_id: String,
    /// The key's own group (`chain[0]`).
    pub group_id: String,
    pub external_entity_id: String,
}

/// The presented key, or why the header cannot carry one. Two `Authorization` headers
/// are refused: which one counts would depend on who reads them.
pub fn presented_key(headers: &HeaderMap) -> Result<&str, ProxyError> {
    let values = headers.get_all(header::AUTHORIZATION).iter();
    single_authorization(values.map(HeaderValue::as_bytes)).map_err(|e| match e {
        AuthorizationError::Missing => ProxyError::MissingKey,
        AuthorizationError::Ambiguous => ProxyError::AmbiguousKey,
        AuthorizationError::Malformed => ProxyError::MalformedKey,
    })
}

pub async fn authenticate(store: &dyn Store, headers: &HeaderMap) -> Result<Caller, ProxyError> {
    let key = presented_key(headers)?;
    let prefix = lookup_prefix(key).ok_or(ProxyError::InvalidKey)?;
    let grant = store
        .resolve_api_key(prefix)
        .await
        .map_err(|e| ProxyError::from_store("resolving an API key", &e))?
        .ok_or(ProxyError::InvalidKey)?;
    if !key_matches(key, &grant.key.hash) || !grant.workspace.is_enabled {
        return Err(ProxyError::InvalidKey);
    }
    let Some(own) = grant.chain.first() else {
        return Err(ProxyError::InvalidKey);
    };
    Ok(Caller {
        group_id: own.id.clone(),
        external_entity_id: own.external_entity_id.clone(),
        key_prefix: grant.key.prefix,
        chain: grant.chain,
        workspace_id: grant.workspace.id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(value: &[u8]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_bytes(value).unwrap(),
        );
        headers
    }

    #[test]
    fn bearer_and_api_key_schemes_carry_the_key() {
        assert_eq!(
            presented_key(&headers(b"Bearer tg_abc.def")).unwrap(),
            "tg_abc.def"
        );
        assert_eq!(
            presented_key(&headers(b"Api-Key tg_abc.def")).unwrap(),
            "tg_abc.def"
        );
    }

    #[test]
    fn two_authorization_headers_are_refused() {
        let mut two = headers(b"Bearer tg_abc.def");
        two.append(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer tg_abc.def"),
        );
        assert!(matches!(presented_key(&two), Err(ProxyError::AmbiguousKey)));
    }

    #[test]
    fn missing_and_malformed_headers() {
        assert!(matches!(
            presented_key(&HeaderMap::new()),
            Err(ProxyError::MissingKey)
        ));
        for bad in [
            &b"Basic abc"[..],
            b"Bearer",
            b"tg_abc.def",
            b"Bearer \xff\xfe",
        ] {
            assert!(
                matches!(presented_key(&headers(bad)), Err(ProxyError::MalformedKey)),
                "{bad:?}"
            );
        }
    }
}
