//! API keys and management keys: `<prefix>.<secret>`.
//!
//! The prefix is 16 characters (`tg_` + 13 base62 for customer keys, `tgm_` + 12 base62
//! for management keys) and is how a key is found; the secret is 32 base62 characters
//! from the OS CSPRNG. Only the SHA-256 of the whole key is stored and compared in
//! constant time.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::ids::random_base62;

pub const PREFIX_LEN: usize = 16;
pub const SECRET_LEN: usize = 32;
/// Registered (operator-issued) keys: accepted lengths and minimum entropy.
pub const REGISTERED_MIN_LEN: usize = 32;
pub const REGISTERED_MAX_LEN: usize = 128;
pub const REGISTERED_MIN_ENTROPY: f64 = 3.0;

/// A freshly minted key: the full text (shown once) and what is stored.
#[derive(Debug, Clone)]
pub struct MintedKey {
    pub full: String,
    pub prefix: String,
    pub hash: [u8; 32],
}

fn mint(tag: &str) -> MintedKey {
    let prefix = format!("{tag}{}", random_base62(PREFIX_LEN - tag.len()));
    let full = format!("{prefix}.{}", random_base62(SECRET_LEN));
    let hash = hash_key(&full);
    MintedKey { full, prefix, hash }
}

/// A new customer API key, `tg_...`.
pub fn mint_api_key() -> MintedKey {
    mint("tg_")
}

/// A new management key, `tgm_...`.
pub fn mint_management_key() -> MintedKey {
    mint("tgm_")
}

pub fn hash_key(full: &str) -> [u8; 32] {
    Sha256::digest(full.as_bytes()).into()
}

/// Constant-time check of a presented key against a stored hash.
pub fn key_matches(presented: &str, stored_hash: &[u8]) -> bool {
    let hash = hash_key(presented);
    stored_hash.len() == hash.len() && bool::from(hash.ct_eq(stored_hash))
}

/// The lookup prefix of a presented key: its first 16 characters, if it has that many.
pub fn lookup_prefix(presented: &str) -> Option<&str> {
    presented.get(..PREFIX_LEN)
}

/// Shannon entropy in bits per character.
pub fn shannon_entropy(text: &str) -> f64 {
    let mut counts = std::collections::HashMap::new();
    let mut total = 0_u32;
    for c in text.chars() {
        *counts.entry(c).or_insert(0_u32) += 1;
        total += 1;
    }
    if total == 0 {
        return 0.0;
    }
    let total = f64::from(total);
    counts
        .values()
        .map(|&n| {
            let p = f64::from(n) / total;
            -p * p.log2()
        })
        .sum()
}

/// Why an operator-issued key cannot be registered (the caller checks prefix clashes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisteredKeyError {
    #[error("key: must be {REGISTERED_MIN_LEN}..={REGISTERED_MAX_LEN} characters")]
    Length,
    #[error("key: must be printable ASCII without spaces")]
    Charset,
    #[error("key: entropy too low (at least {REGISTERED_MIN_ENTROPY} bits per character)")]
    Entropy,
}

pub fn validate_registered_key(key: &str) -> Result<(), RegisteredKeyError> {
    let len = key.chars().count();
    if !(REGISTERED_MIN_LEN..=REGISTERED_MAX_LEN).contains(&len) {
        return Err(RegisteredKeyError::Length);
    }
    if !key.bytes().all(|c| c.is_ascii_graphic()) {
        return Err(RegisteredKeyError::Charset);
    }
    if shannon_entropy(key) < REGISTERED_MIN_ENTROPY {
        return Err(RegisteredKeyError::Entropy);
    }
    Ok(())
}

/// The key in an `Authorization` header: `Bearer <key>` or `Api-Key <key>` (scheme
/// case-insensitive). `None` when the header has another shape.
pub fn parse_authorization(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    let key = rest.trim();
    let known = scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("api-key");
    (known && !key.is_empty() && !key.contains(' ')).then_some(key)
}

