//! The in-process limiter against the pure resolution rules, on a manual clock.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod baseline;
mod concurrency;
mod rules;
mod tokens;

use std::sync::Arc;

use tollgate_core::clock::{ManualClock, Timestamp};
use tollgate_core::hierarchy::{limits_for_slug, EffectiveLimit};
use tollgate_core::{Group, LimitMode, LimitType, LimitUnit, ModelAccess, RateLimit, UsageLimit};
use tollgate_limits::{
    AdmitRequest, CounterKey, Decision, InProcessLimiter, Limiter, NoStoredUsage, Refusal,
    Reservation,
};

pub const SLUG: &str = "acme/m";

/// 2026-12-03T00:00:00Z.
pub const DAY0: i64 = 1_796_256_000_000;

pub fn utc(text: &str) -> Timestamp {
    Timestamp::parse_rfc3339(text).unwrap()
}

pub use LimitType::{Request as REQUEST, Token as TOKEN};
pub use LimitUnit::{Day as DAY, Minute as MINUTE, Second as SECOND};

/// A group of a tree whose models hold `SLUG` with `limits` (type, unit, threshold).
pub fn group(
    id: &str,
    mode: LimitMode,
    parent: Option<&Group>,
    limits: &[(LimitType, LimitUnit, u64)],
) -> Group {
    let mut model = ModelAccess {
        slug: SLUG.into(),
        rate_limits: vec![],
        usage_limits: vec![],
    };
    for &(kind, unit, threshold) in limits {
        if unit == LimitUnit::Day {
            model.usage_limits.push(UsageLimit {
                kind,
                unit,
                threshold,
            });
        } else {
            model.rate_limits.push(RateLimit {
                kind,
                unit,
                threshold,
            });
        }
    }
    Group {
        id: id.into(),
        workspace_id: "ws".into(),
        name: None,
        external_entity_id: format!("ext-{id}"),
        models: vec![model],
        mode,
        parent_id: parent.map(|p| p.id.clone()),
        depth: parent.map_or(1, |p| p.depth + 1),
        created_at: Timestamp(0),
    }
}

/// The limits gating `chain[0]` on `SLUG`, as the data plane resolves them.
pub fn limits(chain: &[&Group]) -> Vec<EffectiveLimit> {
    let chain: Vec<Group> = chain.iter().map(|g| (*g).clone()).collect();
    limits_for_slug(&chain, SLUG).unwrap()
}

/// A limiter on a manual clock, days starting at zero.
pub fn limiter_at(start: Timestamp) -> (InProcessLimiter, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(start));
    (
        InProcessLimiter::new(clock.clone(), Arc::new(NoStoredUsage)),
        clock,
    )
}

pub async fn admit(
    limiter: &dyn Limiter,
    limits: &[EffectiveLimit],
    mode: LimitMode,
    estimated_tokens: u64,
) -> Decision {
    limiter
        .admit(AdmitRequest {
            limits,
            slug: SLUG,
            mode,
            estimated_tokens,
        })
        .await
        .unwrap()
}

pub fn admitted(decision: Decision) -> Option<Reservation> {
    match decision {
        Decision::Admitted { reservation, .. } => Some(reservation),
        Decision::Refused(_) => None,
    }
}

pub fn refused(decision: Decision) -> Refusal {
    match decision {
        Decision::Refused(refusal) => refusal,
        Decision::Admitted { .. } => panic!("admitted"),
    }
}

pub fn key(group: &str, kind: LimitType, unit: LimitUnit) -> CounterKey {
    CounterKey {
        group_id: group.into(),
        slug: SLUG.into(),
        kind,
        unit,
    }
}

/// What the counter holds now; 0 when it never counted anything.
pub fn usage(limiter: &InProcessLimiter, group: &str, kind: LimitType, unit: LimitUnit) -> u64 {
    limiter.current_usage(&key(group, kind, unit)).unwrap_or(0)
}
