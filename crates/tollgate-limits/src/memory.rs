//! The in-process limiter: every counter in this process's memory.
//!
//! Counters live in a sharded map, each behind its own mutex; nothing locks all
//! counters. An admission locks exactly the counters gating the request, in address order
//! (two admissions sharing counters cannot deadlock), checks every one and debits all or
//! none before releasing any — so N concurrent requests against a REQUEST limit of K
//! admit exactly min(N, K) (`tests/limiter.rs`, `concurrent_admits_take_exactly_the_limit`).

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use dashmap::DashMap;
use parking_lot::{Mutex, MutexGuard};
use tollgate_core::clock::Clock;
use tollgate_core::hierarchy::EffectiveLimit;
use tollgate_core::window::{has_room, retry_after_secs, slot_at, WindowCounter};
use tollgate_core::{LimitType, LimitUnit, Timestamp};
use tollgate_store::DayUsage;

use crate::{
    AdmitRequest, CounterKey, DayBaseline, Debit, Decision, HeaderLimit, Limiter, LimiterError,
    RateHeaders, Refusal, Reservation,
};

/// One counter and its window.
#[derive(Debug)]
pub(crate) struct Counter {
    key: CounterKey,
    /// DAY counters: the latest UTC day whose baseline is in the window (`i64::MIN`:
    /// none). Read without the lock, so a started day costs the hot path one load.
    started_day: AtomicI64,
    window: Mutex<WindowCounter>,
}

impl Counter {
    fn new(key: CounterKey) -> Self {
        let window = WindowCounter::new(key.unit);
        Self {
            key,
            started_day: AtomicI64::new(i64::MIN),
            window: Mutex::new(window),
        }
    }

    fn needs_day(&self, today: i64) -> bool {
        self.key.unit == LimitUnit::Day && self.started_day.load(Ordering::Acquire) < today
    }

    /// Starts `day` at `baseline` unless this or a later day has started already.
    fn start_day(&self, day: i64, baseline: u64) {
        let mut window = self.window.lock();
        window.start_day(day, baseline);
        if let Some(started) = window.day() {
            self.started_day.fetch_max(started, Ordering::AcqRel);
        }
    }

    /// Replaces `reserved` by `actual` in `slot`.
    pub(crate) fn adjust(&self, slot: i64, reserved: u64, actual: u64) {
        self.window.lock().adjust(slot, reserved, actual);
    }
}

/// A borrowed view of a [`CounterKey`], so the map can be searched with the strings of an
/// [`EffectiveLimit`] without allocating an owned key on every admission.
pub trait CounterKeyView {
    fn parts(&self) -> (&str, &str, LimitType, LimitUnit);
}

impl CounterKeyView for CounterKey {
    fn parts(&self) -> (&str, &str, LimitType, LimitUnit) {
        (&self.group_id, &self.slug, self.kind, self.unit)
    }
}

/// The counter a limit is enforced on, for one slug.
struct LimitOn<'a> {
    limit: &'a EffectiveLimit,
    slug: &'a str,
}

impl CounterKeyView for LimitOn<'_> {
    fn parts(&self) -> (&str, &str, LimitType, LimitUnit) {
        (
            &self.limit.counter_group,
            self.slug,
            self.limit.kind,
            self.limit.unit,
        )
    }
}

pub(crate) fn hash_counter_key<H: Hasher>(
    group_id: &str,
    slug: &str,
    kind: LimitType,
    unit: LimitUnit,
    state: &mut H,
) {
    group_id.hash(state);
    slug.hash(state);
    kind.hash(state);
    unit.hash(state);
}

impl Hash for dyn CounterKeyView + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let (group_id, slug, kind, unit) = self.parts();
        hash_counter_key(group_id, slug, kind, unit, state);
    }
}

impl PartialEq for dyn CounterKeyView + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn CounterKeyView + '_ {}

impl<'a> Borrow<dyn CounterKeyView + 'a> for CounterKey {
    fn borrow(&self) -> &(dyn CounterKeyView + 'a) {
        self
    }
}

/// Limits enforced in this process's memory: right for one gateway instance.
pub struct InProcessLimiter {
    counters: DashMap<CounterKey, Arc<Counter>>,
    clock: Arc<dyn Clock>,
    baseline: Arc<dyn DayBaseline>,
}

impl InProcessLimiter {
    pub fn new(clock: Arc<dyn Clock>, baseline: Arc<dyn DayBaseline>) -> Self {
        Self {
            counters: DashMap::new(),
            clock,
            baseline,
        }
    }

    /// What the counter holds in its current window, reservations of requests in flight
    /// included; `None` when it has counted nothing yet (for DAY: nothing today).
    pub fn current_usage(&self, key: &CounterKey) -> Option<u64> {
        let counter = Arc::clone(self.counters.get(key)?.value());
        let now = self.clock.now();
        let window = counter.window.lock();
        if key.unit == LimitUnit::Day && window.day() < Some(slot_at(LimitUnit::Day, now)) {
            return None;
        }
        Some(window.used(now))
    }

