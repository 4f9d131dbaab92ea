//! Checks on single text fields of a payload. Lengths count characters (Unicode scalar
//! values), not bytes; control characters (CR, LF, NUL, ...) are refused everywhere
//! because names and ids end up in logs, headers and CSV exports.

use crate::error::ApiError;

/// Longest name or external id accepted.
pub const MAX_TEXT_LEN: usize = 255;

/// A required text of `min..=max` characters without control characters.
pub fn check_text(field: &str, value: &str, min: usize, max: usize) -> Result<(), ApiError> {
    let len = value.chars().count();
    if len < min || len > max {
        let reason = if min == 0 {
            format!("must be at most {max} characters")
        } else {
            format!("must be {min}..={max} characters")
        };
        return Err(ApiError::invalid_field(field, reason));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::invalid_field(
            field,
            "must not contain control characters (CR, LF, tab, ...)",
        ));
    }
    Ok(())
}

/// An optional name: absent or `null` is fine, otherwise at most 255 characters.
pub fn check_name(field: &str, value: Option<&str>) -> Result<(), ApiError> {
    match value {
        Some(name) => check_text(field, name, 0, MAX_TEXT_LEN),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_count_characters() {
        assert!(check_text("name", &"é".repeat(255), 1, 255).is_ok());
        let e = check_text("name", &"é".repeat(256), 1, 255).unwrap_err();
        assert_eq!(e.message(), "name: must be 1..=255 characters");
        let e = check_text("name", "", 1, 255).unwrap_err();
        assert_eq!(e.message(), "name: must be 1..=255 characters");
        let e = check_name("metadata.name", Some(&"x".repeat(256))).unwrap_err();
        assert_eq!(e.message(), "metadata.name: must be at most 255 characters");
        assert!(check_name("metadata.name", None).is_ok());
    }

    #[test]
    fn control_characters_are_refused() {
        let e = check_text("metadata.external_entity_id", "a\r\nb", 1, 255).unwrap_err();
        assert_eq!(e.code(), "invalid_payload");
        assert_eq!(
            e.message(),
            "metadata.external_entity_id: must not contain control characters (CR, LF, tab, ...)"
        );
        assert!(check_text("name", "a\u{0}", 1, 255).is_err());
        assert!(check_text("name", "Équipe 🚀 Δ", 1, 255).is_ok());
    }
}
