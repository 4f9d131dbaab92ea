//! The shared limiter with a way down: counters live in Redis ([`RedisLimiter`]) while it
//! answers. When a Redis call of an admission or a settlement fails or takes longer than
//! the call timeout (250 ms), this instance switches to counters of its own
//! ([`InProcessLimiter`]) with every limit divided by the expected instance count, logs
//! one `error` line and counts the switch; a probe (`PING`, once per second, in the
//! background) switches back when Redis answers. Requests keep being served throughout.
//!
//! Invariants: `tollgate_limiter_shared` is 1 exactly while admissions go to Redis; one
//! log line and one `tollgate_limiter_fallback_switches_total` per switch down, a start
//! with Redis unreachable included; a reservation settles on the limiter that admitted it
//! (its `Debits` say which). A stored-usage failure (`LimiterError::Baseline`) is not a
//! Redis failure: it is passed on and switches nothing.
//!
//! Why divide: N instances that each count alone against the full threshold would admit up
//! to N times the limit between them. Each enforces `threshold / N` (floor; at least 1,
//! so a small limit still serves while degraded; 0 stays 0) and starts a DAY counter from
//! the stored usage divided by N (rounded up), so the instances share what is left of the
//! day. Tests: `tests` below (`redis_stopped_*`, `a_start_with_redis_down_*`).

use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use tollgate_core::clock::Clock;
use tollgate_core::hierarchy::EffectiveLimit;
use tollgate_core::{LimitMode, Timestamp};
use tollgate_metrics::LimiterMetrics;
use tollgate_store::DayUsage;

use crate::{
    AdmitRequest, DayBaseline, Debits, Decision, InProcessLimiter, Limiter, LimiterError,
    RedisLimiter, Reservation,
};

/// Longest wait for one Redis call before the instance counts alone.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_millis(250);

/// How often a degraded instance asks Redis whether it is back.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Longest wait for a first connection, at start and by the probe when Redis was down at
/// start (a connection that exists reconnects by itself and is probed with `PING`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// What [`FallbackLimiter::start`] needs to know. `FallbackSettings::new` gives the
/// defaults; the fields are public to change them.
pub struct FallbackSettings {
    /// `redis://host:port[/db]`.
    pub url: String,
    /// Redis keys start with this instead of `tg`.
    pub key_prefix: Option<String>,
    /// How many gateway instances share the Redis: while degraded each limit is divided
    /// by this.
    pub expected_instances: NonZeroU64,
    /// Longest wait for one Redis call ([`DEFAULT_CALL_TIMEOUT`]).
    pub call_timeout: Duration,
    /// Pause between two probes while degraded ([`DEFAULT_PROBE_INTERVAL`]).
    pub probe_interval: Duration,
    /// Tests only: the time the Redis scripts count with (see
    /// [`RedisLimiter::with_test_clock`]).
    redis_test_clock: Option<Arc<dyn Clock>>,
}

impl FallbackSettings {
    /// The defaults for `url`: keys prefixed `tg`, one expected instance, 250 ms per
    /// call, a probe every second.
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            key_prefix: None,
            expected_instances: NonZeroU64::MIN,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            probe_interval: DEFAULT_PROBE_INTERVAL,
            redis_test_clock: None,
        }
    }
}

/// Counters shared in Redis while it answers, per-instance counters (each limit divided
/// by the expected instance count) while it does not.
pub struct FallbackLimiter {
    state: Arc<State>,
}

struct State {
    settings: FallbackSettings,
    clock: Arc<dyn Clock>,
    baseline: Arc<dyn DayBaseline>,
    metrics: LimiterMetrics,
    /// `None` until a first connection succeeds (Redis down at start).
    redis: RwLock<Option<Arc<RedisLimiter>>>,
    /// The per-instance counters of the current (or latest) outage: a fresh set per
    /// outage, so DAY counters start again from the usage stored by then.
    local: RwLock<Arc<InProcessLimiter>>,
    /// True while admissions are counted per instance.
    degraded: AtomicBool,
    /// Serialises switches; held briefly, never across an `.await`.
    switching: Mutex<()>,
}

