//! Where a DAY counter starts its day: the usage already stored for that UTC day.
//!
//! The limiter asks once per (counter group, slug, day), the first time a DAY counter of
//! that day is touched, outside any lock; later requests of the day count in memory.

use std::sync::Arc;

use async_trait::async_trait;
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
