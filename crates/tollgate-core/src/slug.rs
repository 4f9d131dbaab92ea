//! Model slugs: `prefix/name`, the public id a customer puts in `model`.

/// Longest accepted slug.
pub const MAX_SLUG_LEN: usize = 255;

/// Checks a slug's shape: two non-empty parts around one `/`, each of ASCII letters,
/// digits, `-`, `_` and `.`. Returns the reason when it is not one.
pub fn validate_slug(slug: &str) -> Result<(), &'static str> {
    if slug.is_empty() || slug.len() > MAX_SLUG_LEN {
        return Err("must be 1..=255 characters");
    }
    let Some((prefix, name)) = slug.split_once('/') else {
        return Err("must have the form prefix/name");
    };
    let part_ok = |part: &str| {
        !part.is_empty()
            && part
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    };
    if !part_ok(prefix) || !part_ok(name) {
        return Err("must have the form prefix/name using letters, digits, '-', '_' and '.'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_prefix_slash_name() {
        assert_eq!(validate_slug("acme/m"), Ok(()));
        assert_eq!(validate_slug("demo/echo"), Ok(()));
        assert_eq!(validate_slug("meta-llama/Llama-3.1-8B_v2"), Ok(()));
    }

    #[test]
    fn refuses_other_shapes() {
        assert!(validate_slug("").is_err());
        assert!(validate_slug("noslash").is_err());
        assert!(validate_slug("a/b/c").is_err());
        assert!(validate_slug("/b").is_err());
        assert!(validate_slug("a/").is_err());
        assert!(validate_slug("a b/c").is_err());
        assert!(validate_slug(&format!("a/{}", "x".repeat(300))).is_err());
    }
}
