//! Opaque identifiers: a short type prefix and 22 base62 characters from the OS CSPRNG.

use rand::rngs::OsRng;
use rand::Rng;

pub const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// `len` base62 characters from the OS CSPRNG.
pub fn random_base62(len: usize) -> String {
    let mut rng = OsRng;
    (0..len)
        .map(|_| char::from(BASE62[rng.gen_range(0..BASE62.len())]))
        .collect()
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
}

/// The gateway's own id of one HTTP request, set by the outermost middleware, returned in
/// `x-request-id` and written into the usage event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);
