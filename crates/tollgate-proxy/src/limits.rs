//! Limits on the data plane: admission before any upstream contact, and the reservation's
//! settlement once the request's fate is known (SPEC §2; the limiter itself is
//! `tollgate-limits`).
//!
//! [`admit`] asks the limiter for every limit gating (group, slug). A refusal is the 429
//! answered here: nothing was sent upstream, nothing reserved, nothing billed. An admission
//! yields a [`Settlement`] that travels with the request: it is settled with the
//! upstream's `prompt_tokens + completion_tokens` where the usage event is stored, and
//! refunded when the upstream failed. Every path ends it exactly once; a settlement
//! dropped unused (an early return, a body never polled) refunds itself.

use std::sync::Arc;

use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use tollgate_core::hierarchy::EffectiveLimit;
use tollgate_core::{Group, LimitUnit};
use tollgate_limits::{AdmitRequest, Decision, Limiter, RateHeaders, Refusal, Reservation};

use crate::auth::Caller;
use crate::error::{error_response, ProxyError};

/// What admission decided.
pub enum Admission {
    Admitted {
        settlement: Settlement,
        headers: RateHeaders,
    },
    /// The 429 to answer, headers included.
    Refused(Response),
}

/// Admits a call of `caller` on `slug` against `limits` (its `Entitlement`), reserving
/// `estimated_tokens` on every TOKEN counter.
pub async fn admit(
    limiter: &Arc<dyn Limiter>,
    caller: &Caller,
    limits: &[EffectiveLimit],
    slug: &str,
    estimated_tokens: u64,
) -> Result<Admission, ProxyError> {
    let mode = caller
        .chain
        .first()
        .map(|group| group.mode)
        .ok_or(ProxyError::InvalidKey)?;
    let tree_root = caller
        .chain
        .last()
        .map(|group| group.id.as_str())
        .ok_or(ProxyError::InvalidKey)?;
    let request = AdmitRequest {
        limits,
        slug,
        tree_root,
        mode,
        estimated_tokens,
    };
    let decision = limiter
        .admit(request)
        .await
        .map_err(|e| ProxyError::LimitsUnavailable(e.to_string()))?;
    Ok(match decision {
        Decision::Admitted {
            reservation,
            headers,
        } => Admission::Admitted {
            settlement: Settlement::new(Arc::clone(limiter), reservation),
            headers,
        },
        Decision::Refused(refusal) => Admission::Refused(refusal_response(
            &refusal,
            slug,
            &caller.chain,
            &caller.group_id,
        )),
    })
}

/// A token reservation on its way to being settled or refunded, exactly once.
pub struct Settlement {
    limiter: Arc<dyn Limiter>,
    /// `None` once settled or refunded.
    reservation: Option<Reservation>,
}

impl Settlement {
    pub fn new(limiter: Arc<dyn Limiter>, reservation: Reservation) -> Self {
        Self {
            limiter,
            reservation: Some(reservation),
        }
    }

    /// The upstream served the request: its reported (or estimated) total replaces the
    /// reservation.
    pub async fn settle(mut self, actual_tokens: u64) {
        if let Some(reservation) = self.reservation.take() {
            self.limiter.settle(reservation, actual_tokens).await;
        }
    }

    /// The upstream failed: the reserved tokens are given back (the request admission
    /// stays counted).
    pub async fn refund(mut self) {
        if let Some(reservation) = self.reservation.take() {
            self.limiter.refund(reservation).await;
        }
    }
}

impl Drop for Settlement {
    /// Neither settled nor refunded: the request ended without reaching either point
    /// (the client left before the upstream answered, an early return). Nothing was
    /// billed, so the tokens go back, on a task of their own.
    fn drop(&mut self) {
        let Some(reservation) = self.reservation.take() else {
            return;
        };
        let limiter = Arc::clone(&self.limiter);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move { limiter.refund(reservation).await });
            }
            Err(_) => tracing::error!(
                "no runtime to refund a token reservation; it stays counted until its window passes"
            ),
        }
    }
}

/// `limit`, `remaining` and `reset` header names of one type of limit.
struct RateHeaderNames {
    limit: HeaderName,
    remaining: HeaderName,
    reset: HeaderName,
}

const REQUEST_HEADERS: RateHeaderNames = RateHeaderNames {
    limit: HeaderName::from_static("x-ratelimit-limit-requests"),
    remaining: HeaderName::from_static("x-ratelimit-remaining-requests"),
    reset: HeaderName::from_static("x-ratelimit-reset-requests"),
};

const TOKEN_HEADERS: RateHeaderNames = RateHeaderNames {
    limit: HeaderName::from_static("x-ratelimit-limit-tokens"),
    remaining: HeaderName::from_static("x-ratelimit-remaining-tokens"),
    reset: HeaderName::from_static("x-ratelimit-reset-tokens"),
};