/// The threshold one of `instances` enforces alone: `threshold / instances`, at least 1
/// (a limit smaller than the instance count still admits while degraded); 0 stays 0.
fn per_instance(threshold: u64, instances: NonZeroU64) -> u64 {
    if threshold == 0 {
        return 0;
    }
    (threshold / instances.get()).max(1)
}

/// The stored usage divided among the instances, rounded up: with `threshold / N` (floor)
/// an instance admits at most `(threshold − stored) / N` more, so N of them together
/// never pass the threshold on account of the division.
struct PerInstanceBaseline {
    inner: Arc<dyn DayBaseline>,
    instances: NonZeroU64,
}

#[async_trait]
impl DayBaseline for PerInstanceBaseline {
    async fn day_usage(
        &self,
        counter_group: &str,
        slug: &str,
        mode: LimitMode,
        day_start: Timestamp,
    ) -> Result<DayUsage, LimiterError> {
        let usage = self
            .inner
            .day_usage(counter_group, slug, mode, day_start)
            .await?;
        Ok(DayUsage {
            requests: usage.requests.div_ceil(self.instances.get()),
            tokens: usage.tokens.div_ceil(self.instances.get()),
        })
    }
}

impl FallbackLimiter {
    /// Connects to Redis and counts there; if Redis does not answer, starts degraded (one
    /// `error` line, one switch counted) and probes until it does. Fails only for a URL
    /// that is not a Redis URL. `clock` and `baseline` serve the per-instance counters
    /// (`baseline` the Redis ones too).
    pub async fn start(
        settings: FallbackSettings,
        clock: Arc<dyn Clock>,
        baseline: Arc<dyn DayBaseline>,
        metrics: LimiterMetrics,
    ) -> Result<Self, LimiterError> {
        ::redis::Client::open(settings.url.as_str())
            .map_err(|e| LimiterError::Shared(format!("not a Redis URL: {e}")))?;
        let local = Arc::new(InProcessLimiter::new(
            clock.clone(),
            Arc::new(PerInstanceBaseline {
                inner: baseline.clone(),
                instances: settings.expected_instances,
            }),
        ));
        let state = Arc::new(State {
            settings,
            clock,
            baseline,
            metrics,
            redis: RwLock::new(None),
            local: RwLock::new(local),
            degraded: AtomicBool::new(false),
            switching: Mutex::new(()),
        });
        match state.connect().await {
            Ok(redis) => {
                *state.redis.write() = Some(redis);
                state.metrics.set_shared(true);
                tracing::info!("rate counters shared in Redis");
            }
            Err(error) => state.degrade(&error),
        }
        Ok(Self { state })
    }

    /// Whether admissions are counted in Redis right now.
    pub fn is_shared(&self) -> bool {
        !self.state.degraded.load(Ordering::Acquire)
    }
}

