//! A strict JSON body extractor.
//!
//! The body is read as bytes whatever the `Content-Type` (automation often omits it),
//! must be UTF-8 and one JSON value. Unknown fields, wrong types and missing fields are
//! 400s whose message starts with the JSON path of the offending value
//! (`models[0].rate_limits[0].threshold: invalid type: ...`), so a caller always learns
//! which field to fix.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Deserializer};

use crate::error::ApiError;
use crate::objects_only::ObjectsOnly;

/// A request body parsed strictly into `T` (whose types use `deny_unknown_fields`).
#[derive(Debug)]
pub struct StrictJson<T>(pub T);

impl<S, T> FromRequest<S> for StrictJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let RawBody(bytes) = RawBody::from_request(req, state).await?;
        parse_body(&bytes).map(StrictJson)
    }
}

/// The body as bytes, for routes that must see exactly what was sent (signatures).
#[derive(Debug)]
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Bytes::from_request(req, state)
            .await
            .map(RawBody)
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "payload_too_large",
                        "Request body is too large",
                    )
                } else {
                    ApiError::bad_request("invalid_json", "Request body could not be read")
                }
            })
    }
}

/// Parses a whole body strictly; see the module docs for the error messages.
pub fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| ApiError::bad_request("invalid_json", "Request body is not valid UTF-8"))?;
    if text.trim().is_empty() {
        return Err(ApiError::bad_request(
            "invalid_json",
            "Request body is empty; a JSON object is required",
        ));
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let value = serde_path_to_error::deserialize(ObjectsOnly(&mut de)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        describe(&path, &inner)
    })?;
    de.end()
        .map_err(|e| ApiError::bad_request("invalid_json", format!("Malformed JSON: {}", e)))?;
    Ok(value)
}

fn describe(path: &str, error: &serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    let field = if path == "." { "body" } else { path };
    match error.classify() {
        Category::Data => ApiError::invalid_field(field, without_position(&error.to_string())),
        // `1e400` is valid JSON whose value no number type holds: a value out of range,
        // not a syntax error (admin_groups::numbers_beyond_any_float_name_the_field).
        Category::Syntax if error.to_string().starts_with("number out of range") => {
            ApiError::invalid_field(field, "number out of range")
        }
        Category::Syntax | Category::Eof | Category::Io => {
            ApiError::bad_request("invalid_json", format!("Malformed JSON: {error}"))
        }
    }
}

/// serde_json appends ` at line 1 column 42` to data errors (the path says more), and
/// serde names Rust types (`expected struct CreateGroup`), which mean nothing on the wire.
fn without_position(message: &str) -> String {
    let message = match message.rfind(" at line ") {
        Some(at) => &message[..at],
        None => message,
    };
    match message.find("expected struct ") {
        Some(at) => format!("{}expected a JSON object", &message[..at]),
        None => message.to_owned(),
    }
}

/// For `Option<T>` fields that must be present but may be `null`
/// (`hierarchy.parent_group_id`): with `deserialize_with`, serde no longer treats a
/// missing field as `None`.
pub fn required_nullable<'de, D, T>(de: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(de)
}

/// For PATCH fields where absent, `null` and a value mean three different things:
/// use with `#[serde(default, deserialize_with = "json::patch_field")]` on an
/// `Option<Option<T>>` — absent → `None`, `null` → `Some(None)`.
pub fn patch_field<'de, D, T>(de: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(de).map(Some)
}

