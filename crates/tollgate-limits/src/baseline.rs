//! Where a DAY counter starts its day: the usage already stored for that UTC day.
//!
//! The limiter asks once per (counter group, slug, day), the first time a DAY counter of
//! that day is touched, outside any lock; later requests of the day count in memory.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::OnceCell;
use tollgate_core::{LimitMode, Timestamp};
use tollgate_store::{DayUsage, Store};

use crate::LimiterError;

/// Usage already recorded for a counter group's DAY counters.
#[async_trait]
pub trait DayBaseline: Send + Sync + 'static {
    /// Requests and tokens stored for `counter_group` on `slug` during the UTC day that
    /// starts at `day_start`. In CASCADING mode a counter pools its whole subtree, so the
    /// subtree's usage counts; in INDEPENDENT mode only the group's own.
    async fn day_usage(
        &self,
        counter_group: &str,
        slug: &str,
        mode: LimitMode,
        day_start: Timestamp,
    ) -> Result<DayUsage, LimiterError>;
}

/// Reads the baseline from the store's usage events.
pub struct StoreBaseline {
    store: Arc<dyn Store>,
}

impl StoreBaseline {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }
}

#[async_trait]
impl DayBaseline for StoreBaseline {
    async fn day_usage(
        &self,
        counter_group: &str,
        slug: &str,
        mode: LimitMode,
        day_start: Timestamp,
    ) -> Result<DayUsage, LimiterError> {
        let mut groups = vec![counter_group.to_owned()];
        if mode == LimitMode::Cascading {
            let descendants = self
                .store
                .pool_descendant_ids(counter_group)
                .await
                .map_err(|e| LimiterError::Baseline(e.to_string()))?;
            groups.extend(descendants);
        }
        let usage = self
            .store
            .day_usage(&groups, slug, day_start)
            .await
            .map_err(|e| LimiterError::Baseline(e.to_string()))?;
        Ok(usage.unwrap_or(DayUsage {
            requests: 0,
            tokens: 0,
        }))
    }
}

/// One load at a time per (counter group, slug, mode, day): callers that ask while a load
/// of the same baseline is in flight wait for its answer instead of reading again.
///
/// Without it, the concurrent first requests of a day each read the same pool: with 64
/// connections on fresh keys under one CASCADING root, every admission summed the root's
/// whole subtree for itself. Once a load has answered it is forgotten, so a later day (or
/// a retry after an error) reads afresh. A waiter that is dropped (its client left) hands
/// the load to the next waiter; the answer is the same either way.
pub struct Coalesced<B> {
    inner: B,
    in_flight: Mutex<HashMap<LoadKey, InFlight>>,
}

type Load = OnceCell<Result<DayUsage, LimiterError>>;

/// A read in flight and how many callers hold it.
struct InFlight {
    load: Arc<Load>,
    waiters: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct LoadKey {
    counter_group: String,
    slug: String,
    mode: LimitMode,
    day_start: i64,
}

impl<B: DayBaseline> Coalesced<B> {
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    /// Reads in flight now: none once every caller has its answer or has gone.
    pub fn in_flight(&self) -> usize {
        self.in_flight.lock().len()
    }

    /// The baseline it reads through.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// Callers waiting on those reads now.
    pub fn waiters(&self) -> usize {
        self.in_flight
            .lock()
            .values()
            .map(|entry| entry.waiters)
            .sum()
    }
}

#[async_trait]
impl<B: DayBaseline> DayBaseline for Coalesced<B> {
    async fn day_usage(
        &self,
        counter_group: &str,
        slug: &str,
        mode: LimitMode,
        day_start: Timestamp,
    ) -> Result<DayUsage, LimiterError> {
        let key = LoadKey {
            counter_group: counter_group.to_owned(),
            slug: slug.to_owned(),
            mode,
            day_start: day_start.0,
        };
        let waiter = Waiter::join(&self.in_flight, key);
        waiter
            .load
            .get_or_init(|| self.inner.day_usage(counter_group, slug, mode, day_start))
            .await
            .clone()
        // `waiter` lets go here, and also when this future is dropped (its client left)
        // or the read panics.
    }
}

/// One caller's hold on a read in flight.
struct Waiter<'a> {
    in_flight: &'a Mutex<HashMap<LoadKey, InFlight>>,
    key: LoadKey,
    load: Arc<Load>,
}

impl<'a> Waiter<'a> {
    fn join(in_flight: &'a Mutex<HashMap<LoadKey, InFlight>>, key: LoadKey) -> Self {
        let mut map = in_flight.lock();
        let entry = map.entry(key.clone()).or_insert_with(|| InFlight {
            load: Arc::default(),
            waiters: 0,
        });
        entry.waiters += 1;
        let load = Arc::clone(&entry.load);
        drop(map);
        Self {
            in_flight,
            key,
            load,
        }
    }
}

impl Drop for Waiter<'_> {
    /// The read leaves the map once it has an answer (later callers read afresh) or when
    /// its last caller lets go without one (every caller gone: nothing keeps it), so an
    /// abandoned read of a day nobody asks about again is not kept forever.
    fn drop(&mut self) {
        let mut map = self.in_flight.lock();
        let Some(entry) = map.get_mut(&self.key) else {
            return;
        };
        if !Arc::ptr_eq(&entry.load, &self.load) {
            // Answered and replaced by a newer read meanwhile.
            return;
        }
        entry.waiters = entry.waiters.saturating_sub(1);
        if entry.waiters == 0 || self.load.initialized() {
            map.remove(&self.key);
        }
    }
}

/// Every day starts at zero: for tests and benchmarks, never for a gateway that stores
/// usage (its restarts would reset customers' days).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoStoredUsage;

#[async_trait]
impl DayBaseline for NoStoredUsage {
    async fn day_usage(
        &self,
        _counter_group: &str,
        _slug: &str,
        _mode: LimitMode,
        _day_start: Timestamp,
    ) -> Result<DayUsage, LimiterError> {
        Ok(DayUsage {
            requests: 0,
            tokens: 0,
        })
    }
}