impl State {
    /// A new connection, set up with the prefix, call timeout and test clock.
    async fn connect(&self) -> Result<Arc<RedisLimiter>, LimiterError> {
        let connecting = RedisLimiter::connect(&self.settings.url, self.baseline.clone());
        let mut redis = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| {
                LimiterError::Shared(format!("no connection within {CONNECT_TIMEOUT:?}"))
            })??
            .with_call_timeout(self.settings.call_timeout);
        if let Some(prefix) = &self.settings.key_prefix {
            redis = redis.with_key_prefix(prefix);
        }
        if let Some(clock) = &self.settings.redis_test_clock {
            redis = redis.with_test_clock(clock.clone());
        }
        Ok(Arc::new(redis))
    }

    /// The Redis limiter while admissions go there.
    fn shared_redis(&self) -> Option<Arc<RedisLimiter>> {
        if self.degraded.load(Ordering::Acquire) {
            return None;
        }
        self.redis.read().clone()
    }

    /// Switches to per-instance counters (nothing if already there), logs it once and
    /// starts the probe.
    fn degrade(self: &Arc<Self>, why: &LimiterError) {
        {
            let _switching = self.switching.lock();
            if self.degraded.load(Ordering::Acquire) {
                return;
            }
            *self.local.write() = Arc::new(InProcessLimiter::new(
                self.clock.clone(),
                Arc::new(PerInstanceBaseline {
                    inner: self.baseline.clone(),
                    instances: self.settings.expected_instances,
                }),
            ));
            self.degraded.store(true, Ordering::Release);
        }
        self.metrics.set_shared(false);
        self.metrics.count_fallback_switch();
        tracing::error!(
            error = %why,
            expected_instances = self.settings.expected_instances.get(),
            "shared limiter unreachable: counting per instance, each limit divided by \
             the expected instance count, until Redis answers again"
        );
        tokio::spawn(probe_until_back(
            Arc::downgrade(self),
            self.settings.probe_interval,
        ));
    }

    /// Back to the shared counters.
    fn restore(&self) {
        {
            let _switching = self.switching.lock();
            self.degraded.store(false, Ordering::Release);
        }
        self.metrics.set_shared(true);
        tracing::warn!("shared limiter reachable again: counting in Redis");
    }

    /// Whether Redis answers: `PING` on the existing connection, or a first connection.
    async fn probe(&self) -> bool {
        let existing = self.redis.read().clone();
        let redis = match existing {
            Some(redis) => redis,
            None => match self.connect().await {
                Ok(redis) => {
                    self.redis.write().get_or_insert(redis);
                    return true;
                }
                Err(_) => return false,
            },
        };
        redis.ping().await.is_ok()
    }

    /// An admission on this instance's counters, each limit divided by the expected
    /// instance count. A refusal names the declared limit (its real threshold); the
    /// headers show what this instance enforces.
    async fn admit_locally(&self, request: AdmitRequest<'_>) -> Result<Decision, LimiterError> {
        let local = self.local.read().clone();
        let instances = self.settings.expected_instances;
        if instances.get() == 1 {
            return local.admit(request).await;
        }
        let scaled: Vec<EffectiveLimit> = request
            .limits
            .iter()
            .map(|limit| EffectiveLimit {
                threshold: per_instance(limit.threshold, instances),
                ..limit.clone()
            })
            .collect();
        let decision = local
            .admit(AdmitRequest {
                limits: &scaled,
                ..request
            })
            .await?;
        Ok(match decision {
            Decision::Refused(mut refusal) => {
                if let Some(declared) = scaled
                    .iter()
                    .position(|limit| *limit == refusal.limit)
                    .and_then(|i| request.limits.get(i))
                {
                    refusal.limit = declared.clone();
                }
                Decision::Refused(refusal)
            }
            admitted => admitted,
        })
    }

    /// Settles (`Some(tokens)`) or refunds (`None`) on the limiter that admitted the
    /// request. A shared reservation ending while degraded is not sent: Redis is not
    /// answering, and its estimate stays counted there (an over-count, never an
    /// under-count).
    async fn end(self: &Arc<Self>, reservation: Reservation, actual_tokens: Option<u64>) {
        match &reservation.debits {
            Debits::InProcess(_) => {
                // The debits carry their counters: any in-process limiter settles them,
                // an earlier outage's included.
                let local = self.local.read().clone();
                match actual_tokens {
                    Some(tokens) => local.settle(reservation, tokens).await,
                    None => local.refund(reservation).await,
                }
            }
            Debits::Redis(_) => {
                let Some(redis) = self.shared_redis() else {
                    return;
                };
                if let Err(error) = redis
                    .try_adjust(reservation, actual_tokens.unwrap_or(0))
                    .await
                {
                    self.metrics.count_redis_error();
                    self.degrade(&error);
                }
            }
        }
    }
}

