//! DAY counters start from the usage stored in a real (SQLite) store, once per day.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tollgate_core::clock::{Clock, Timestamp};
use tollgate_core::LimitMode::{Cascading, Independent};
use tollgate_limits::{DayBaseline, LimiterError, StoreBaseline};
use tollgate_store::{DayUsage, NewGroup, SqliteStore, Store, UsageEvent, UsageStatus};

use super::*;

struct Tree {
    store: Arc<dyn Store>,
    workspace_id: String,
}

impl Tree {
    async fn new() -> Self {
        let store = SqliteStore::open("sqlite::memory:").await.unwrap();
        let workspace = store
            .create_workspace("acme", Timestamp(DAY0))
            .await
            .unwrap();
        Self {
            store: Arc::new(store),
            workspace_id: workspace.id,
        }
    }

    /// Stores `group` (built with `super::group`) and returns it as stored.
    async fn add(&self, group: Group) -> Group {
        self.store
            .create_group(NewGroup {
                id: group.id.clone(),
                workspace_id: self.workspace_id.clone(),
                name: None,
                external_entity_id: group.external_entity_id.clone(),
                models: group.models.clone(),
                mode: group.mode,
                parent_id: group.parent_id.clone(),
                created_at: Timestamp(DAY0),
            })
            .await
            .unwrap()
    }

    async fn event(&self, group: &str, slug: &str, at: Timestamp, tokens: (u64, u64)) {
        let id = tollgate_core::ids::random_base62(12);
        self.store
            .insert_usage_event(&UsageEvent {
                idempotency_key: format!("idem-{id}"),
                timestamp: at,
                request_id: format!("req-{id}"),
                request_metadata: None,
                model_slug: slug.into(),
                external_entity_id: format!("ext-{group}"),
                api_key_prefix: "tg_aaaaaaaaaaaaa".into(),
                group_id: group.into(),
                workspace_id: self.workspace_id.clone(),
                status: UsageStatus::Completed,
                input_tokens: tokens.0,
                output_tokens: tokens.1,
                cached_input_tokens: 0,
                is_estimated: false,
            })
            .await
            .unwrap();
    }
}

/// Counts the loads, optionally slowly, so concurrent first touches all miss.
struct Counted<B> {
    inner: B,
    loads: AtomicUsize,
    delay: Duration,
}

#[async_trait]
impl<B: DayBaseline> DayBaseline for Counted<B> {
    async fn day_usage(
        &self,
        counter_group: &str,
        slug: &str,
        mode: LimitMode,
        day_start: Timestamp,
    ) -> Result<DayUsage, LimiterError> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        self.inner
            .day_usage(counter_group, slug, mode, day_start)
            .await
    }
}

/// A restart (a new limiter over the same store) continues the day where it was; only
/// today's events of this group on this slug count.
async fn a_restart_continues_the_day_from_stored_usage(backend: Backend) {
    let tree = Tree::new().await;
    let a = tree
        .add(group(
            "A",
            Independent,
            None,
            &[(REQUEST, DAY, 5), (TOKEN, DAY, 100)],
        ))
        .await;
    let other = tree.add(group("X", Independent, None, &[])).await;
    for hour in [1, 2, 3] {
        tree.event(&a.id, SLUG, Timestamp(DAY0 + hour * 3_600_000), (10, 20))
            .await;
    }
    tree.event(&a.id, SLUG, Timestamp(DAY0 - 1), (500, 500))
        .await;
    tree.event(&a.id, "acme/other", Timestamp(DAY0 + 1), (500, 500))
        .await;
    tree.event(&other.id, SLUG, Timestamp(DAY0 + 1), (500, 500))
        .await;

    let baseline = Arc::new(StoreBaseline::new(tree.store.clone()));
    let (limiter, _clock) = backend.over(baseline, utc("2026-12-03T12:00:00Z")).await;
    let gating = limits(&[&a]);
    let r = admitted(admit(&limiter, &gating, Independent, 5).await).unwrap();
    assert_eq!(usage(&limiter, "A", REQUEST, DAY).await, 4);
    assert_eq!(usage(&limiter, "A", TOKEN, DAY).await, 95);
    limiter.settle(r, 9).await;
    assert_eq!(usage(&limiter, "A", TOKEN, DAY).await, 99);
    let _ = admitted(admit(&limiter, &gating, Independent, 0).await).unwrap();
    let refusal = refused(admit(&limiter, &gating, Independent, 0).await);
    assert_eq!(refusal.limit.kind, REQUEST);
    assert_eq!(refusal.retry_after_secs, 12 * 3_600);
}

