//! The in-process limiter: every counter in this process's memory.
//!
//! Counters live in a sharded map with one entry per (group, slug): that pair's six
//! counters (type × unit) behind one mutex. Nothing locks all counters. An admission
//! locks exactly the entries gating the request, in address order (two admissions
//! sharing entries cannot deadlock), checks every counter and debits all or none before
//! releasing any — so N concurrent requests against a REQUEST limit of K admit exactly
//! min(N, K) (`tests/limiter`, `concurrent_admits_take_exactly_the_limit`).
//!
//! One lock per (group, slug) rather than per counter costs no parallelism: every request
//! counted on a group's slug is gated by all of that group's declared limits on it, so
//! two requests that share one of its counters share them all. It makes a 5-level chain
//! 5 look-ups and 5 locks instead of 20 (`docs/BENCHMARKS.md`).

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
    rate_headers, AdmitRequest, CounterKey, DayBaseline, Debit, Debits, Decision, Limiter,
    LimiterError, RateHeaders, Refusal, Reservation,
};

const KINDS: [LimitType; 2] = [LimitType::Request, LimitType::Token];
const UNITS: [LimitUnit; 3] = [LimitUnit::Second, LimitUnit::Minute, LimitUnit::Day];

fn kind_index(kind: LimitType) -> usize {
    match kind {
        LimitType::Request => 0,
        LimitType::Token => 1,
    }
}

/// Position of a (type, unit) counter within its [`CounterSet`].
fn position(kind: LimitType, unit: LimitUnit) -> usize {
    let kind = kind_index(kind);
    let unit = match unit {
        LimitUnit::Second => 0,
        LimitUnit::Minute => 1,
        LimitUnit::Day => 2,
    };
    kind * UNITS.len() + unit
}

/// The six counters (type × unit) of one (group, slug).
#[derive(Debug)]
pub(crate) struct CounterSet {
    key: GroupSlug,
    /// Per type: the latest UTC day whose baseline is in the DAY window (`i64::MIN`:
    /// none). Read without the lock, so a started day costs the hot path one load.
    started_day: [AtomicI64; KINDS.len()],
    windows: Mutex<[WindowCounter; KINDS.len() * UNITS.len()]>,
}

impl CounterSet {
    fn new(key: GroupSlug) -> Self {
        Self {
            key,
            started_day: std::array::from_fn(|_| AtomicI64::new(i64::MIN)),
            windows: Mutex::new(std::array::from_fn(|i| {
                WindowCounter::new(UNITS[i % UNITS.len()])
            })),
        }
    }

    fn needs_day(&self, kind: LimitType, unit: LimitUnit, today: i64) -> bool {
        unit == LimitUnit::Day && self.started_day[kind_index(kind)].load(Ordering::Acquire) < today
    }

    /// Starts `day` of the DAY counter of `kind` at `baseline` unless this or a later day
    /// has started already.
    fn start_day(&self, kind: LimitType, day: i64, baseline: u64) {
        let mut windows = self.windows.lock();
        let window = &mut windows[position(kind, LimitUnit::Day)];
        window.start_day(day, baseline);
        if let Some(started) = window.day() {
            self.started_day[kind_index(kind)].fetch_max(started, Ordering::AcqRel);
        }
    }
}

/// The map key: a group's counters of one slug.
#[derive(Debug, Clone, PartialEq, Eq)]
struct GroupSlug {
    group_id: String,
    slug: String,
}

/// A borrowed view of a [`GroupSlug`], so the map can be searched with the strings of an
/// [`EffectiveLimit`] without allocating an owned key on every admission.
pub trait GroupSlugView {
    fn parts(&self) -> (&str, &str);
}

impl GroupSlugView for GroupSlug {
    fn parts(&self) -> (&str, &str) {
        (&self.group_id, &self.slug)
    }
}

impl GroupSlugView for (&str, &str) {
    fn parts(&self) -> (&str, &str) {
        (self.0, self.1)
    }
}

impl Hash for GroupSlug {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.parts().hash(state);
    }
}

impl Hash for dyn GroupSlugView + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.parts().hash(state);
    }
}

impl PartialEq for dyn GroupSlugView + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn GroupSlugView + '_ {}

impl<'a> Borrow<dyn GroupSlugView + 'a> for GroupSlug {
    fn borrow(&self) -> &(dyn GroupSlugView + 'a) {
        self
    }
}

/// Shards of the counter map. A look-up takes its shard's read lock, whose counter is one
/// cache line every reader writes: with many shards, requests of different groups
/// rarely meet on one.
const SHARDS: usize = 256;

