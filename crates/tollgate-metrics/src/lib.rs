//! The server's Prometheus metrics: one [`Metrics`] per server (never a process-wide
//! recorder, so several servers in one process — the tests — keep their own figures),
//! rendered at `GET /metrics` in the Prometheus text format 0.0.4 ([`CONTENT_TYPE`]).
//!
//! Every name starts with `tollgate_`. [`Metrics`] owns typed handles for the metrics of
//! parts that exist at start (the limiter's, [`LimiterMetrics`]); other parts register
//! theirs with [`Metrics::register`] (a counter, gauge, histogram or family they keep a
//! handle to) or [`Metrics::register_gauge_fn`] (a value read at scrape time).

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use parking_lot::RwLock;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Metric, Registry};

pub use prometheus_client;

/// `Content-Type` of [`Metrics::render`]'s text: the Prometheus text format, version 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// What every metric name starts with (followed by `_`).
pub const PREFIX: &str = "tollgate";

/// One server's metrics. Cloning is cheap and every clone is the same registry.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: RwLock<Named>,
    limiter: LimiterMetrics,
}

/// The registry and the names in it (the registry itself accepts a name twice and would
/// then render it twice).
struct Named {
    registry: Registry,
    names: HashSet<String>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("names", &self.inner.registry.read().names)
            .finish()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Why a metric could not be registered. Both are mistakes in the code that registers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    #[error("metric name '{0}' is already registered")]
    Duplicate(String),
    /// Not `[a-zA-Z_:][a-zA-Z0-9_:]*`, or a name ending in `_total` (the encoder adds that
    /// suffix to counters itself).
    #[error(
        "metric name '{0}' is not a metric name (letters, digits, '_', ':'; no '_total' suffix)"
    )]
    InvalidName(String),
}

impl Metrics {
    /// A registry holding the limiter's metrics.
    pub fn new() -> Self {
        let limiter = LimiterMetrics::default();
        let mut named = Named {
            registry: Registry::with_prefix(PREFIX),
            names: HashSet::new(),
        };
        named.registry.register(
            LimiterMetrics::SHARED,
            "1 while rate counters are shared in Redis; 0 while this instance counts alone \
             (no Redis configured, or Redis unreachable and per-instance limits enforced)",
            limiter.shared.clone(),
        );
        named.registry.register(
            LimiterMetrics::FALLBACK_SWITCHES,
            "Switches from shared (Redis) counters to per-instance limits, a start with \
             Redis unreachable included",
            limiter.fallback_switches.clone(),
        );
        named.registry.register(
            LimiterMetrics::REDIS_ERRORS,
            "Redis calls of admissions and settlements that failed or timed out",
            limiter.redis_errors.clone(),
        );
        for name in [
            LimiterMetrics::SHARED,
            LimiterMetrics::FALLBACK_SWITCHES,
            LimiterMetrics::REDIS_ERRORS,
        ] {
            named.names.insert(name.to_owned());
        }
        Self {
            inner: Arc::new(Inner {
                registry: RwLock::new(named),
                limiter,
            }),
        }
    }

    /// The limiter's handles (hand a clone to the limiter).
    pub fn limiter(&self) -> &LimiterMetrics {
        &self.inner.limiter
    }

    /// Registers `metric` as `tollgate_<name>` (a counter renders as
    /// `tollgate_<name>_total`: do not write the suffix). Keep a clone of the metric to
    /// update it; prometheus-client's metrics are handles to one value.
    pub fn register(
        &self,
        name: &str,
        help: &str,
        metric: impl Metric,
    ) -> Result<(), RegisterError> {
        if !is_metric_name(name) {
            return Err(RegisterError::InvalidName(name.to_owned()));
        }
        let mut named = self.inner.registry.write();
        if !named.names.insert(name.to_owned()) {
            return Err(RegisterError::Duplicate(name.to_owned()));
        }
        named.registry.register(name, help, metric);
        Ok(())
    }

    /// Registers a gauge `tollgate_<name>` whose value is `read()` at each scrape: for a
    /// figure another part already keeps (a queue's depth in an atomic, a spool's size).
    /// `read` runs on the scraping request's task: it must be quick and must not block.
    pub fn register_gauge_fn(
        &self,
        name: &str,
        help: &str,
        read: impl Fn() -> i64 + Send + Sync + 'static,
    ) -> Result<(), RegisterError> {
        self.register(
            name,
            help,
            GaugeFn {
                read: Box::new(read),
            },
        )
    }

