//! Rate and usage limits: admit → reserve → settle / refund.
//!
//! 1. **Admit.** Before any upstream contact the data plane resolves which limits gate
//!    the request (`tollgate_core::hierarchy::limits_for_slug`: each limit with its
//!    threshold and the group whose counter it is enforced on) and calls
//!    [`Limiter::admit`]. Every counter is checked and, only if all have room, every one
//!    is debited, atomically: a REQUEST counter admits when `used + 1 <= threshold`, a
//!    TOKEN counter when `used < threshold` (tokens of requests still in flight
//!    included). A refusal debits nothing anywhere.
//! 2. **Reserve.** On admission each REQUEST counter takes 1 and each TOKEN counter takes
//!    the estimate (prompt bytes / 4). The returned [`Reservation`] remembers exactly
//!    which window slots were debited.
//! 3. **Settle / refund.** When the upstream's usage is known, [`Limiter::settle`]
//!    replaces the estimate by `prompt_tokens + completion_tokens` in those same slots.
//!    When the upstream failed, [`Limiter::refund`] gives the tokens back; the REQUEST
//!    admission stays counted. Every reservation is settled or refunded exactly once.
//!
//! Windows (`tollgate_core::window`): SECOND and MINUTE limits are rolling, to within
//! 1/10 of the unit; DAY limits count a UTC calendar day and start from the usage already
//! stored ([`DayBaseline`]), so a restart never resets a customer's day. The token
//! overshoot this scheme allows is bounded in `docs/limits.md`.
//!
//! [`InProcessLimiter`] serves one instance; [`RedisLimiter`] shares the counters of many
//! instances in one Redis, one atomic script per admission (`docs/limits.md`);
//! [`FallbackLimiter`] is the Redis one with per-instance limits while Redis is
//! unreachable (`docs/limits.md`, "Degraded mode").

mod baseline;
mod fallback;
mod memory;
mod redis;

use std::sync::Arc;

use async_trait::async_trait;
use tollgate_core::hierarchy::EffectiveLimit;
use tollgate_core::LimitMode;

pub use self::redis::RedisLimiter;
pub use baseline::{Coalesced, DayBaseline, NoStoredUsage, StoreBaseline};
pub use fallback::{
    FallbackLimiter, FallbackSettings, DEFAULT_CALL_TIMEOUT, DEFAULT_PROBE_INTERVAL,
};
pub use memory::InProcessLimiter;

/// What a request asks of the limiter.
#[derive(Debug, Clone, Copy)]
pub struct AdmitRequest<'a> {
    /// Every limit gating the request (`limits_for_slug`), in resolution order.
    pub limits: &'a [EffectiveLimit],
    pub slug: &'a str,
    /// Id of the root group of the caller's tree (the last group of its chain). Every
    /// counter gating a request belongs to that tree, so the shared limiter uses it as
    /// the Redis Cluster hash tag of all of them.
    pub tree_root: &'a str,
    /// The tree's mode: in CASCADING a DAY counter pools the counter group's subtree.
    pub mode: LimitMode,
    /// Tokens reserved on every TOKEN counter until the request settles.
    pub estimated_tokens: u64,
}

/// The tightest limit of one type, for the `x-ratelimit-*-{requests,tokens}` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderLimit {
    pub limit: u64,
    pub remaining: u64,
    /// Milliseconds until the limit is back to its full threshold.
    pub reset_ms: i64,
}

/// What the `x-ratelimit-*` headers say; `None` for a type with no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateHeaders {
    pub requests: Option<HeaderLimit>,
    pub tokens: Option<HeaderLimit>,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The first exhausted limit, in resolution order (the one named in the 429).
    pub limit: EffectiveLimit,
    /// Whole seconds until every exhausted limit can admit again (at least 1); for DAY
    /// limits the seconds until the next 00:00 UTC.
    pub retry_after_secs: u64,
    pub headers: RateHeaders,
}