/// Why a request carries no usable key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthorizationError {
    /// No `Authorization` header.
    Missing,
    /// Two or more `Authorization` headers: which one counts would depend on who reads
    /// them, so none does.
    Ambiguous,
    /// Not `Bearer <key>` / `Api-Key <key>`, or not text.
    Malformed,
}

/// The key of the one `Authorization` header among `values` (every value of that header,
/// as raw bytes).
pub fn single_authorization<'a>(
    mut values: impl Iterator<Item = &'a [u8]>,
) -> Result<&'a str, AuthorizationError> {
    let value = values.next().ok_or(AuthorizationError::Missing)?;
    if values.next().is_some() {
        return Err(AuthorizationError::Ambiguous);
    }
    // Visible ASCII only (what HTTP's `to_str` accepts): a key never holds anything else.
    if !value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
    {
        return Err(AuthorizationError::Malformed);
    }
    let text = std::str::from_utf8(value).map_err(|_| AuthorizationError::Malformed)?;
    parse_authorization(text).ok_or(AuthorizationError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_keys_have_the_documented_shape() {
        let key = mint_api_key();
        assert_eq!(key.prefix.len(), 16);
        assert!(key.prefix.starts_with("tg_"));
        assert_eq!(key.full.len(), 16 + 1 + 32);
        assert_eq!(&key.full[..16], key.prefix);
        assert_eq!(&key.full[16..17], ".");
        assert!(key_matches(&key.full, &key.hash));
        assert!(!key_matches(&format!("{}x", key.full), &key.hash));
        assert_eq!(mint_management_key().prefix.len(), 16);
    }

    #[test]
    fn entropy_of_known_strings() {
        assert_eq!(shannon_entropy("aaaa"), 0.0);
        assert!((shannon_entropy("abcd") - 2.0).abs() < 1e-12);
        assert!((shannon_entropy("0123456789abcdef") - 4.0).abs() < 1e-12);
    }

    #[test]
    fn registered_keys_need_length_and_entropy() {
        assert_eq!(
            validate_registered_key(&"a".repeat(31)),
            Err(RegisteredKeyError::Length)
        );
        assert_eq!(
            validate_registered_key(&"x".repeat(129)),
            Err(RegisteredKeyError::Length)
        );
        assert_eq!(
            validate_registered_key(&"ab".repeat(20)),
            Err(RegisteredKeyError::Entropy)
        );
        assert_eq!(
            validate_registered_key("acme_live_9fK2mQ7xLp3Rt8Vw1Zy4Bn6Cd0Ej5Gh"),
            Ok(())
        );
        assert_eq!(
            validate_registered_key("acme live 9fK2mQ7xLp3Rt8Vw1Zy4Bn6Cd0Ej5Gh"),
            Err(RegisteredKeyError::Charset)
        );
    }

    #[test]
    fn exactly_one_authorization_header() {
        let one: [&[u8]; 1] = [b"Bearer k"];
        assert_eq!(single_authorization(one.into_iter()), Ok("k"));
        assert_eq!(
            single_authorization(std::iter::empty()),
            Err(AuthorizationError::Missing)
        );
        let two: [&[u8]; 2] = [b"Bearer k", b"Bearer j"];
        assert_eq!(
            single_authorization(two.into_iter()),
            Err(AuthorizationError::Ambiguous)
        );
        for bad in [&b"Bearer \xff"[..], "Bearer tg_\u{e9}x".as_bytes()] {
            assert_eq!(
                single_authorization([bad].into_iter()),
                Err(AuthorizationError::Malformed)
            );
        }
    }

    #[test]
    fn authorization_schemes() {
        assert_eq!(parse_authorization("Bearer abc"), Some("abc"));
        assert_eq!(parse_authorization("bearer abc"), Some("abc"));
        assert_eq!(parse_authorization("Api-Key abc"), Some("abc"));
        assert_eq!(parse_authorization("Basic abc"), None);
        assert_eq!(parse_authorization("Bearer"), None);
        assert_eq!(parse_authorization("Bearer "), None);
    }
}