/// For fields that are refused whatever their value (immutable ones): true when the
/// field is present, `null` included. Use with `#[serde(default, deserialize_with =
/// "json::present")]` on a `bool`.
pub fn present<'de, D>(de: D) -> Result<bool, D::Error>
where
    D: Deserializer<'de>,
{
    IgnoredAny::deserialize(de).map(|_| true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        inner: Vec<Inner>,
        #[serde(default, deserialize_with = "present")]
        frozen: bool,
        #[serde(deserialize_with = "required_nullable")]
        parent: Option<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        threshold: u64,
    }

    fn error_of(body: &[u8]) -> (StatusCode, &'static str, String) {
        let e = parse_body::<Outer>(body).unwrap_err();
        (e.status(), e.code(), e.message().to_owned())
    }

    #[test]
    fn wrong_types_name_the_field_path() {
        let (status, code, message) =
            error_of(br#"{"inner": [{"threshold": 1}, {"threshold": -1}], "parent": null}"#);
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(code, "invalid_payload");
        assert_eq!(
            message,
            "inner[1].threshold: invalid value: integer `-1`, expected u64"
        );
        let (_, _, message) = error_of(br#"{"inner": [{"threshold": 1.5}], "parent": null}"#);
        assert_eq!(
            message,
            "inner[0].threshold: invalid type: floating point `1.5`, expected u64"
        );
        let (_, _, message) = error_of(br#"{"inner": [{"threshold": "10"}], "parent": null}"#);
        assert_eq!(
            message,
            "inner[0].threshold: invalid type: string \"10\", expected u64"
        );
        let (_, _, message) =
            error_of(br#"{"inner": [{"threshold": 18446744073709551616}], "parent": null}"#);
        assert!(message.starts_with("inner[0].threshold: "), "{message}");
    }

    #[test]
    fn unknown_and_missing_fields_are_named() {
        let (_, code, message) =
            error_of(br#"{"inner": [{"threshold": 1, "extra": 2}], "parent": null}"#);
        assert_eq!(code, "invalid_payload");
        assert!(
            message.starts_with("inner[0].extra: unknown field `extra`"),
            "{message}"
        );
        let (_, _, message) = error_of(br#"{"inner": []}"#);
        assert_eq!(message, "body: missing field `parent`");
    }

    #[test]
    fn malformed_bodies() {
        assert_eq!(error_of(b"{\"inner\": [").1, "invalid_json");
        assert_eq!(error_of(b"").1, "invalid_json");
        let (_, code, message) = error_of(br#"{"inner": [], "parent": null} {}"#);
        assert_eq!(code, "invalid_json");
        assert!(
            message.starts_with("Malformed JSON: trailing characters"),
            "{message}"
        );
        let (status, code, message) = error_of(b"{\"inner\": \"\xff\"}");
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(code, "invalid_json");
        assert_eq!(message, "Request body is not valid UTF-8");
    }

    #[test]
    fn out_of_range_numbers_and_enum_types_name_the_field() {
        let (_, code, message) = error_of(br#"{"inner": [{"threshold": 1e400}], "parent": null}"#);
        assert_eq!(code, "invalid_payload");
        assert_eq!(message, "inner[0].threshold: number out of range");
        let (_, _, message) = error_of(b"-1e400");
        assert_eq!(message, "body: number out of range");
        let e = parse_body::<Mode>(br#"{"mode": null}"#).unwrap_err();
        assert_eq!(e.code(), "invalid_payload");
        assert_eq!(
            e.message(),
            "mode: invalid type: null, expected `INDEPENDENT` or `CASCADING`"
        );
        let e = parse_body::<Mode>(br#"{"mode": {"CASCADING": null}}"#).unwrap_err();
        assert_eq!(
            e.message(),
            "mode: invalid type: map, expected `INDEPENDENT` or `CASCADING`"
        );
        let ok: Mode = parse_body(br#"{"mode": "CASCADING"}"#).unwrap();
        assert_eq!(ok.mode, tollgate_core::LimitMode::Cascading);
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Mode {
        mode: tollgate_core::LimitMode,
    }

    #[test]
    fn arrays_are_not_objects() {
        let (_, code, message) = error_of(br#"[[{"threshold": 1}], false, null]"#);
        assert_eq!(code, "invalid_payload");
        assert_eq!(
            message,
            "body: invalid type: sequence, expected a JSON object"
        );
        let (_, _, message) = error_of(br#"{"inner": [[1]], "parent": null}"#);
        assert_eq!(
            message,
            "inner[0]: invalid type: sequence, expected a JSON object"
        );
    }

    #[test]
    fn present_and_nullable_fields() {
        let o: Outer =
            parse_body(br#"{"inner": [{"threshold": 0}], "parent": null, "frozen": null}"#)
                .unwrap();
        assert_eq!(o.inner[0].threshold, 0);
        assert!(o.frozen);
        assert_eq!(o.parent, None);
        let o: Outer = parse_body(br#"{"inner": [], "parent": "g"}"#).unwrap();
        assert!(!o.frozen);
        assert_eq!(o.parent.as_deref(), Some("g"));
    }
}