/// Limits enforced in this process's memory: right for one gateway instance.
pub struct InProcessLimiter {
    counters: DashMap<GroupSlug, Arc<CounterSet>, foldhash::fast::RandomState>,
    clock: Arc<dyn Clock>,
    baseline: Arc<dyn DayBaseline>,
}

impl InProcessLimiter {
    pub fn new(clock: Arc<dyn Clock>, baseline: Arc<dyn DayBaseline>) -> Self {
        Self {
            counters: DashMap::with_hasher_and_shard_amount(
                foldhash::fast::RandomState::default(),
                SHARDS,
            ),
            clock,
            baseline,
        }
    }

    /// What the counter holds in its current window, reservations of requests in flight
    /// included; `None` when it has counted nothing yet (for DAY: nothing today).
    pub fn current_usage(&self, key: &CounterKey) -> Option<u64> {
        let probe: (&str, &str) = (&key.group_id, &key.slug);
        let set = Arc::clone(self.counters.get(&probe as &dyn GroupSlugView)?.value());
        let now = self.clock.now();
        let windows = set.windows.lock();
        let window = &windows[position(key.kind, key.unit)];
        if key.unit == LimitUnit::Day && window.day() < Some(slot_at(LimitUnit::Day, now)) {
            return None;
        }
        Some(window.used(now))
    }

    fn counter_set(&self, group_id: &str, slug: &str) -> Arc<CounterSet> {
        let probe: (&str, &str) = (group_id, slug);
        if let Some(found) = self.counters.get(&probe as &dyn GroupSlugView) {
            return Arc::clone(found.value());
        }
        let key = GroupSlug {
            group_id: group_id.to_owned(),
            slug: slug.to_owned(),
        };
        let entry = self
            .counters
            .entry(key.clone())
            .or_insert_with(|| Arc::new(CounterSet::new(key)));
        Arc::clone(entry.value())
    }

    /// The counter sets of a request's limits (consecutive limits of one group share a
    /// look-up) and, per limit, (set, counter) positions.
    fn resolve(&self, request: &AdmitRequest<'_>) -> Resolved {
        let mut sets: Vec<Arc<CounterSet>> = Vec::new();
        let mut at = Vec::with_capacity(request.limits.len());
        for limit in request.limits {
            let same = sets
                .last()
                .is_some_and(|set| set.key.group_id == limit.counter_group);
            if !same {
                sets.push(self.counter_set(&limit.counter_group, request.slug));
            }
            at.push((sets.len() - 1, position(limit.kind, limit.unit)));
        }
        Resolved { sets, at }
    }

    /// Loads, outside any lock, the baseline of every DAY counter not yet on `now`'s day,
    /// one store read per counter group; a counter another admission started meanwhile
    /// keeps its day (`start_day` never reloads).
    async fn start_days(
        &self,
        request: &AdmitRequest<'_>,
        resolved: &Resolved,
        now: Timestamp,
    ) -> Result<(), LimiterError> {
        let today = slot_at(LimitUnit::Day, now);
        let mut loaded: Vec<(&str, DayUsage)> = Vec::new();
        for (i, limit) in request.limits.iter().enumerate() {
            let set = resolved.set(i);
            if !set.needs_day(limit.kind, limit.unit, today) {
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
            set.start_day(limit.kind, today, baseline);
        }
        Ok(())
    }
}

/// Where each limit of a request is counted.
struct Resolved {
    sets: Vec<Arc<CounterSet>>,
    /// Per limit: (index in `sets`, position in that set).
    at: Vec<(usize, usize)>,
}

impl Resolved {
    fn set(&self, limit: usize) -> &CounterSet {
        &self.sets[self.at[limit].0]
    }
}

/// The counter sets of one admission, locked in address order, each once.
struct Locked<'a> {
    guards: Vec<MutexGuard<'a, [WindowCounter; KINDS.len() * UNITS.len()]>>,
    /// `guard_of[s]`: the guard of `resolved.sets[s]`.
    guard_of: Vec<usize>,
}

impl<'a> Locked<'a> {
    fn lock(resolved: &'a Resolved) -> Self {
        let mut order: Vec<(*const CounterSet, usize)> = resolved
            .sets
            .iter()
            .enumerate()
            .map(|(s, set)| (Arc::as_ptr(set), s))
            .collect();
        order.sort_unstable();
        let mut guards = Vec::with_capacity(order.len());
        let mut guard_of = vec![0; order.len()];
        let mut previous = std::ptr::null();
        for (address, s) in order {
            if address != previous {
                guards.push(resolved.sets[s].windows.lock());
                previous = address;
            }
            guard_of[s] = guards.len() - 1;
        }
        Self { guards, guard_of }
    }

