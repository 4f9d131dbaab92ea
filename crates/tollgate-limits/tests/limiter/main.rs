//! The limiter conformance suite: every case runs against the in-process limiter and the
//! Redis one (`TOLLGATE_TEST_REDIS_URL`), on a manual clock (Redis: its test-only time
//! override) and against the pure resolution rules.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    reason = "tests"
)]

mod baseline;
mod concurrency;
mod redis;
mod rules;
mod tokens;

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use tollgate_core::clock::{ManualClock, Timestamp};
use tollgate_core::hierarchy::{limits_for_slug, EffectiveLimit};
use tollgate_core::{Group, LimitMode, LimitType, LimitUnit, ModelAccess, RateLimit, UsageLimit};
use tollgate_limits::{
    AdmitRequest, CounterKey, DayBaseline, Decision, InProcessLimiter, Limiter, NoStoredUsage,
    RedisLimiter, Refusal, Reservation,
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

/// The gating limits of one caller's chain and the id of its tree's root.
#[derive(Debug, Clone)]
pub struct Gating {
    pub limits: Vec<EffectiveLimit>,
    pub root: String,
}

impl std::ops::Deref for Gating {
    type Target = Vec<EffectiveLimit>;
    fn deref(&self) -> &Self::Target {
        &self.limits
    }
}

impl std::ops::DerefMut for Gating {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.limits
    }
}

/// Which implementation a conformance case runs against.
pub enum Backend {
    InProcess,
    /// A Redis at this URL, keys under a prefix of the case's own.
    Redis(String),
}

impl Backend {
    /// The Redis backend when `TOLLGATE_TEST_REDIS_URL` is set.
    pub fn redis() -> Option<Self> {
        match std::env::var("TOLLGATE_TEST_REDIS_URL") {
            Ok(url) if !url.is_empty() => Some(Self::Redis(url)),
            _ => {
                println!("skipped: TOLLGATE_TEST_REDIS_URL unset");
                None
            }
        }
    }

    /// A limiter on a manual clock, days starting at zero.
    pub async fn at(&self, start: Timestamp) -> (Subject, Arc<ManualClock>) {
        self.over(Arc::new(NoStoredUsage), start).await
    }

    /// A limiter on a manual clock whose days start from `baseline`.
    pub async fn over(
        &self,
        baseline: Arc<dyn DayBaseline>,
        start: Timestamp,
    ) -> (Subject, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new(start));
        let probe = match self {
            Backend::InProcess => {
                Probe::Local(Arc::new(InProcessLimiter::new(clock.clone(), baseline)))
            }
            Backend::Redis(url) => Probe::Redis(Arc::new(
                RedisLimiter::connect(url, baseline)
                    .await
                    .expect("TOLLGATE_TEST_REDIS_URL is set but Redis cannot be reached")
                    .with_key_prefix(&test_prefix())
                    .with_test_clock(clock.clone()),
            )),
        };
        let limiter: Arc<dyn Limiter> = match &probe {
            Probe::Local(l) => l.clone(),
            Probe::Redis(l) => l.clone(),
        };
        let subject = Subject {
            limiter,
            probe,
            roots: Mutex::new(HashMap::new()),
        };
        (subject, clock)
    }
}

/// A key prefix of one test's own, so tests share one Redis in parallel.
pub fn test_prefix() -> String {
    format!("tgtest{}", tollgate_core::ids::random_base62(12))
}

enum Probe {
    Local(Arc<InProcessLimiter>),
    Redis(Arc<RedisLimiter>),
}

/// A limiter under test, and a way to read its counters.
pub struct Subject {
    limiter: Arc<dyn Limiter>,
    probe: Probe,
    /// Counter group → its tree's root, as seen in admissions (the Redis key needs it).
    roots: Mutex<HashMap<String, String>>,
}

impl std::ops::Deref for Subject {
    type Target = dyn Limiter;
    fn deref(&self) -> &Self::Target {
        self.limiter.as_ref()
    }
}

impl Subject {
    /// A subject over a Redis limiter built by the test.
    pub fn from_redis(limiter: RedisLimiter) -> Self {
        let limiter = Arc::new(limiter);
        Self {
            limiter: limiter.clone(),
            probe: Probe::Redis(limiter),
            roots: Mutex::new(HashMap::new()),
        }
    }

    /// What the counter holds in its current window; `None` when it never counted (for
    /// DAY: nothing today).
    pub async fn current_usage(&self, key: &CounterKey) -> Option<u64> {
        match &self.probe {
            Probe::Local(l) => l.current_usage(key),
            Probe::Redis(l) => {
                let root = self.roots.lock().get(&key.group_id).cloned()?;
                l.current_usage(&root, key).await.unwrap()
            }
        }
    }
}

/// The limits gating `chain[0]` on `SLUG`, as the data plane resolves them.
pub fn limits(chain: &[&Group]) -> Gating {
    let root = chain.last().unwrap().id.clone();
    let chain: Vec<Group> = chain.iter().map(|g| (*g).clone()).collect();
    Gating {
        limits: limits_for_slug(&chain, SLUG).unwrap(),
        root,
    }
}

/// The admission request of `gating`, as the data plane builds it.
pub fn request<'a>(
    subject: &Subject,
    gating: &'a Gating,
    slug: &'a str,
    mode: LimitMode,
    estimated_tokens: u64,
) -> AdmitRequest<'a> {
    let mut roots = subject.roots.lock();
    for limit in gating.iter() {
        roots
            .entry(limit.counter_group.clone())
            .or_insert_with(|| gating.root.clone());
    }
    AdmitRequest {
        limits: gating,
        slug,
        tree_root: &gating.root,
        mode,
        estimated_tokens,
    }
}

pub async fn admit(
    subject: &Subject,
    gating: &Gating,
    mode: LimitMode,
    estimated_tokens: u64,
) -> Decision {
    let request = request(subject, gating, SLUG, mode, estimated_tokens);
    subject.admit(request).await.unwrap()
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
pub async fn usage(subject: &Subject, group: &str, kind: LimitType, unit: LimitUnit) -> u64 {
    subject
        .current_usage(&key(group, kind, unit))
        .await
        .unwrap_or(0)
}

/// Runs each case (`async fn case(backend: Backend)`) against the in-process limiter and,
/// when `TOLLGATE_TEST_REDIS_URL` is set, against Redis.
#[macro_export]
macro_rules! conformance {
    ($( #[$test:meta] $name:ident ),* $(,)?) => {
        mod in_process {
            $(
                #[$test]
                async fn $name() {
                    super::$name($crate::Backend::InProcess).await
                }
            )*
        }
        mod redis {
            $(
                #[$test]
                async fn $name() {
                    let Some(backend) = $crate::Backend::redis() else {
                        return;
                    };
                    super::$name(backend).await
                }
            )*
        }
    };
}
