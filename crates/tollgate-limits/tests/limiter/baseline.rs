//! DAY counters start from the usage stored in a real (SQLite) store, once per day.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tollgate_core::clock::{Clock, Timestamp};
use tollgate_core::LimitMode::{Cascading, Independent};
use tollgate_limits::{Coalesced, DayBaseline, LimiterError, StoreBaseline};
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
        let admitted_count = admitted_of_concurrent(&limiter, &gating, 8).await;
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

/// Through the limiter: the 8 concurrent first requests of C05 share one read, and
/// exactly one is still admitted.
async fn concurrent_first_requests_share_one_coalesced_load(backend: Backend) {
    let tree = Tree::new().await;
    // A limit of 2 with one request already stored today: one more fits.
    let b = tree
        .add(group("B", Independent, None, &[(REQUEST, DAY, 2)]))
        .await;
    tree.event(&b.id, SLUG, Timestamp(DAY0 + 1), (0, 0)).await;
    let coalesced = Arc::new(Coalesced::new(Gated::new(StoreBaseline::new(
        tree.store.clone(),
    ))));
    let (limiter, _clock) = backend
        .over(coalesced.clone(), utc("2026-12-03T12:00:00Z"))
        .await;
    let limiter = Arc::new(limiter);
    let gating = Arc::new(limits(&[&b]));
    // The read is let through only once all 8 admissions wait for it.
    let opener = {
        let coalesced = coalesced.clone();
        tokio::spawn(async move {
            until(|| coalesced.waiters() == 8).await;
            coalesced.inner().open(1);
        })
    };
    let admitted_count = admitted_of_concurrent(&limiter, &gating, 8).await;
    opener.await.unwrap();
    assert_eq!(admitted_count, 1);
    assert_eq!(coalesced.inner().loads(), 1);
    assert_eq!(usage(&limiter, "B", REQUEST, DAY).await, 2);
    assert_eq!(coalesced.in_flight(), 0);
}

/// `n` INDEPENDENT admissions of no tokens released at once; how many were admitted.
async fn admitted_of_concurrent(limiter: &Arc<Subject>, gating: &Arc<Gating>, n: usize) -> usize {
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = Vec::new();
    for _ in 0..n {
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
    admitted_count
}

/// A baseline whose reads wait for the test to let them through, one per permit, so
/// which callers share a read is decided by the test, not by timing.
struct Gated<B> {
    inner: B,
    loads: AtomicUsize,
    gate: tokio::sync::Semaphore,
}

impl<B> Gated<B> {
    fn new(inner: B) -> Self {
        Self {
            inner,
            loads: AtomicUsize::new(0),
            gate: tokio::sync::Semaphore::new(0),
        }
    }

    /// Reads started so far.
    fn loads(&self) -> usize {
        self.loads.load(Ordering::SeqCst)
    }

    /// Lets `reads` more reads through.
    fn open(&self, reads: usize) {
        self.gate.add_permits(reads);
    }
}

#[async_trait]
impl<B: DayBaseline> DayBaseline for Gated<B> {
    async fn day_usage(
        &self,
        counter_group: &str,
        slug: &str,
        mode: LimitMode,
        day_start: Timestamp,
    ) -> Result<DayUsage, LimiterError> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        // A read the test never lets through fails after 10 s rather than hanging it.
        match tokio::time::timeout(Duration::from_secs(10), self.gate.acquire()).await {
            Ok(permit) => permit.unwrap().forget(),
            Err(_) => return Err(LimiterError::Baseline("the gate never opened".into())),
        }
        self.inner
            .day_usage(counter_group, slug, mode, day_start)
            .await
    }
}

/// Waits (10 s at most) until `condition` holds.
async fn until(condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition never held"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

crate::conformance! {
    #[tokio::test] a_restart_continues_the_day_from_stored_usage,
    #[tokio::test] a_cascading_day_pool_starts_from_the_subtrees_usage,
    #[tokio::test] the_baseline_is_loaded_once_per_group_and_day,
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)] concurrent_first_requests_of_a_new_group_admit_exactly_one,
    #[tokio::test] a_baseline_error_debits_nothing,
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)] concurrent_first_requests_share_one_coalesced_load,
}

mod coalesced {
    //! `Coalesced` on its own: who shares a read, who reads afresh.

    use super::*;

    type Subject = Coalesced<Gated<StoreBaseline>>;

    struct Fixture {
        tree: Tree,
        coalesced: Arc<Subject>,
    }

    impl Fixture {
        fn gate(&self) -> &Gated<StoreBaseline> {
            self.coalesced.inner()
        }
    }

    async fn fixture() -> Fixture {
        let tree = Tree::new().await;
        let a = tree.add(group("A", Independent, None, &[])).await;
        tree.event(&a.id, SLUG, Timestamp(DAY0 + 5), (3, 4)).await;
        tree.event(&a.id, SLUG, Timestamp(DAY0 + 6), (10, 20)).await;
        let coalesced = Arc::new(Coalesced::new(Gated::new(StoreBaseline::new(
            tree.store.clone(),
        ))));
        Fixture { tree, coalesced }
    }

    fn load(
        coalesced: &Arc<Subject>,
        slug: &'static str,
        day: i64,
    ) -> tokio::task::JoinHandle<Result<DayUsage, LimiterError>> {
        let coalesced = coalesced.clone();
        tokio::spawn(async move {
            coalesced
                .day_usage("A", slug, Independent, Timestamp(day))
                .await
        })
    }