    /// (guard, position) of `limit`'s counter.
    fn place(&self, resolved: &Resolved, limit: usize) -> (usize, usize) {
        let (set, which) = resolved.at[limit];
        (self.guard_of[set], which)
    }

    fn window(&self, resolved: &Resolved, limit: usize) -> &WindowCounter {
        let (guard, which) = self.place(resolved, limit);
        &self.guards[guard][which]
    }
}

impl InProcessLimiter {
    /// Checks every counter and debits all or none, under the locks of exactly those
    /// counters. Synchronous: no lock is ever held across an `.await`.
    fn decide(&self, request: &AdmitRequest<'_>, resolved: &Resolved, now: Timestamp) -> Decision {
        let limits = request.limits;
        let mut locked = Locked::lock(resolved);
        let mut used: Vec<u64> = (0..limits.len())
            .map(|i| locked.window(resolved, i).used(now))
            .collect();

        let exhausted = |i: &usize| !has_room(used[*i], limits[*i].threshold);
        if let Some(first) = (0..limits.len()).find(exhausted) {
            let retry_after_secs = (0..limits.len())
                .filter(exhausted)
                .map(|i| {
                    let at = locked
                        .window(resolved, i)
                        .retry_at(now, limits[i].threshold);
                    retry_after_secs(now, at)
                })
                .max()
                .unwrap_or(1);
            return Decision::Refused(Refusal {
                limit: limits[first].clone(),
                retry_after_secs,
                headers: headers(limits, &used, |i| locked.window(resolved, i), now),
            });
        }

        // Each counter once, even when two limits name it.
        let mut debited = vec![0u8; locked.guards.len()];
        let mut debits = Vec::new();
        for (i, limit) in limits.iter().enumerate() {
            let amount = debit_amount(limit, request.estimated_tokens);
            used[i] = used[i].saturating_add(amount);
            let (guard, which) = locked.place(resolved, i);
            if debited[guard] & (1 << which) != 0 {
                continue;
            }
            debited[guard] |= 1 << which;
            let slot = locked.guards[guard][which].debit(now, amount);
            if limit.kind == LimitType::Token {
                debits.push(Debit {
                    counters: Arc::clone(&resolved.sets[resolved.at[i].0]),
                    which,
                    slot,
                    tokens: amount,
                });
            }
        }
        Decision::Admitted {
            reservation: Reservation {
                debits: Debits::InProcess(debits),
                estimated_tokens: request.estimated_tokens,
            },
            headers: headers(limits, &used, |i| locked.window(resolved, i), now),
        }
    }
}

fn debit_amount(limit: &EffectiveLimit, estimated_tokens: u64) -> u64 {
    match limit.kind {
        LimitType::Request => 1,
        LimitType::Token => estimated_tokens,
    }
}

fn headers<'w>(
    limits: &[EffectiveLimit],
    used: &[u64],
    window: impl Fn(usize) -> &'w WindowCounter,
    now: Timestamp,
) -> RateHeaders {
    rate_headers(limits, used, |i| window(i).reset_at(now).0, now)
}

#[async_trait]
impl Limiter for InProcessLimiter {
    async fn admit(&self, request: AdmitRequest<'_>) -> Result<Decision, LimiterError> {
        let now = self.clock.now();
        let resolved = self.resolve(&request);
        let today = slot_at(LimitUnit::Day, now);
        let needs_day = |(i, limit): (usize, &EffectiveLimit)| {
            resolved.set(i).needs_day(limit.kind, limit.unit, today)
        };
        if request.limits.iter().enumerate().any(needs_day) {
            self.start_days(&request, &resolved, now).await?;
        }
        Ok(self.decide(&request, &resolved, now))
    }

    async fn settle(&self, reservation: Reservation, actual_tokens: u64) {
        if let Debits::InProcess(debits) = &reservation.debits {
            adjust_all(debits, |reserved| (reserved, actual_tokens));
        }
    }

    async fn refund(&self, reservation: Reservation) {
        if let Debits::InProcess(debits) = &reservation.debits {
            adjust_all(debits, |reserved| (reserved, 0));
        }
    }
}