/// CASCADING: an ancestor's DAY pool starts from its whole subtree's stored usage.
async fn a_cascading_day_pool_starts_from_the_subtrees_usage(backend: Backend) {
    let tree = Tree::new().await;
    let o = tree
        .add(group("O", Cascading, None, &[(TOKEN, DAY, 100)]))
        .await;
    let a = tree
        .add(group("A", Cascading, Some(&o), &[(TOKEN, DAY, 100)]))
        .await;
    let b = tree.add(group("B", Cascading, Some(&a), &[])).await;
    let c = tree.add(group("C", Cascading, Some(&o), &[])).await;
    tree.event(&b.id, SLUG, Timestamp(DAY0 + 10), (10, 20))
        .await;
    tree.event(&a.id, SLUG, Timestamp(DAY0 + 20), (10, 10))
        .await;
    tree.event(&c.id, SLUG, Timestamp(DAY0 + 30), (5, 5)).await;
    tree.event(&o.id, SLUG, Timestamp(DAY0 + 40), (1, 1)).await;

    let baseline = Arc::new(StoreBaseline::new(tree.store.clone()));
    let (limiter, _clock) = backend.over(baseline, utc("2026-12-03T12:00:00Z")).await;
    let gating = limits(&[&b, &a, &o]);
    let r = admitted(admit(&limiter, &gating, Cascading, 0).await).unwrap();
    // A's pool: B 30 + A 20; O's pool: B 30 + A 20 + C 10 + O 2.
    assert_eq!(usage(&limiter, "A", TOKEN, DAY).await, 50);
    assert_eq!(usage(&limiter, "O", TOKEN, DAY).await, 62);
    limiter.settle(r, 38).await;
    let refusal = refused(admit(&limiter, &gating, Cascading, 0).await);
    assert_eq!(refusal.limit.source_group, "O");
    assert_eq!(usage(&limiter, "A", TOKEN, DAY).await, 88);
}

/// A day in memory is never reloaded; the next day is loaded once, on its first request.
async fn the_baseline_is_loaded_once_per_group_and_day(backend: Backend) {
    let tree = Tree::new().await;
    let a = tree
        .add(group(
            "A",
            Independent,
            None,
            &[(REQUEST, DAY, 100), (TOKEN, DAY, 1_000)],
        ))
        .await;
    tree.event(&a.id, SLUG, Timestamp(DAY0 + 10), (10, 20))
        .await;
    let counted = Arc::new(Counted {
        inner: StoreBaseline::new(tree.store.clone()),
        loads: AtomicUsize::new(0),
        delay: Duration::ZERO,
    });
    let (limiter, clock) = backend
        .over(counted.clone(), utc("2026-12-03T12:00:00Z"))
        .await;
    let gating = limits(&[&a]);
    for _ in 0..3 {
        let r = admitted(admit(&limiter, &gating, Independent, 0).await).unwrap();
        limiter.settle(r, 0).await;
        // The event of that request, stored: must not be counted a second time.
        tree.event(&a.id, SLUG, clock.now(), (0, 0)).await;
    }
    // One load serves both DAY counters of the group.
    assert_eq!(counted.loads.load(Ordering::SeqCst), 1);
    assert_eq!(usage(&limiter, "A", REQUEST, DAY).await, 4);
    assert_eq!(usage(&limiter, "A", TOKEN, DAY).await, 30);

    clock.set(utc("2026-12-04T00:00:05Z"));
    tree.event(&a.id, SLUG, utc("2026-12-04T00:00:01Z"), (1, 1))
        .await;
    let _ = admitted(admit(&limiter, &gating, Independent, 0).await).unwrap();
    assert_eq!(counted.loads.load(Ordering::SeqCst), 2);
    assert_eq!(usage(&limiter, "A", REQUEST, DAY).await, 2);
    assert_eq!(usage(&limiter, "A", TOKEN, DAY).await, 2);
}

