//! Query strings: list paging (`limit`, `cursor`) and the refusal of anything unknown.
//!
//! A cursor is the URL-safe base64 (no padding) of `<list>:<sequence number of the last
//! row returned>` — opaque to callers, keyset-based underneath, so a walk over all pages
//! never repeats or skips a row that existed for the whole walk. The list name makes a
//! cursor handed to another list a 400 instead of a page that silently skips rows. Every route
//! refuses query parameters it does not know (400), so a misspelt filter never silently
//! returns everything.

use std::collections::BTreeMap;

use axum::extract::{FromRequestParts, RawQuery};
use axum::http::request::Parts;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Serialize;
use serde_json::{json, Value};
use tollgate_store::{Page, PageRequest};

use crate::error::ApiError;

pub const DEFAULT_LIMIT: u32 = 100;
pub const MAX_LIMIT: u32 = 1000;

/// A list request: the page wanted and the values of the route's filters.
#[derive(Debug, Clone)]
pub struct ListQuery {
    pub page: PageRequest,
    pub filters: BTreeMap<&'static str, String>,
}

/// Parses a list route's query string; `list` names the list (as given to [`page_json`]),
/// `filters` are the extra names the route accepts.
pub fn parse_list_query(
    raw: Option<&str>,
    list: &str,
    filters: &[&'static str],
) -> Result<ListQuery, ApiError> {
    let mut limit = None;
    let mut cursor = None;
    let mut values = BTreeMap::new();
    for (name, value) in pairs(raw) {
        let seen = match name.as_str() {
            "limit" => limit.replace(parse_limit(&value)?).is_some(),
            "cursor" => cursor.replace(parse_cursor(list, &value)?).is_some(),
            other => match filters.iter().find(|f| **f == other) {
                Some(known) => values.insert(*known, value).is_some(),
                None => return Err(unknown_parameter(other, filters)),
            },
        };
        if seen {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("{name}: query parameter given more than once"),
            ));
        }
    }
    Ok(ListQuery {
        page: PageRequest {
            limit: limit.unwrap_or(DEFAULT_LIMIT),
            after: cursor.flatten(),
        },
        filters: values,
    })
}

fn pairs(raw: Option<&str>) -> Vec<(String, String)> {
    raw.map(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    })
    .unwrap_or_default()
}

fn unknown_parameter(name: &str, filters: &[&'static str]) -> ApiError {
    let mut known = vec!["limit", "cursor"];
    known.extend_from_slice(filters);
    ApiError::bad_request(
        "invalid_query",
        format!(
            "{name}: unknown query parameter (accepted: {})",
            known.join(", ")
        ),
    )
}

fn parse_limit(value: &str) -> Result<u32, ApiError> {
    match value.parse::<u32>() {
        Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        _ => Err(ApiError::bad_request(
            "invalid_query",
            format!("limit: must be an integer in 1..={MAX_LIMIT}"),
        )),
    }
}

/// An empty cursor means the first page (convenient for shell loops); anything else
/// must be a cursor this API handed out for `list`.
fn parse_cursor(list: &str, value: &str) -> Result<Option<i64>, ApiError> {
    if value.is_empty() {
        return Ok(None);
    }
    let malformed = || ApiError::bad_request("invalid_cursor", "cursor: malformed cursor");
    let bytes = URL_SAFE_NO_PAD.decode(value).map_err(|_| malformed())?;
    let text = String::from_utf8(bytes).map_err(|_| malformed())?;
    let (from, after) = text.rsplit_once(':').ok_or_else(malformed)?;
    let after: i64 = match after.parse() {
        Ok(n) if n >= 0 && !after.starts_with('+') => n,
        _ => return Err(malformed()),
    };
    if from != list {
        return Err(ApiError::bad_request(
            "invalid_cursor",
            "cursor: belongs to another list",
        ));
    }
    Ok(Some(after))
}

pub fn encode_cursor(list: &str, after: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("{list}:{after}"))
}

/// `{"items": [...], "pagination": {"has_more", "cursor"}}`; `list` names the list in
/// the cursor.
pub fn page_json<T, U: Serialize>(list: &str, page: Page<T>, render: impl FnMut(T) -> U) -> Value {
    let items: Vec<U> = page.items.into_iter().map(render).collect();
    json!({
        "items": items,
        "pagination": {
            "has_more": page.next_after.is_some(),
            "cursor": page.next_after.map(|after| encode_cursor(list, after)),
        }
    })
}

/// For routes that take no query parameters: any parameter is a 400.
#[derive(Debug, Clone, Copy)]
pub struct NoQuery;

impl<S: Send + Sync> FromRequestParts<S> for NoQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let RawQuery(raw) = RawQuery::from_request_parts(parts, state)
            .await
            .unwrap_or(RawQuery(None));
        match pairs(raw.as_deref()).into_iter().next() {
            Some((name, _)) => Err(ApiError::bad_request(
                "invalid_query",
                format!("{name}: unknown query parameter (this route accepts none)"),
            )),
            None => Ok(NoQuery),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(raw: &str) -> (&'static str, String) {
        let e = parse_list_query(Some(raw), "groups", &["external_entity_id"]).unwrap_err();
        assert_eq!(e.status(), axum::http::StatusCode::BAD_REQUEST);
        (e.code(), e.message().to_owned())
    }

    #[test]
    fn defaults_and_filters() {
        let q = parse_list_query(None, "groups", &[]).unwrap();
        assert_eq!(q.page.limit, 100);
        assert_eq!(q.page.after, None);
        let q = parse_list_query(
            Some("limit=1000&external_entity_id=cust%2042&cursor="),
            "groups",
            &["external_entity_id"],
        )
        .unwrap();
        assert_eq!(q.page.limit, 1000);
        assert_eq!(q.filters["external_entity_id"], "cust 42");
    }

    #[test]
    fn limits_outside_the_range_are_refused() {
        for bad in [
            "limit=0",
            "limit=1001",
            "limit=-1",
            "limit=ten",
            "limit=1.5",
            "limit=",
        ] {
            assert_eq!(
                message(bad),
                (
                    "invalid_query",
                    "limit: must be an integer in 1..=1000".to_owned()
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let cursor = encode_cursor("groups", 42);
        let q = parse_list_query(Some(&format!("cursor={cursor}")), "groups", &[]).unwrap();
        assert_eq!(q.page.after, Some(42));
        assert_eq!(
            message("cursor=!!!"),
            ("invalid_cursor", "cursor: malformed cursor".to_owned())
        );
        assert_eq!(message("cursor=AAAA").0, "invalid_cursor");
        for forged in ["groups:-1", "groups:+1", "groups:", "groups", "groups:1x"] {
            let cursor = URL_SAFE_NO_PAD.encode(forged);
            assert_eq!(
                message(&format!("cursor={cursor}")),
                ("invalid_cursor", "cursor: malformed cursor".to_owned()),
                "{forged}"
            );
        }
        assert_eq!(
            message(&format!("cursor={}", encode_cursor("secrets", 42))),
            (
                "invalid_cursor",
                "cursor: belongs to another list".to_owned()
            )
        );
    }

    #[test]
    fn unknown_and_repeated_parameters_are_refused() {
        assert_eq!(
            message("external_id=x"),
            (
                "invalid_query",
                "external_id: unknown query parameter (accepted: limit, cursor, external_entity_id)"
                    .to_owned()
            )
        );
        assert_eq!(
            message("limit=1&limit=2"),
            (
                "invalid_query",
                "limit: query parameter given more than once".to_owned()
            )
        );
    }
}