    /// Every metric in the Prometheus text format 0.0.4 ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut text = String::new();
        let named = self.inner.registry.read();
        if let Err(error) =
            prometheus_client::encoding::prometheus_text::encode(&mut text, &named.registry)
        {
            // Writing into a String fails only if a metric's own encoder does.
            tracing::error!(%error, "metrics: encoding failed; the scrape is incomplete");
        }
        text
    }
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`, not ending in `_total`.
fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
    first_ok
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        && !name.ends_with("_total")
}

/// A gauge read from a closure when scraped.
struct GaugeFn {
    read: Box<dyn Fn() -> i64 + Send + Sync>,
}

impl fmt::Debug for GaugeFn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GaugeFn").finish_non_exhaustive()
    }
}

impl EncodeMetric for GaugeFn {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        encoder.encode_gauge(&(self.read)())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}

/// The rate limiter's metrics. `LimiterMetrics::default()` is a set registered nowhere
/// (benchmarks, tests of the limiter alone).
#[derive(Debug, Clone, Default)]
pub struct LimiterMetrics {
    shared: Gauge,
    fallback_switches: Counter,
    redis_errors: Counter,
}

impl LimiterMetrics {
    /// `tollgate_limiter_shared`.
    pub const SHARED: &'static str = "limiter_shared";
    /// `tollgate_limiter_fallback_switches_total`.
    pub const FALLBACK_SWITCHES: &'static str = "limiter_fallback_switches";
    /// `tollgate_limiter_redis_errors_total`.
    pub const REDIS_ERRORS: &'static str = "limiter_redis_errors";

    /// Whether admissions are counted in Redis (1) or by this instance alone (0).
    pub fn set_shared(&self, shared: bool) {
        self.shared.set(i64::from(shared));
    }

    pub fn count_fallback_switch(&self) {
        self.fallback_switches.inc();
    }

    pub fn count_redis_error(&self) {
        self.redis_errors.inc();
    }

    /// The gauge's value: 1 shared, 0 per instance.
    pub fn shared(&self) -> i64 {
        self.shared.get()
    }

    pub fn fallback_switches(&self) -> u64 {
        self.fallback_switches.get()
    }

    pub fn redis_errors(&self) -> u64 {
        self.redis_errors.get()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use std::sync::atomic::{AtomicI64, Ordering};

    use prometheus_client::metrics::counter::Counter;

    use super::*;

    const FRESH: &str = "\
# HELP tollgate_limiter_shared 1 while rate counters are shared in Redis; 0 while this instance counts alone (no Redis configured, or Redis unreachable and per-instance limits enforced).
# TYPE tollgate_limiter_shared gauge
tollgate_limiter_shared 0
# HELP tollgate_limiter_fallback_switches_total Switches from shared (Redis) counters to per-instance limits, a start with Redis unreachable included.
# TYPE tollgate_limiter_fallback_switches_total counter
tollgate_limiter_fallback_switches_total 0
# HELP tollgate_limiter_redis_errors_total Redis calls of admissions and settlements that failed or timed out.
# TYPE tollgate_limiter_redis_errors_total counter
tollgate_limiter_redis_errors_total 0
";

    #[test]
    fn a_fresh_registry_renders_the_limiter_metrics_at_zero() {
        assert_eq!(Metrics::new().render(), FRESH);
        assert_eq!(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8");
    }

    #[test]
    fn limiter_handles_change_the_rendered_values() {
        let metrics = Metrics::new();
        let limiter = metrics.limiter().clone();
        limiter.set_shared(true);
        limiter.count_fallback_switch();
        limiter.count_redis_error();
        limiter.count_redis_error();
        assert_eq!(
            (
                limiter.shared(),
                limiter.fallback_switches(),
                limiter.redis_errors()
            ),
            (1, 1, 2)
        );
        let text = metrics.render();
        let values: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            values,
            [
                "tollgate_limiter_shared 1",
                "tollgate_limiter_fallback_switches_total 1",
                "tollgate_limiter_redis_errors_total 2",
            ]
        );
        limiter.set_shared(false);
        assert!(metrics.render().contains("\ntollgate_limiter_shared 0\n"));
    }

    #[test]
    fn two_registries_keep_their_own_values() {
        let (a, b) = (Metrics::new(), Metrics::new());
        a.limiter().count_fallback_switch();
        assert_eq!(a.limiter().fallback_switches(), 1);
        assert_eq!(b.limiter().fallback_switches(), 0);
        assert_eq!(b.render(), FRESH);
        // A clone is the same registry.
        let a2 = a.clone();
        a2.limiter().count_fallback_switch();
        assert_eq!(a.limiter().fallback_switches(), 2);
    }

    #[test]
    fn a_gauge_fn_is_read_at_each_scrape() {
        let metrics = Metrics::new();
        let depth = Arc::new(AtomicI64::new(3));
        let read = depth.clone();
        metrics
            .register_gauge_fn("outbox_depth", "Events waiting", move || {
                read.load(Ordering::Relaxed)
            })
            .unwrap();
        assert!(metrics.render().ends_with(
            "# HELP tollgate_outbox_depth Events waiting.\n\
             # TYPE tollgate_outbox_depth gauge\n\
             tollgate_outbox_depth 3\n"
        ));
        depth.store(41, Ordering::Relaxed);
        assert!(metrics.render().ends_with("tollgate_outbox_depth 41\n"));
    }

    #[test]
    fn a_registered_counter_renders_with_its_total_suffix() {
        let metrics = Metrics::new();
        let delivered = Counter::<u64>::default();
        metrics
            .register("webhook_deliveries", "Deliveries", delivered.clone())
            .unwrap();
        delivered.inc_by(7);
        assert!(metrics
            .render()
            .ends_with("tollgate_webhook_deliveries_total 7\n"));
    }

    #[test]
    fn duplicate_and_malformed_names_are_refused() {
        let metrics = Metrics::new();
        assert_eq!(
            metrics.register_gauge_fn(LimiterMetrics::SHARED, "again", || 1),
            Err(RegisterError::Duplicate("limiter_shared".into()))
        );
        for bad in ["", "9lives", "with space", "has-dash", "events_total"] {
            assert_eq!(
                metrics.register_gauge_fn(bad, "x", || 1),
                Err(RegisterError::InvalidName(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(
            metrics.register_gauge_fn("spool:bytes_2", "x", || 1),
            Ok(())
        );
        assert_eq!(metrics.render().matches("# TYPE").count(), 4);
    }
}