    fn counter(&self, limit: &EffectiveLimit, slug: &str) -> Arc<Counter> {
        let view = LimitOn { limit, slug };
        let probe: &dyn CounterKeyView = &view;
        if let Some(found) = self.counters.get(probe) {
            return Arc::clone(found.value());
        }
        let key = CounterKey::of(limit, slug);
        let entry = self
            .counters
            .entry(key.clone())
            .or_insert_with(|| Arc::new(Counter::new(key)));
        Arc::clone(entry.value())
    }

    /// Loads, outside any lock, the baseline of every DAY counter not yet on `now`'s day,
    /// one store read per counter group; a counter another admission started meanwhile
    /// keeps its day (`start_day` never reloads).
    async fn start_days(
        &self,
        request: &AdmitRequest<'_>,
        counters: &[Arc<Counter>],
        now: Timestamp,
    ) -> Result<(), LimiterError> {
        let today = slot_at(LimitUnit::Day, now);
        let mut loaded: Vec<(&str, DayUsage)> = Vec::new();
        for (limit, counter) in request.limits.iter().zip(counters) {
            if !counter.needs_day(today) {
                continue;
            }
            let group = limit.counter_group.as_str();
            let usage = match loaded.iter().find(|(g, _)| *g == group) {
                Some((_, usage)) => *usage,
                None => {
                    let usage = self
                        .baseline
                        .day_usage(group, request.slug, request.mode, now.utc_day_start())
                        .await?;
                    loaded.push((group, usage));
                    usage
                }
            };
            let baseline = match limit.kind {
                LimitType::Request => usage.requests,
                LimitType::Token => usage.tokens,
            };
            counter.start_day(today, baseline);
        }
        Ok(())
    }
}

/// The counters of one admission, locked in address order, each once.
struct Locked<'a> {
    guards: Vec<MutexGuard<'a, WindowCounter>>,
    /// `guard_of[i]`: the guard of `limits[i]`'s counter.
    guard_of: Vec<usize>,
    /// One limit per distinct counter, in lock order: what to debit.
    distinct: Vec<usize>,
}

impl<'a> Locked<'a> {
    fn lock(counters: &'a [Arc<Counter>]) -> Self {
        let mut order: Vec<usize> = (0..counters.len()).collect();
        order.sort_unstable_by_key(|&i| Arc::as_ptr(&counters[i]));
        let mut guards = Vec::with_capacity(counters.len());
        let mut guard_of = vec![0; counters.len()];
        let mut distinct = Vec::with_capacity(counters.len());
        let mut previous: Option<&Arc<Counter>> = None;
        for i in order {
            let counter = &counters[i];
            if !previous.is_some_and(|p| Arc::ptr_eq(p, counter)) {
                guards.push(counter.window.lock());
                distinct.push(i);
                previous = Some(counter);
            }
            guard_of[i] = guards.len() - 1;
        }
        Self {
            guards,
            guard_of,
            distinct,
        }
    }

    fn window(&self, limit: usize) -> &WindowCounter {
        &self.guards[self.guard_of[limit]]
    }
}

impl InProcessLimiter {
    /// Checks every counter and debits all or none, under the locks of exactly those
    /// counters. Synchronous: no lock is ever held across an `.await`.
    fn decide(
        &self,
        request: &AdmitRequest<'_>,
        counters: &[Arc<Counter>],
        now: Timestamp,
    ) -> Decision {
        let limits = request.limits;
        let mut locked = Locked::lock(counters);
        let mut used: Vec<u64> = (0..limits.len())
            .map(|i| locked.window(i).used(now))
            .collect();

        let exhausted = |i: &usize| !has_room(used[*i], limits[*i].threshold);
        if let Some(first) = (0..limits.len()).find(exhausted) {
            let retry_after_secs = (0..limits.len())
                .filter(exhausted)
                .map(|i| retry_after_secs(now, locked.window(i).retry_at(now, limits[i].threshold)))
                .max()
                .unwrap_or(1);
            return Decision::Refused(Refusal {
                limit: limits[first].clone(),
                retry_after_secs,
                headers: headers(limits, &used, &locked, now),
            });
        }

        let mut debits = Vec::new();
        for position in 0..locked.distinct.len() {
            let i = locked.distinct[position];
            let amount = debit_amount(&limits[i], request.estimated_tokens);
            let slot = locked.guards[position].debit(now, amount);
            if limits[i].kind == LimitType::Token {
                debits.push(Debit {
                    counter: Arc::clone(&counters[i]),
                    slot,
                    tokens: amount,
                });
            }
        }
        for (i, limit) in limits.iter().enumerate() {
            used[i] = used[i].saturating_add(debit_amount(limit, request.estimated_tokens));
        }
        Decision::Admitted {
            reservation: Reservation {
                debits,
                estimated_tokens: request.estimated_tokens,
            },
            headers: headers(limits, &used, &locked, now),
        }
    }
}

fn debit_amount(limit: &EffectiveLimit, estimated_tokens: u64) -> u64 {
    match limit.kind {
        LimitType::Request => 1,
        LimitType::Token => estimated_tokens,
    }
}