/// The admission decision.
#[derive(Debug)]
pub enum Decision {
    Admitted {
        reservation: Reservation,
        headers: RateHeaders,
    },
    Refused(Refusal),
}

/// Which window slots an admission debited, so settle/refund touch exactly those.
#[derive(Debug, Default)]
#[must_use = "a reservation must be settled or refunded"]
pub struct Reservation {
    pub(crate) debits: Debits,
    pub(crate) estimated_tokens: u64,
}

/// The debited slots, in the form of the limiter that admitted the request. A limiter
/// given another implementation's reservation leaves it alone.
#[derive(Debug)]
pub(crate) enum Debits {
    InProcess(Vec<Debit>),
    Redis(self::redis::SharedDebits),
}

impl Default for Debits {
    fn default() -> Self {
        Self::InProcess(Vec::new())
    }
}

impl Reservation {
    /// The tokens reserved on every TOKEN counter at admission.
    pub fn estimated_tokens(&self) -> u64 {
        self.estimated_tokens
    }
}

/// One TOKEN counter's part of a reservation (REQUEST debits are never given back).
#[derive(Debug, Clone)]
pub(crate) struct Debit {
    /// The counters of the debited counter's (group, slug).
    pub(crate) counters: Arc<memory::CounterSet>,
    /// Which of them.
    pub(crate) which: usize,
    /// Window slot (bucket index) debited.
    pub(crate) slot: i64,
    /// Tokens reserved in that slot.
    pub(crate) tokens: u64,
}

/// One counter: a group's count of one (slug, type, unit).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CounterKey {
    pub group_id: String,
    pub slug: String,
    pub kind: tollgate_core::LimitType,
    pub unit: tollgate_core::LimitUnit,
}

impl CounterKey {
    /// The counter `limit` is enforced on.
    pub fn of(limit: &EffectiveLimit, slug: &str) -> Self {
        Self {
            group_id: limit.counter_group.clone(),
            slug: slug.to_owned(),
            kind: limit.kind,
            unit: limit.unit,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum LimiterError {
    /// The stored usage a DAY counter starts from could not be read.
    #[error("loading day usage: {0}")]
    Baseline(String),
    /// The shared (Redis) counters could not be reached or answered unexpectedly.
    #[error("shared limiter: {0}")]
    Shared(String),
}

/// Per type, the limit with the least remaining (ties: the smallest threshold), given
/// each limit's count (`used`) and when its window is back to the full threshold
/// (`reset_at`, ms). Shared by both limiters so their headers agree.
pub(crate) fn rate_headers(
    limits: &[EffectiveLimit],
    used: &[u64],
    reset_at: impl Fn(usize) -> i64,
    now: tollgate_core::Timestamp,
) -> RateHeaders {
    let tightest = |kind: tollgate_core::LimitType| {
        let (i, limit) = limits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.kind == kind)
            .min_by_key(|(i, l)| (l.threshold.saturating_sub(used[*i]), l.threshold))?;
        Some(HeaderLimit {
            limit: limit.threshold,
            remaining: limit.threshold.saturating_sub(used[i]),
            reset_ms: reset_at(i).saturating_sub(now.0).max(0),
        })
    };
    RateHeaders {
        requests: tightest(tollgate_core::LimitType::Request),
        tokens: tightest(tollgate_core::LimitType::Token),
    }
}

/// Enforces limits across every counter that gates a request. The in-process
/// implementation serves one instance; a shared (Redis) one serves many.
#[async_trait]
pub trait Limiter: Send + Sync + 'static {
    async fn admit(&self, request: AdmitRequest<'_>) -> Result<Decision, LimiterError>;
    /// Replaces the reservation's estimate by `actual_tokens` on every TOKEN counter.
    async fn settle(&self, reservation: Reservation, actual_tokens: u64);
    /// Gives back the reserved tokens; request admissions stay counted.
    async fn refund(&self, reservation: Reservation);
}
