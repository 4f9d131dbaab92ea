//! `GET /v1/gateway/events`: the usage-event pull API (SPEC §3).
//!
//! Items have the exact shape of the events in a webhook body
//! ([`tollgate_billing::EventJson`]). Pages follow the store's sequence number, which is
//! assigned in commit order: an event committed after a cursor was handed out always
//! lands after it, so a walk over every page never repeats an event and never skips one
//! that was stored before the walk began — even while requests are being served
//! (`events_api::paging_is_stable_while_requests_are_served`). Ordering by `timestamp`
//! could not promise that: a request stamped earlier may commit later than a page
//! already read. `timestamp` is taken when the request ends, a moment before its event
//! is queued for commit, so along this order it ascends per instance except by that
//! moment, and across instances only up to their clock skew (`docs/management-api.md`).

use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tollgate_billing::EventJson;
use tollgate_core::Timestamp;
use tollgate_store::UsageFilter;

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::pagination::{encode_cursor, parse_list_query};
use crate::AdminState;

/// The list's name in its cursors.
const LIST: &str = "events";

/// Query parameters besides `limit` and `cursor`.
const FILTERS: &[&str] = &[
    "start_time",
    "end_time",
    "external_entity_id",
    "api_key_prefix",
];

pub fn router() -> Router<AdminState> {
    Router::new().route("/v1/gateway/events", get(list))
}

async fn list(
    State(state): State<AdminState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> ApiResult<Response> {
    let mut query = parse_list_query(raw.as_deref(), LIST, FILTERS)?;
    let start_time = time_parameter("start_time", query.filters.remove("start_time"))?;
    let end_time = time_parameter("end_time", query.filters.remove("end_time"))?;
    if let (Some(start), Some(end)) = (start_time, end_time) {
        if start >= end {
            return Err(ApiError::bad_request(
                "invalid_query",
                "end_time: must be after start_time",
            ));
        }
    }
    let filter = UsageFilter {
        workspace_id: Some(caller.workspace_id),
        external_entity_id: query.filters.remove("external_entity_id"),
        api_key_prefix: query.filters.remove("api_key_prefix"),
        start_time,
        end_time,
        ..UsageFilter::default()
    };
    let page = state.store.list_usage_events(&filter, query.page).await?;
    Ok(Json(EventsPage {
        items: page.items.iter().map(EventJson).collect(),
        pagination: Pagination {
            has_more: page.next_after.is_some(),
            cursor: page.next_after.map(|after| encode_cursor(LIST, after)),
        },
    })
    .into_response())
}

/// The list shape of every management list. Items are serialized straight from
/// [`EventJson`] rather than through a `serde_json::Value`, so `requestMetadata` reaches
/// the caller byte for byte as the client sent it (an integer beyond 64 bits included),
/// exactly as in a webhook body.
#[derive(Serialize)]
struct EventsPage<'a> {
    items: Vec<EventJson<'a>>,
    pagination: Pagination,
}

#[derive(Serialize)]
struct Pagination {
    has_more: bool,
    cursor: Option<String>,
}

/// An RFC 3339 time (any offset) as UTC milliseconds. Sub-millisecond digits round up,
/// which keeps both bounds exact for millisecond timestamps: `t >= ceil(start)` holds
/// exactly when `t >= start`, and `t < ceil(end)` exactly when `t < end`.
fn time_parameter(name: &str, value: Option<String>) -> Result<Option<Timestamp>, ApiError> {
    let Some(text) = value else {
        return Ok(None);
    };
    let malformed = || {
        ApiError::bad_request(
            "invalid_query",
            format!(
                "{name}: must be an RFC 3339 time such as 2026-12-03T17:53:24Z \
                 (send a '+' offset as %2B)"
            ),
        )
    };
    let at = OffsetDateTime::parse(&text, &Rfc3339).map_err(|_| malformed())?;
    let millis = (at.unix_timestamp_nanos() + 999_999).div_euclid(1_000_000);
    i64::try_from(millis)
        .map(|ms| Some(Timestamp(ms)))
        .map_err(|_| malformed())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Option<i64> {
        time_parameter("start_time", Some(text.to_owned()))
            .ok()
            .flatten()
            .map(|t| t.0)
    }

    #[test]
    fn times_are_rfc3339_in_any_offset() {
        assert_eq!(parsed("2026-12-03T17:53:24.123Z"), Some(1_796_320_404_123));
        assert_eq!(
            parsed("2026-12-04T02:53:24.123+09:00"),
            Some(1_796_320_404_123)
        );
        assert_eq!(parsed("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(time_parameter("end_time", None).unwrap(), None);
    }

    #[test]
    fn sub_millisecond_digits_round_up() {
        assert_eq!(parsed("1970-01-01T00:00:00.0001Z"), Some(1));
        assert_eq!(parsed("1970-01-01T00:00:00.001Z"), Some(1));
        assert_eq!(parsed("1970-01-01T00:00:00.001000001Z"), Some(2));
        assert_eq!(parsed("1969-12-31T23:59:59.9995Z"), Some(0));
    }

    #[test]
    fn malformed_times_name_the_parameter() {
        for bad in [
            "",
            "yesterday",
            "2026-12-03",
            "2026-12-03T17:53:24",
            "2026-12-03 17:53:24 09:00",
            "1796320404123",
            "2026-13-03T17:53:24Z",
        ] {
            let e = time_parameter("end_time", Some(bad.to_owned())).unwrap_err();
            assert_eq!(e.status(), axum::http::StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(e.code(), "invalid_query");
            assert_eq!(
                e.message(),
                "end_time: must be an RFC 3339 time such as 2026-12-03T17:53:24Z \
                 (send a '+' offset as %2B)",
                "{bad}"
            );
        }
    }
}
