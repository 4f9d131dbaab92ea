//! Opaque identifiers: a short type prefix and 22 base62 characters from the OS CSPRNG.

use rand::rngs::OsRng;
use rand::RngCore;

pub const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Bytes below this (4 × 62) map to a base62 character by `byte % 62` without bias; the
/// others are skipped.
const UNBIASED_BELOW: u8 = 248;

/// `len` base62 characters from the OS CSPRNG.
///
/// The bytes are read from the OS in batches, not one read per character: an id is minted
/// for every proxied request and its usage event, and a `getrandom` call per character
/// was a tenth of the CPU of a non-streamed request.
pub fn random_base62(len: usize) -> String {
    let mut out = String::with_capacity(len);
    let mut batch = [0u8; 64];
    while out.len() < len {
        OsRng.fill_bytes(&mut batch);
        for byte in batch.iter().copied().filter(|b| *b < UNBIASED_BELOW) {
            if out.len() == len {
                break;
            }
            out.push(char::from(BASE62[usize::from(byte % 62)]));
        }
    }
    out
}

/// A new id such as `grp_4hX...`; the prefix says what kind of object it names.
pub fn new_id(kind: IdKind) -> String {
    format!("{}_{}", kind.prefix(), random_base62(22))
}

#[derive(Debug, Clone, Copy)]
pub enum IdKind {
    Workspace,
    Group,
    Endpoint,
    Secret,
    ManagementKey,
    Request,
    Event,
    Webhook,
    Delivery,
}

impl IdKind {
    fn prefix(self) -> &'static str {
        match self {
            IdKind::Workspace => "ws",
            IdKind::Group => "grp",
            IdKind::Endpoint => "ep",
            IdKind::Secret => "sec",
            IdKind::ManagementKey => "mk",
            IdKind::Request => "req",
            IdKind::Event => "evt",
            IdKind::Webhook => "wh",
            IdKind::Delivery => "dlv",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_prefixed_and_distinct() {
        let a = new_id(IdKind::Group);
        let b = new_id(IdKind::Group);
        assert!(a.starts_with("grp_"));
        assert_eq!(a.len(), 4 + 22);
        assert_ne!(a, b);
        assert!(a[4..].bytes().all(|c| c.is_ascii_alphanumeric()));
    }

    #[test]
    fn random_base62_has_the_asked_length_past_one_batch() {
        for len in [0, 1, 22, 63, 64, 65, 200] {
            let s = random_base62(len);
            assert_eq!(s.len(), len);
            assert!(s.bytes().all(|c| BASE62.contains(&c)));
        }
    }

    #[test]
    fn random_base62_uses_every_character() {
        // 62 characters in 20,000 draws: a character missing means a bias or a wrong map
        let s = random_base62(20_000);
        for c in BASE62 {
            assert!(s.as_bytes().contains(c), "{} never drawn", char::from(*c));
        }
    }
}

/// The gateway's own id of one HTTP request, set by the outermost middleware, returned in
/// `x-request-id` and written into the usage event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);