/// Per type, the limit with the least remaining (ties: the smallest threshold).
fn headers(
    limits: &[EffectiveLimit],
    used: &[u64],
    locked: &Locked<'_>,
    now: Timestamp,
) -> RateHeaders {
    let tightest = |kind: LimitType| {
        let (i, limit) = limits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.kind == kind)
            .min_by_key(|(i, l)| (l.threshold.saturating_sub(used[*i]), l.threshold))?;
        let reset = locked.window(i).reset_at(now);
        Some(HeaderLimit {
            limit: limit.threshold,
            remaining: limit.threshold.saturating_sub(used[i]),
            reset_ms: reset.0.saturating_sub(now.0).max(0),
        })
    };
    RateHeaders {
        requests: tightest(LimitType::Request),
        tokens: tightest(LimitType::Token),
    }
}

#[async_trait]
impl Limiter for InProcessLimiter {
    async fn admit(&self, request: AdmitRequest<'_>) -> Result<Decision, LimiterError> {
        let now = self.clock.now();
        let counters: Vec<Arc<Counter>> = request
            .limits
            .iter()
            .map(|limit| self.counter(limit, request.slug))
            .collect();
        let today = slot_at(LimitUnit::Day, now);
        if counters.iter().any(|c| c.needs_day(today)) {
            self.start_days(&request, &counters, now).await?;
        }
        Ok(self.decide(&request, &counters, now))
    }

    async fn settle(&self, reservation: Reservation, actual_tokens: u64) {
        for debit in reservation.debits {
            debit
                .counter
                .adjust(debit.slot, debit.tokens, actual_tokens);
        }
    }

    async fn refund(&self, reservation: Reservation) {
        for debit in reservation.debits {
            debit.counter.adjust(debit.slot, debit.tokens, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::hash_map::DefaultHasher;

    use tollgate_core::clock::ManualClock;

    use super::*;
    use crate::NoStoredUsage;

    fn limit(group: &str, kind: LimitType, unit: LimitUnit) -> EffectiveLimit {
        EffectiveLimit {
            kind,
            unit,
            threshold: 10,
            source_group: group.into(),
            counter_group: group.into(),
        }
    }

    fn hash_of<T: Hash + ?Sized>(value: &T) -> u64 {
        let mut hasher = DefaultHasher::new();
        value.hash(&mut hasher);
        hasher.finish()
    }

    #[test]
    fn a_borrowed_view_hashes_and_compares_as_the_owned_key() {
        let l = limit("grp_1", LimitType::Token, LimitUnit::Minute);
        let view = LimitOn {
            limit: &l,
            slug: "acme/m",
        };
        let key = CounterKey::of(&l, "acme/m");
        let owned: &dyn CounterKeyView = &key;
        let borrowed: &dyn CounterKeyView = &view;
        assert_eq!(hash_of(&key), hash_of(borrowed));
        assert!(owned == borrowed);
        // Field boundaries are part of the hash: ("ab", "c") is not ("a", "bc").
        let shifted = CounterKey {
            group_id: "grp_1a".into(),
            slug: "cme/m".into(),
            ..key.clone()
        };
        assert_ne!(hash_of(&shifted), hash_of(&key));
        assert!(shifted.borrow() as &dyn CounterKeyView != borrowed);
    }

    #[test]
    fn each_counter_is_created_once_and_found_without_an_owned_key() {
        let limiter = InProcessLimiter::new(
            Arc::new(ManualClock::new(Timestamp(0))),
            Arc::new(NoStoredUsage),
        );
        let l = limit("grp_1", LimitType::Request, LimitUnit::Second);
        let first = limiter.counter(&l, "acme/m");
        let again = limiter.counter(&l, "acme/m");
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(limiter.counters.len(), 1);
        let view = LimitOn {
            limit: &l,
            slug: "acme/m",
        };
        let probe: &dyn CounterKeyView = &view;
        assert!(limiter.counters.get(probe).is_some());
        let other = limiter.counter(&l, "acme/x");
        assert!(!Arc::ptr_eq(&first, &other));
        assert_eq!(limiter.counters.len(), 2);
    }

    #[test]
    fn locking_visits_each_counter_once_in_address_order() {
        let limiter = InProcessLimiter::new(
            Arc::new(ManualClock::new(Timestamp(0))),
            Arc::new(NoStoredUsage),
        );
        let a = limiter.counter(&limit("a", LimitType::Request, LimitUnit::Day), "m");
        let b = limiter.counter(&limit("b", LimitType::Request, LimitUnit::Day), "m");
        let counters = vec![b.clone(), a.clone(), b.clone()];
        let locked = Locked::lock(&counters);
        assert_eq!(locked.guards.len(), 2);
        assert_eq!(locked.guard_of[0], locked.guard_of[2]);
        assert_ne!(locked.guard_of[0], locked.guard_of[1]);
        let first = locked.distinct[0];
        assert!(Arc::as_ptr(&counters[first]) < Arc::as_ptr(&counters[locked.distinct[1]]));
    }
}