/// Replaces each debit's reserved tokens, one lock per counter set (an admission's debits
/// come grouped by set).
fn adjust_all(debits: &[Debit], change: impl Fn(u64) -> (u64, u64)) {
    for run in debits.chunk_by(|a, b| Arc::ptr_eq(&a.counters, &b.counters)) {
        let Some(first) = run.first() else {
            continue;
        };
        let mut windows = first.counters.windows.lock();
        for debit in run {
            if let Some(window) = windows.get_mut(debit.which) {
                let (reserved, actual) = change(debit.tokens);
                window.adjust(debit.slot, reserved, actual);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

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

    fn limiter() -> InProcessLimiter {
        InProcessLimiter::new(
            Arc::new(ManualClock::new(Timestamp(0))),
            Arc::new(NoStoredUsage),
        )
    }

    #[test]
    fn a_borrowed_view_hashes_and_compares_as_the_owned_key() {
        let hasher = foldhash::fast::RandomState::default();
        let key = GroupSlug {
            group_id: "grp_1".into(),
            slug: "acme/m".into(),
        };
        let probe: (&str, &str) = ("grp_1", "acme/m");
        let owned: &dyn GroupSlugView = &key;
        let borrowed: &dyn GroupSlugView = &probe;
        assert_eq!(hasher.hash_one(&key), hasher.hash_one(borrowed));
        assert!(owned == borrowed);
        // Field boundaries are part of the key: ("grp_1a", "cme/m") is another pair.
        let shifted: (&str, &str) = ("grp_1a", "cme/m");
        assert!(owned != &shifted as &dyn GroupSlugView);
        assert_ne!(
            hasher.hash_one(&key),
            hasher.hash_one(&shifted as &dyn GroupSlugView)
        );
    }

    #[test]
    fn counters_of_one_group_and_slug_share_a_set_created_once() {
        let limiter = limiter();
        let first = limiter.counter_set("grp_1", "acme/m");
        let again = limiter.counter_set("grp_1", "acme/m");
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(limiter.counters.len(), 1);
        let other = limiter.counter_set("grp_1", "acme/x");
        assert!(!Arc::ptr_eq(&first, &other));
        assert_eq!(limiter.counters.len(), 2);
        // Each (type, unit) has its own counter with the right window.
        let windows = first.windows.lock();
        for kind in KINDS {
            for unit in UNITS {
                assert_eq!(windows[position(kind, unit)].unit(), unit);
            }
        }
        let positions: std::collections::BTreeSet<usize> = KINDS
            .iter()
            .flat_map(|&k| UNITS.iter().map(move |&u| position(k, u)))
            .collect();
        assert_eq!(positions.len(), 6);
    }

    #[test]
    fn resolving_looks_up_each_group_once_and_locks_each_counter_once() {
        let limiter = limiter();
        let limits = vec![
            limit("b", LimitType::Request, LimitUnit::Day),
            limit("b", LimitType::Token, LimitUnit::Day),
            limit("a", LimitType::Request, LimitUnit::Day),
            limit("b", LimitType::Request, LimitUnit::Day),
        ];
        let request = AdmitRequest {
            limits: &limits,
            slug: "m",
            tree_root: "a",
            mode: tollgate_core::LimitMode::Cascading,
            estimated_tokens: 0,
        };
        let resolved = limiter.resolve(&request);
        assert_eq!(resolved.sets.len(), 3);
        assert_eq!(resolved.at[0].0, resolved.at[1].0);
        assert!(Arc::ptr_eq(&resolved.sets[0], &resolved.sets[2]));
        let locked = Locked::lock(&resolved);
        assert_eq!(locked.guards.len(), 2);
        assert_eq!(locked.guard_of[0], locked.guard_of[2]);
        assert_ne!(locked.guard_of[0], locked.guard_of[1]);
        assert_eq!(locked.place(&resolved, 0), locked.place(&resolved, 3));
        assert_ne!(locked.place(&resolved, 0), locked.place(&resolved, 1));
        let (a_guard, b_guard) = (locked.guard_of[1], locked.guard_of[0]);
        let a_first = Arc::as_ptr(&resolved.sets[1]) < Arc::as_ptr(&resolved.sets[0]);
        assert_eq!(a_guard < b_guard, a_first);
    }

    /// `docs/limits.md` says a (group, slug) costs about 1.9 KB: 1.75 KB of counters plus
    /// the key's strings and the map entry.
    #[test]
    fn a_counter_set_stays_small() {
        let size = std::mem::size_of::<CounterSet>();
        assert!(size <= 1_800, "{size} bytes");
    }
}