    const TODAY: DayUsage = DayUsage {
        requests: 2,
        tokens: 37,
    };
    const NONE: DayUsage = DayUsage {
        requests: 0,
        tokens: 0,
    };

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_of_the_same_baseline_share_one_read() {
        let f = fixture().await;
        let same: Vec<_> = (0..6).map(|_| load(&f.coalesced, SLUG, DAY0)).collect();
        // Another slug and another day are other baselines, read apart.
        let other_slug = load(&f.coalesced, "acme/other", DAY0);
        let other_day = load(&f.coalesced, SLUG, DAY0 - 86_400_000);
        until(|| f.coalesced.waiters() == 8).await;
        assert_eq!(f.coalesced.in_flight(), 3);
        assert_eq!(f.gate().loads(), 3);
        f.gate().open(3);
        for task in same {
            assert_eq!(task.await.unwrap().unwrap(), TODAY);
        }
        assert_eq!(other_slug.await.unwrap().unwrap(), NONE);
        assert_eq!(other_day.await.unwrap().unwrap(), NONE);
        assert_eq!(f.gate().loads(), 3);
        assert_eq!(f.coalesced.in_flight(), 0);

        // An answered read is forgotten: the next caller reads again, and sees what was
        // stored since.
        f.tree.event("A", SLUG, Timestamp(DAY0 + 7), (1, 1)).await;
        f.gate().open(1);
        let again = load(&f.coalesced, SLUG, DAY0).await.unwrap().unwrap();
        assert_eq!(
            again,
            DayUsage {
                requests: 3,
                tokens: 39
            }
        );
        assert_eq!(f.gate().loads(), 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_caller_hands_the_read_to_the_next() {
        let f = fixture().await;
        let first = load(&f.coalesced, SLUG, DAY0);
        until(|| f.gate().loads() == 1).await;
        let second = load(&f.coalesced, SLUG, DAY0);
        until(|| f.coalesced.waiters() == 2).await;
        // Both wait on one read.
        assert_eq!(f.coalesced.in_flight(), 1);
        assert_eq!(f.gate().loads(), 1);
        // The caller running the read goes away (its client disconnected).
        first.abort();
        assert!(first.await.unwrap_err().is_cancelled());
        // The waiter takes the read over, and a newcomer shares it.
        until(|| f.gate().loads() == 2).await;
        let third = load(&f.coalesced, SLUG, DAY0);
        until(|| f.coalesced.waiters() == 2).await;
        assert_eq!(f.coalesced.in_flight(), 1);
        f.gate().open(1);
        assert_eq!(second.await.unwrap().unwrap(), TODAY);
        assert_eq!(third.await.unwrap().unwrap(), TODAY);
        // The abandoned read, then the one the second and third callers shared.
        assert_eq!(f.gate().loads(), 2);
        assert_eq!(f.coalesced.in_flight(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_every_caller_abandoned_is_not_kept() {
        let f = fixture().await;
        let callers: Vec<_> = (0..3).map(|_| load(&f.coalesced, SLUG, DAY0)).collect();
        until(|| f.coalesced.waiters() == 3).await;
        assert_eq!(f.coalesced.in_flight(), 1);
        for caller in callers {
            caller.abort();
            assert!(caller.await.unwrap_err().is_cancelled());
        }
        assert_eq!(f.coalesced.in_flight(), 0);
        assert_eq!(f.coalesced.waiters(), 0);
        // Nothing was left half-done: the next caller reads (how many reads the aborted
        // callers started depends on when each was aborted) and gets the answer.
        let before = f.gate().loads();
        f.gate().open(1);
        assert_eq!(
            load(&f.coalesced, SLUG, DAY0).await.unwrap().unwrap(),
            TODAY
        );
        assert_eq!(f.gate().loads(), before + 1);
        assert_eq!(f.coalesced.in_flight(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_error_reaches_every_waiter_and_is_not_kept() {
        struct FailingOnce {
            calls: AtomicUsize,
        }
        #[async_trait]
        impl DayBaseline for FailingOnce {
            async fn day_usage(
                &self,
                _counter_group: &str,
                _slug: &str,
                _mode: LimitMode,
                _day_start: Timestamp,
            ) -> Result<DayUsage, LimiterError> {
                match self.calls.fetch_add(1, Ordering::SeqCst) {
                    0 => Err(LimiterError::Baseline("database is locked".into())),
                    _ => Ok(TODAY),
                }
            }
        }
        let coalesced = Arc::new(Coalesced::new(Gated::new(FailingOnce {
            calls: AtomicUsize::new(0),
        })));
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let coalesced = coalesced.clone();
                tokio::spawn(async move {
                    coalesced
                        .day_usage("A", SLUG, Independent, Timestamp(DAY0))
                        .await
                })
            })
            .collect();
        until(|| coalesced.waiters() == 4).await;
        coalesced.inner().open(1);
        for task in tasks {
            let error = task.await.unwrap().unwrap_err();
            assert_eq!(error.to_string(), "loading day usage: database is locked");
        }
        coalesced.inner().open(1);
        let retried = coalesced
            .day_usage("A", SLUG, Independent, Timestamp(DAY0))
            .await
            .unwrap();
        assert_eq!(retried, TODAY);
        assert_eq!(coalesced.inner().loads(), 2);
        assert_eq!(coalesced.in_flight(), 0);
    }
}