/// The `x-ratelimit-*` headers: for each type with a limit, its tightest limit's
/// `limit`, `remaining` and `reset`. A type without any limit gets none of its three
/// headers (an unlimited type has no tightest limit; `docs/limits.md`).
pub fn insert_rate_headers(rate: &RateHeaders, headers: &mut HeaderMap) {
    for (names, limit) in [
        (REQUEST_HEADERS, rate.requests),
        (TOKEN_HEADERS, rate.tokens),
    ] {
        let Some(limit) = limit else {
            continue;
        };
        headers.insert(names.limit, HeaderValue::from(limit.limit));
        headers.insert(names.remaining, HeaderValue::from(limit.remaining));
        if let Ok(reset) = HeaderValue::from_str(&openai_duration(limit.reset_ms)) {
            headers.insert(names.reset, reset);
        }
    }
}

/// A duration as OpenAI writes its reset headers (Go's `time.Duration` style, to the
/// millisecond): `20ms`, `1s`, `1.5s`, `6m0s`, `1h2m3s`. Negative input reads as 0.
pub fn openai_duration(millis: i64) -> String {
    let millis = millis.max(0);
    if millis == 0 {
        return "0s".to_owned();
    }
    if millis < 1000 {
        return format!("{millis}ms");
    }
    let hours = millis / 3_600_000;
    let minutes = millis % 3_600_000 / 60_000;
    let seconds = millis % 60_000 / 1000;
    let fraction = millis % 1000;
    let seconds = if fraction == 0 {
        format!("{seconds}s")
    } else {
        let digits = format!("{fraction:03}");
        format!("{seconds}.{}s", digits.trim_end_matches('0'))
    };
    if hours > 0 {
        format!("{hours}h{minutes}m{seconds}")
    } else if minutes > 0 {
        format!("{minutes}m{seconds}")
    } else {
        seconds
    }
}

/// The 429: OpenAI-shaped, naming the slug, the limit and the group(s) it is anchored
/// to; `Retry-After` in whole seconds and the `x-ratelimit-*` headers.
fn refusal_response(refusal: &Refusal, slug: &str, chain: &[Group], own_group: &str) -> Response {
    let limit = &refusal.limit;
    let is_daily = limit.unit == LimitUnit::Day;
    let code = if is_daily {
        "usage_limit_exceeded"
    } else {
        "rate_limit_exceeded"
    };
    let message = refusal_message(refusal, slug, chain, own_group);
    let mut response = error_response(
        StatusCode::TOO_MANY_REQUESTS,
        &message,
        "rate_limit_error",
        None,
        Some(code),
    );
    let headers = response.headers_mut();
    headers.insert(
        header::RETRY_AFTER,
        HeaderValue::from(refusal.retry_after_secs),
    );
    insert_rate_headers(&refusal.headers, headers);
    response
}