/// Probes every `interval` until Redis answers (then switches back) or the limiter is
/// gone. Only this task switches back, and one runs per outage.
async fn probe_until_back(state: Weak<State>, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        let Some(state) = state.upgrade() else {
            return;
        };
        if !state.degraded.load(Ordering::Acquire) {
            return;
        }
        if state.probe().await {
            state.restore();
            return;
        }
    }
}

#[async_trait]
impl Limiter for FallbackLimiter {
    async fn admit(&self, request: AdmitRequest<'_>) -> Result<Decision, LimiterError> {
        if let Some(redis) = self.state.shared_redis() {
            match redis.admit(request).await {
                Err(error @ LimiterError::Shared(_)) => {
                    self.state.metrics.count_redis_error();
                    self.state.degrade(&error);
                }
                decided => return decided,
            }
        }
        self.state.admit_locally(request).await
    }

    async fn settle(&self, reservation: Reservation, actual_tokens: u64) {
        self.state.end(reservation, Some(actual_tokens)).await;
    }

    async fn refund(&self, reservation: Reservation) {
        self.state.end(reservation, None).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        reason = "tests"
    )]

    use tollgate_core::clock::ManualClock;
    use tollgate_core::{LimitType, LimitUnit};
    use tollgate_metrics::Metrics;
    use tollgate_testkit::RedisServer;

    use super::*;
    use crate::{CounterKey, HeaderLimit, NoStoredUsage};

    const SLUG: &str = "acme/m";
    const ROOT: &str = "grp_o";
    /// 2026-12-03T12:00:00Z: far from a UTC day boundary.
    const NOON: i64 = 1_796_256_000_000 + 12 * 3_600_000;

    fn limit(kind: LimitType, threshold: u64) -> EffectiveLimit {
        EffectiveLimit {
            kind,
            unit: LimitUnit::Day,
            threshold,
            source_group: "grp_a".into(),
            counter_group: "grp_a".into(),
        }
    }

    fn request(limits: &[EffectiveLimit], estimated_tokens: u64) -> AdmitRequest<'_> {
        AdmitRequest {
            limits,
            slug: SLUG,
            tree_root: ROOT,
            mode: LimitMode::Independent,
            estimated_tokens,
        }
    }

    /// A limiter on `redis` for `instances` instances, its figures in `metrics`, both
    /// halves on one manual clock at noon.
    async fn limiter(
        redis: &RedisServer,
        instances: u64,
        metrics: &Metrics,
        baseline: Arc<dyn DayBaseline>,
    ) -> FallbackLimiter {
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(Timestamp(NOON)));
        let settings = FallbackSettings {
            expected_instances: NonZeroU64::new(instances).unwrap(),
            redis_test_clock: Some(clock.clone()),
            ..FallbackSettings::new(&redis.url())
        };
        FallbackLimiter::start(settings, clock, baseline, metrics.limiter().clone())
            .await
            .unwrap()
    }

    /// (shared, switches, Redis errors)
    fn figures(metrics: &Metrics) -> (i64, u64, u64) {
        let limiter = metrics.limiter();
        (
            limiter.shared(),
            limiter.fallback_switches(),
            limiter.redis_errors(),
        )
    }

    fn admitted(decision: Decision) -> (Reservation, Option<HeaderLimit>, Option<HeaderLimit>) {
        match decision {
            Decision::Admitted {
                reservation,
                headers,
            } => (reservation, headers.requests, headers.tokens),
            Decision::Refused(refusal) => panic!("refused: {refusal:?}"),
        }
    }

    fn requests_header(limit: u64, remaining: u64) -> Option<HeaderLimit> {
        Some(HeaderLimit {
            limit,
            remaining,
            reset_ms: 12 * 3_600_000,
        })
    }

    /// The counter's value in Redis (`None`: no key).
    async fn in_redis(limiter: &FallbackLimiter, limit: &EffectiveLimit) -> Option<u64> {
        let redis = limiter.state.redis.read().clone().unwrap();
        redis
            .current_usage(ROOT, &CounterKey::of(limit, SLUG))
            .await
            .unwrap()
    }

    fn in_local(limiter: &FallbackLimiter, limit: &EffectiveLimit) -> Option<u64> {
        let local = limiter.state.local.read().clone();
        local.current_usage(&CounterKey::of(limit, SLUG))
    }

    /// Polls until the probe has switched back (no assertion on how long it takes; the
    /// deadline only keeps a broken build from hanging).
    async fn wait_until_shared(limiter: &FallbackLimiter) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !limiter.is_shared() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            limiter.is_shared(),
            "Redis answers again but the limiter never switched back"
        );
    }

    #[test]
    fn each_instance_enforces_its_share_of_a_limit() {
        let three = NonZeroU64::new(3).unwrap();
        let four = NonZeroU64::new(4).unwrap();
        assert_eq!(per_instance(10, three), 3);
        assert_eq!(per_instance(9, three), 3);
        assert_eq!(per_instance(2, four), 1);
        assert_eq!(per_instance(1, NonZeroU64::MIN), 1);
        assert_eq!(per_instance(7, NonZeroU64::MIN), 7);
        assert_eq!(per_instance(0, three), 0);
        assert_eq!(per_instance(u64::MAX, three), u64::MAX / 3);
    }

    struct Stored(DayUsage);

    #[async_trait]
    impl DayBaseline for Stored {
        async fn day_usage(
            &self,
            _: &str,
            _: &str,
            _: LimitMode,
            _: Timestamp,
        ) -> Result<DayUsage, LimiterError> {
            Ok(self.0)
        }
    }

    #[tokio::test]
    async fn the_stored_usage_is_shared_out_rounded_up() {
        let baseline = PerInstanceBaseline {
            inner: Arc::new(Stored(DayUsage {
                requests: 8,
                tokens: 9,
            })),
            instances: NonZeroU64::new(3).unwrap(),
        };
        let usage = baseline
            .day_usage("g", SLUG, LimitMode::Independent, Timestamp(0))
            .await
            .unwrap();
        assert_eq!((usage.requests, usage.tokens), (3, 3));
    }

    #[tokio::test]
    async fn redis_stopped_serves_per_instance_limits_and_shared_counting_resumes() {
        let mut redis = RedisServer::start().await.unwrap();
        let metrics = Metrics::new();
        let limiter = limiter(&redis, 3, &metrics, Arc::new(NoStoredUsage)).await;
        let limits = [limit(LimitType::Request, 10)];
        assert!(limiter.is_shared());
        assert_eq!(figures(&metrics), (1, 0, 0));

        // Shared: the declared limit, counted in Redis.
        for remaining in [9, 8, 7, 6] {
            let (reservation, requests, _) =
                admitted(limiter.admit(request(&limits, 1)).await.unwrap());
            assert_eq!(requests, requests_header(10, remaining));
            limiter.settle(reservation, 1).await;
        }
        assert_eq!(in_redis(&limiter, &limits[0]).await, Some(4));

        // Redis gone: served by this instance's counters, 10 / 3 = 3 of them.
        redis.stop().await.unwrap();
        for remaining in [2, 1, 0] {
            let (reservation, requests, _) =
                admitted(limiter.admit(request(&limits, 1)).await.unwrap());
            assert_eq!(requests, requests_header(3, remaining));
            limiter.settle(reservation, 1).await;
        }
        let Decision::Refused(refusal) = limiter.admit(request(&limits, 1)).await.unwrap() else {
            panic!("the fourth request of this instance was admitted");
        };
        assert_eq!(refusal.limit, limits[0], "the 429 names the declared limit");
        assert_eq!(refusal.headers.requests, requests_header(3, 0));
        assert!(!limiter.is_shared());
        assert_eq!(in_local(&limiter, &limits[0]), Some(3));
        // One failed Redis call, one switch; later admissions never waited on Redis.
        assert_eq!(figures(&metrics), (0, 1, 1));
        assert!(metrics.render().contains("\ntollgate_limiter_shared 0\n"));

        // Redis back (empty): the probe switches back, counting resumes there.
        redis.start_again().await.unwrap();
        wait_until_shared(&limiter).await;
        assert_eq!(figures(&metrics), (1, 1, 1));
        let (reservation, requests, _) =
            admitted(limiter.admit(request(&limits, 1)).await.unwrap());
        assert_eq!(requests, requests_header(10, 9));
        limiter.settle(reservation, 1).await;
        assert_eq!(in_redis(&limiter, &limits[0]).await, Some(1));
        assert_eq!(in_local(&limiter, &limits[0]), Some(3), "untouched");
        assert!(metrics.render().contains("\ntollgate_limiter_shared 1\n"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_requests_meeting_the_outage_switch_once_and_admit_exactly_the_share() {
        let mut redis = RedisServer::start().await.unwrap();
        let metrics = Metrics::new();
        let limiter = Arc::new(limiter(&redis, 2, &metrics, Arc::new(NoStoredUsage)).await);
        redis.stop().await.unwrap();
        let barrier = Arc::new(tokio::sync::Barrier::new(20));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let (limiter, barrier) = (limiter.clone(), barrier.clone());
            tasks.spawn(async move {
                let limits = [limit(LimitType::Request, 10)];
                barrier.wait().await;
                match limiter.admit(request(&limits, 1)).await.unwrap() {
                    Decision::Admitted { reservation, .. } => {
                        limiter.settle(reservation, 1).await;
                        true
                    }
                    Decision::Refused(_) => false,
                }
            });
        }
        let admitted = tasks.join_all().await.into_iter().filter(|a| *a).count();
        assert_eq!(admitted, 5, "10 / 2 on this instance");
        assert_eq!(metrics.limiter().fallback_switches(), 1);
        assert_eq!(metrics.limiter().shared(), 0);
        assert_eq!(in_local(&limiter, &limit(LimitType::Request, 10)), Some(5));
    }

    #[tokio::test]
    async fn a_reservation_settles_on_the_limiter_that_admitted_it() {
        let mut redis = RedisServer::start().await.unwrap();
        let metrics = Metrics::new();
        let limiter = limiter(&redis, 2, &metrics, Arc::new(NoStoredUsage)).await;
        let limits = [limit(LimitType::Token, 1000)];

        let (shared_one, _, tokens) = admitted(limiter.admit(request(&limits, 10)).await.unwrap());
        assert_eq!(tokens.map(|t| (t.limit, t.remaining)), Some((1000, 990)));
        assert_eq!(in_redis(&limiter, &limits[0]).await, Some(10));

        // A settlement that cannot reach Redis switches too.
        redis.stop().await.unwrap();
        limiter.settle(shared_one, 30).await;
        assert!(!limiter.is_shared());
        assert_eq!(figures(&metrics), (0, 1, 1));

        let (local_one, _, tokens) = admitted(limiter.admit(request(&limits, 10)).await.unwrap());
        assert_eq!(tokens.map(|t| (t.limit, t.remaining)), Some((500, 490)));
        assert_eq!(figures(&metrics), (0, 1, 1));

        redis.start_again().await.unwrap();
        wait_until_shared(&limiter).await;
        let (shared_two, _, _) = admitted(limiter.admit(request(&limits, 10)).await.unwrap());
        assert_eq!(in_redis(&limiter, &limits[0]).await, Some(10));

        // The degraded admission settles on the per-instance counter, not in Redis.
        limiter.settle(local_one, 50).await;
        assert_eq!(in_local(&limiter, &limits[0]), Some(50));
        assert_eq!(in_redis(&limiter, &limits[0]).await, Some(10));
        // The shared one in Redis.
        limiter.refund(shared_two).await;
        assert_eq!(in_redis(&limiter, &limits[0]).await, Some(0));
        assert_eq!(in_local(&limiter, &limits[0]), Some(50));
        assert_eq!(figures(&metrics), (1, 1, 1));
    }

    #[tokio::test]
    async fn a_start_with_redis_down_starts_degraded_and_shares_once_redis_answers() {
        let mut redis = RedisServer::start().await.unwrap();
        redis.stop().await.unwrap();
        let metrics = Metrics::new();
        let limiter = limiter(&redis, 2, &metrics, Arc::new(NoStoredUsage)).await;
        assert!(!limiter.is_shared());
        assert_eq!(figures(&metrics), (0, 1, 0));

        let limits = [limit(LimitType::Request, 4)];
        for remaining in [1, 0] {
            let (reservation, requests, _) =
                admitted(limiter.admit(request(&limits, 1)).await.unwrap());
            assert_eq!(requests, requests_header(2, remaining));
            limiter.settle(reservation, 1).await;
        }
        let Decision::Refused(refusal) = limiter.admit(request(&limits, 1)).await.unwrap() else {
            panic!("a third request was admitted against 4 / 2");
        };
        assert_eq!(refusal.limit.threshold, 4);

        redis.start_again().await.unwrap();
        wait_until_shared(&limiter).await;
        assert_eq!(figures(&metrics), (1, 1, 0));
        let (reservation, requests, _) =
            admitted(limiter.admit(request(&limits, 1)).await.unwrap());
        assert_eq!(requests, requests_header(4, 3));
        limiter.settle(reservation, 1).await;
        assert_eq!(in_redis(&limiter, &limits[0]).await, Some(1));
    }

    #[tokio::test]
    async fn a_degraded_day_starts_from_its_share_of_the_stored_usage() {
        let mut redis = RedisServer::start().await.unwrap();
        redis.stop().await.unwrap();
        let metrics = Metrics::new();
        let stored = Arc::new(Stored(DayUsage {
            requests: 5,
            tokens: 0,
        }));
        let limiter = limiter(&redis, 2, &metrics, stored).await;
        // 10 / 2 = 5 for this instance, which starts from ceil(5 / 2) = 3 of them.
        let limits = [limit(LimitType::Request, 10)];
        for remaining in [1, 0] {
            let (reservation, requests, _) =
                admitted(limiter.admit(request(&limits, 1)).await.unwrap());
            assert_eq!(requests, requests_header(5, remaining));
            limiter.settle(reservation, 1).await;
        }
        assert!(matches!(
            limiter.admit(request(&limits, 1)).await.unwrap(),
            Decision::Refused(_)
        ));
    }

    struct Unreadable;

    #[async_trait]
    impl DayBaseline for Unreadable {
        async fn day_usage(
            &self,
            _: &str,
            _: &str,
            _: LimitMode,
            _: Timestamp,
        ) -> Result<DayUsage, LimiterError> {
            Err(LimiterError::Baseline("database unreachable".into()))
        }
    }

    #[tokio::test]
    async fn a_stored_usage_failure_is_passed_on_and_switches_nothing() {
        let redis = RedisServer::start().await.unwrap();
        let metrics = Metrics::new();
        let limiter = limiter(&redis, 2, &metrics, Arc::new(Unreadable)).await;
        let limits = [limit(LimitType::Request, 10)];
        let error = limiter.admit(request(&limits, 1)).await.unwrap_err();
        assert_eq!(error.to_string(), "loading day usage: database unreachable");
        assert!(limiter.is_shared());
        assert_eq!(figures(&metrics), (1, 0, 0));
    }

    #[tokio::test]
    async fn a_url_that_is_not_redis_is_refused() {
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(Timestamp(NOON)));
        let result = FallbackLimiter::start(
            FallbackSettings::new("http://127.0.0.1:1"),
            clock,
            Arc::new(NoStoredUsage),
            LimiterMetrics::default(),
        )
        .await;
        assert!(
            matches!(&result, Err(LimiterError::Shared(why)) if why.starts_with("not a Redis URL")),
            "{}",
            result.err().map(|e| e.to_string()).unwrap_or_default()
        );
    }
}