/// C05 variant: a group created a moment before, REQUEST/DAY 1, 8 concurrent first
/// requests (every one of them loading the baseline) → exactly 1 admitted.
async fn concurrent_first_requests_of_a_new_group_admit_exactly_one(backend: Backend) {
    for round in 0..5 {
        let tree = Tree::new().await;
        let a = tree
            .add(group("A", Independent, None, &[(REQUEST, DAY, 1)]))
            .await;
        let counted = Arc::new(Counted {
            inner: StoreBaseline::new(tree.store.clone()),
            loads: AtomicUsize::new(0),
            delay: Duration::from_millis(20),
        });
        let (limiter, _clock) = backend
            .over(counted.clone(), utc("2026-12-03T12:00:00Z"))
            .await;
        let limiter = Arc::new(limiter);
        let gating = Arc::new(limits(&[&a]));
        let barrier = Arc::new(tokio::sync::Barrier::new(8));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (limiter, gating, barrier) = (limiter.clone(), gating.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                admitted(admit(limiter.as_ref(), &gating, Independent, 0).await).is_some()
            }));
        }
        let mut admitted_count = 0;
        for task in tasks {
            admitted_count += usize::from(task.await.unwrap());
        }
        assert_eq!(admitted_count, 1, "round {round}");
        assert_eq!(counted.loads.load(Ordering::SeqCst), 8);
        assert_eq!(usage(&limiter, "A", REQUEST, DAY).await, 1);
    }
}

struct Failing;

#[async_trait]
impl DayBaseline for Failing {
    async fn day_usage(
        &self,
        _counter_group: &str,
        _slug: &str,
        _mode: LimitMode,
        _day_start: Timestamp,
    ) -> Result<DayUsage, LimiterError> {
        Err(LimiterError::Baseline("database is locked".into()))
    }
}

/// A baseline that cannot be read is an error, and the request debits nothing.
async fn a_baseline_error_debits_nothing(backend: Backend) {
    let a = group(
        "A",
        Independent,
        None,
        &[(REQUEST, MINUTE, 5), (TOKEN, DAY, 100)],
    );
    let gating = limits(&[&a]);
    let (limiter, _clock) = backend
        .over(Arc::new(Failing), utc("2026-12-03T12:00:00Z"))
        .await;
    let error = limiter
        .admit(request(&limiter, &gating, SLUG, Independent, 10))
        .await
        .unwrap_err();
    assert!(matches!(error, LimiterError::Baseline(_)));
    assert_eq!(error.to_string(), "loading day usage: database is locked");
    assert_eq!(usage(&limiter, "A", REQUEST, MINUTE).await, 0);
    assert_eq!(limiter.current_usage(&key("A", TOKEN, DAY)).await, None);
    // Rate limits alone never touch the store.
    let b = group("B", Independent, None, &[(REQUEST, MINUTE, 5)]);
    assert!(admitted(admit(&limiter, &limits(&[&b]), Independent, 0).await).is_some());
}

crate::conformance! {
    #[tokio::test] a_restart_continues_the_day_from_stored_usage,
    #[tokio::test] a_cascading_day_pool_starts_from_the_subtrees_usage,
    #[tokio::test] the_baseline_is_loaded_once_per_group_and_day,
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)] concurrent_first_requests_of_a_new_group_admit_exactly_one,
    #[tokio::test] a_baseline_error_debits_nothing,
}