fn refusal_message(refusal: &Refusal, slug: &str, chain: &[Group], own_group: &str) -> String {
    let limit = &refusal.limit;
    let named = |id: &str| match chain.iter().find(|group| group.id == id) {
        Some(group) => format!("group {id} (external id {})", group.external_entity_id),
        None => format!("group {id}"),
    };
    let what = if limit.unit == LimitUnit::Day {
        "Usage limit"
    } else {
        "Rate limit"
    };
    let mut message = format!(
        "{what} reached for model `{slug}`: {}/{} {} of {}",
        limit.kind.as_str(),
        limit.unit.as_str(),
        limit.threshold,
        named(&limit.source_group),
    );
    if limit.counter_group != limit.source_group {
        // INDEPENDENT: an ancestor's declaration, counted on the caller's own counter.
        let counter = if limit.counter_group == own_group {
            "this key's group".to_owned()
        } else {
            named(&limit.counter_group)
        };
        message.push_str(&format!(", counted for {counter}"));
    }
    message.push_str(&format!(
        ". Retry after {} s{}.",
        refusal.retry_after_secs,
        if limit.unit == LimitUnit::Day {
            " (the day resets at 00:00 UTC)"
        } else {
            ""
        }
    ));
    message
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use async_trait::async_trait;
    use tollgate_core::{LimitMode, LimitType, Timestamp};
    use tollgate_limits::{HeaderLimit, LimiterError};

    use super::*;

    #[test]
    fn durations_read_as_openai_writes_them() {
        let cases = [
            (-5, "0s"),
            (0, "0s"),
            (20, "20ms"),
            (999, "999ms"),
            (1000, "1s"),
            (1500, "1.5s"),
            (8640, "8.64s"),
            (59_999, "59.999s"),
            (60_000, "1m0s"),
            (360_000, "6m0s"),
            (61_250, "1m1.25s"),
            (3_723_000, "1h2m3s"),
            (3_600_000, "1h0m0s"),
            (86_400_000, "24h0m0s"),
        ];
        for (millis, text) in cases {
            assert_eq!(openai_duration(millis), text, "{millis} ms");
        }
    }

    #[test]
    fn only_limited_types_get_headers() {
        let mut headers = HeaderMap::new();
        let rate = RateHeaders {
            requests: Some(HeaderLimit {
                limit: 5,
                remaining: 3,
                reset_ms: 600_000,
            }),
            tokens: None,
        };
        insert_rate_headers(&rate, &mut headers);
        let mut names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
            ]
        );
        assert_eq!(headers["x-ratelimit-limit-requests"], "5");
        assert_eq!(headers["x-ratelimit-remaining-requests"], "3");
        assert_eq!(headers["x-ratelimit-reset-requests"], "10m0s");
    }

    fn group(id: &str, ext: &str) -> Group {
        Group {
            id: id.into(),
            workspace_id: "ws".into(),
            name: None,
            external_entity_id: ext.into(),
            models: Vec::new(),
            mode: LimitMode::Cascading,
            parent_id: None,
            depth: 1,
            created_at: Timestamp(0),
        }
    }

    fn refusal(unit: LimitUnit, source: &str, counter: &str) -> Refusal {
        Refusal {
            limit: EffectiveLimit {
                kind: LimitType::Token,
                unit,
                threshold: 100,
                source_group: source.into(),
                counter_group: counter.into(),
            },
            retry_after_secs: 42,
            headers: RateHeaders::default(),
        }
    }

    #[test]
    fn refusals_name_slug_limit_and_group() {
        let chain = [group("grp_d", "d"), group("grp_o", "o")];
        assert_eq!(
            refusal_message(
                &refusal(LimitUnit::Day, "grp_o", "grp_o"),
                "acme/m",
                &chain,
                "grp_d"
            ),
            "Usage limit reached for model `acme/m`: TOKEN/DAY 100 of group grp_o \
             (external id o). Retry after 42 s (the day resets at 00:00 UTC)."
        );
        assert_eq!(
            refusal_message(
                &refusal(LimitUnit::Minute, "grp_o", "grp_d"),
                "acme/m",
                &chain,
                "grp_d"
            ),
            "Rate limit reached for model `acme/m`: TOKEN/MINUTE 100 of group grp_o \
             (external id o), counted for this key's group. Retry after 42 s."
        );
    }

    /// Counts what reaches the limiter.
    #[derive(Default)]
    struct Counting {
        settled: AtomicU64,
        refunded: AtomicU64,
    }

    #[async_trait]
    impl Limiter for Counting {
        async fn admit(&self, _request: AdmitRequest<'_>) -> Result<Decision, LimiterError> {
            Ok(Decision::Admitted {
                reservation: Reservation::default(),
                headers: RateHeaders::default(),
            })
        }

        async fn settle(&self, _reservation: Reservation, _actual_tokens: u64) {
            self.settled.fetch_add(1, Ordering::SeqCst);
        }

        async fn refund(&self, _reservation: Reservation) {
            self.refunded.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A limiter whose stored day usage cannot be read.
    struct Broken;

    #[async_trait]
    impl Limiter for Broken {
        async fn admit(&self, _request: AdmitRequest<'_>) -> Result<Decision, LimiterError> {
            Err(LimiterError::Baseline("database is locked".into()))
        }

        async fn settle(&self, _reservation: Reservation, _actual_tokens: u64) {}

        async fn refund(&self, _reservation: Reservation) {}
    }

    #[tokio::test]
    async fn a_limiter_that_cannot_decide_admits_nothing_and_answers_503() {
        let caller = Caller {
            key_prefix: "tg_0123456789abc".into(),
            chain: vec![group("grp_o", "o")],
            workspace_id: "ws".into(),
            group_id: "grp_o".into(),
            external_entity_id: "o".into(),
        };
        let limiter: Arc<dyn Limiter> = Arc::new(Broken);
        let outcome = admit(&limiter, &caller, &[], "acme/m", 10).await;
        let Err(error) = outcome else {
            panic!("a limiter error must not admit");
        };
        assert!(matches!(error, ProxyError::LimitsUnavailable(_)));
        assert_eq!(error.into_logged_response("req_1").status(), 503);
    }

    #[tokio::test]
    async fn a_settlement_ends_exactly_once() {
        let counting = Arc::new(Counting::default());
        let limiter: Arc<dyn Limiter> = counting.clone();
        Settlement::new(Arc::clone(&limiter), Reservation::default())
            .settle(10)
            .await;
        Settlement::new(Arc::clone(&limiter), Reservation::default())
            .refund()
            .await;
        assert_eq!(counting.settled.load(Ordering::SeqCst), 1);
        assert_eq!(counting.refunded.load(Ordering::SeqCst), 1);

        // Dropped unused: refunded, on a task of its own.
        drop(Settlement::new(
            Arc::clone(&limiter),
            Reservation::default(),
        ));
        for _ in 0..100 {
            if counting.refunded.load(Ordering::SeqCst) == 2 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(counting.refunded.load(Ordering::SeqCst), 2);
        assert_eq!(counting.settled.load(Ordering::SeqCst), 1);
    }
}
