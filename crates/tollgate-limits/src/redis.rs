//! The shared limiter: every counter in one Redis, so many gateway instances enforce one
//! set of limits.
//!
//! An admission is ONE Lua script (`admit.lua`, run with EVALSHA, loaded on the first
//! `NOSCRIPT`): it reads every counter gating the request, checks them all and debits all
//! or none, with the window rules of `tollgate_core::window` and the server's clock
//! (`TIME`). Redis runs a script alone, so N concurrent requests from any number of
//! instances against REQUEST/K admit exactly min(N, K). Settle and refund are one small
//! script (`adjust.lua`) that changes exactly the slots the admission debited.
//!
//! Keys: `<prefix>:{<tree root id>}:<counter group>:<slug>:<TYPE>:<UNIT>`. The braces make
//! the tree's root the Redis Cluster hash tag of every key one request touches (all its
//! counters belong to the caller's tree), so a script never spans two cluster slots.
//!
//! DAY counters start from the stored usage: when the script finds a DAY counter not on
//! today, it writes nothing and names it; the limiter loads those baselines through
//! [`DayBaseline`] (outside Redis) and runs the script again with them. The script
//! installs a baseline only if the counter is still not on today, so concurrent first
//! requests, on any instance, count the baseline once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::ConnectionManager;
use ::redis::{AsyncCommands, Client, Script};
use async_trait::async_trait;
use tollgate_core::clock::{Clock, DAY_MS};
use tollgate_core::hierarchy::EffectiveLimit;
use tollgate_core::window::{retry_after_secs, slot_at, WindowCounter};
use tollgate_core::{LimitType, LimitUnit, Timestamp};
use tollgate_store::DayUsage;

use crate::{
    rate_headers, AdmitRequest, CounterKey, DayBaseline, Debits, Decision, Limiter, LimiterError,
    RateHeaders, Refusal, Reservation,
};

const ADMIT_LUA: &str = include_str!("admit.lua");
const ADJUST_LUA: &str = include_str!("adjust.lua");

/// How often one admission may find its baselines stale (the UTC day changed between the
/// load and the script) before giving up.
const ATTEMPTS: usize = 3;

/// How long [`RedisLimiter::connect`] waits for a first connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A TOKEN counter's part of a shared reservation.
#[derive(Debug, Clone)]
pub(crate) struct SharedDebit {
    key: String,
    unit: LimitUnit,
    slot: i64,
}

/// What a shared admission debited: the TOKEN counters' keys and slots.
#[derive(Debug, Default)]
pub(crate) struct SharedDebits {
    debits: Vec<SharedDebit>,
    tokens: u64,
}

/// Limits enforced in one Redis shared by every gateway instance.
pub struct RedisLimiter {
    connection: ConnectionManager,
    baseline: Arc<dyn DayBaseline>,
    prefix: String,
    admit_script: Script,
    adjust_script: Script,
    /// For tests only: a clock whose time is passed to the scripts instead of the
    /// server's `TIME`, so window rules can be driven step by step.
    test_clock: Option<Arc<dyn Clock>>,
    /// Longest wait for one Redis call of an admission, settlement or probe; `None`: the
    /// connection's own response timeout (2 s).
    call_timeout: Option<Duration>,
}

fn shared(error: impl std::fmt::Display) -> LimiterError {
    LimiterError::Shared(error.to_string())
}

fn unit_code(unit: LimitUnit) -> &'static str {
    match unit {
        LimitUnit::Second => "S",
        LimitUnit::Minute => "M",
        LimitUnit::Day => "D",
    }
}

fn kind_code(kind: LimitType) -> &'static str {
    match kind {
        LimitType::Request => "R",
        LimitType::Token => "T",
    }
}

fn parse<T: std::str::FromStr>(answer: &[String], at: usize) -> Result<T, LimiterError> {
    answer
        .get(at)
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| shared(format!("unexpected script answer {answer:?}")))
}

impl RedisLimiter {
    /// Connects to `url` (`redis://host:port[/db]`); reconnects by itself afterwards. Keys
    /// start with `tg`.
    pub async fn connect(url: &str, baseline: Arc<dyn DayBaseline>) -> Result<Self, LimiterError> {
        let client = Client::open(url).map_err(shared)?;
        let config = ::redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(Duration::from_secs(2))
            .set_number_of_retries(2)
            .set_factor(50)
            .set_max_delay(1_000);
        let connection = tokio::time::timeout(
            CONNECT_TIMEOUT,
            client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|_| shared(format!("no connection within {CONNECT_TIMEOUT:?}")))?
        .map_err(shared)?;
        Ok(Self {
            connection,
            baseline,
            prefix: "tg".into(),
            admit_script: Script::new(ADMIT_LUA),
            adjust_script: Script::new(ADJUST_LUA),
            test_clock: None,
            call_timeout: None,
        })
    }

    /// Every Redis call of an admission, a settlement or [`RedisLimiter::ping`] fails with
    /// [`LimiterError::Shared`] after `timeout` (the fallback limiter uses 250 ms, so a
    /// stalled Redis holds a request no longer than that).
    #[must_use]
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = Some(timeout);
        self
    }

    /// Awaits one Redis call within the call timeout.
    async fn call<T>(
        &self,
        call: impl std::future::Future<Output = ::redis::RedisResult<T>>,
    ) -> Result<T, LimiterError> {
        match self.call_timeout {
            Some(limit) => tokio::time::timeout(limit, call)
                .await
                .map_err(|_| shared(format!("no answer within {limit:?}")))?
                .map_err(shared),
            None => call.await.map_err(shared),
        }
    }

    /// `PING`: whether Redis answers now (within the call timeout).
    pub async fn ping(&self) -> Result<(), LimiterError> {
        let mut connection = self.connection.clone();
        let answer: String = self
            .call(::redis::cmd("PING").query_async(&mut connection))
            .await?;
        if answer == "PONG" {
            Ok(())
        } else {
            Err(shared(format!("unexpected PING answer {answer:?}")))
        }
    }

    /// Keys start with `prefix` instead of `tg` (several gateways, or tests, on one Redis).
    #[must_use]
    pub fn with_key_prefix(mut self, prefix: &str) -> Self {
        prefix.clone_into(&mut self.prefix);
        self
    }

    /// For tests only: the scripts take their time from `clock` instead of the Redis
    /// server's `TIME`. A gateway never sets this: instances' clocks differ, the server's
    /// is one.
    #[must_use]
    pub fn with_test_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.test_clock = Some(clock);
        self
    }

    /// The Redis key of one counter of the tree rooted at `tree_root`.
    pub fn counter_key(&self, tree_root: &str, key: &CounterKey) -> String {
        self.key(tree_root, &key.group_id, &key.slug, key.kind, key.unit)
    }

    fn key(&self, root: &str, group: &str, slug: &str, kind: LimitType, unit: LimitUnit) -> String {
        let kind = match kind {
            LimitType::Request => "REQUEST",
            LimitType::Token => "TOKEN",
        };
        let unit = match unit {
            LimitUnit::Second => "SECOND",
            LimitUnit::Minute => "MINUTE",
            LimitUnit::Day => "DAY",
        };
        format!("{}:{{{root}}}:{group}:{slug}:{kind}:{unit}", self.prefix)
    }

    fn time_override(&self) -> String {
        self.test_clock
            .as_ref()
            .map(|clock| clock.now().0.to_string())
            .unwrap_or_default()
    }

    /// What the counter holds in its current window, reservations in flight included;
    /// `None` when it has counted nothing yet (for DAY: nothing today). Read with the
    /// rules of `tollgate_core::window` from the stored slots.
    pub async fn current_usage(
        &self,
        tree_root: &str,
        key: &CounterKey,
    ) -> Result<Option<u64>, LimiterError> {
        let mut connection = self.connection.clone();
        let fields: HashMap<String, String> = self
            .call(connection.hgetall(self.counter_key(tree_root, key)))
            .await?;
        let now = match &self.test_clock {
            Some(clock) => clock.now(),
            None => {
                let (secs, micros): (i64, i64) = self
                    .call(::redis::cmd("TIME").query_async(&mut connection))
                    .await?;
                Timestamp(secs * 1_000 + micros / 1_000)
            }
        };
        if fields.is_empty() {
            return Ok(None);
        }
        let number = |field: &str| fields.get(field).and_then(|v| v.parse::<i64>().ok());
        let mut window = WindowCounter::new(key.unit);
        if key.unit == LimitUnit::Day {
            let (Some(day), Some(value)) = (number("d"), number("v")) else {
                return Ok(None);
            };
            window.start_day(day, u64::try_from(value).unwrap_or(0));
            if day < slot_at(LimitUnit::Day, now) {
                return Ok(None);
            }
            return Ok(Some(window.used(now)));
        }
        let mut slots: Vec<(i64, u64)> = fields
            .keys()
            .filter_map(|field| field.strip_prefix('s'))
            .filter_map(|index| {
                let latest = number(&format!("l{index}"))?;
                let value = number(&format!("s{index}"))?;
                Some((latest, u64::try_from(value).unwrap_or(0)))
            })
            .collect();
        slots.sort_unstable();
        for (latest, value) in slots {
            window.debit(Timestamp(latest), value);
        }
        Ok(Some(window.used(now)))
    }

    async fn run_admit(
        &self,
        request: &AdmitRequest<'_>,
        keys: &[String],
        key_of: &[usize],
        baselines: Option<&(i64, Vec<Option<u64>>)>,
    ) -> Result<Vec<String>, LimiterError> {
        let mut invocation = self.admit_script.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        invocation
            .arg(self.time_override())
            .arg(request.estimated_tokens.to_string())
            .arg(
                baselines
                    .map(|(day, _)| day.to_string())
                    .unwrap_or_default(),
            )
            .arg(request.limits.len());
        for (i, limit) in request.limits.iter().enumerate() {
            let baseline = baselines
                .and_then(|(_, values)| values.get(i).copied().flatten())
                .map(|value| value.to_string())
                .unwrap_or_default();
            invocation
                .arg(key_of[i])
                .arg(kind_code(limit.kind))
                .arg(unit_code(limit.unit))
                .arg(limit.threshold.to_string())
                .arg(baseline);
        }
        let mut connection = self.connection.clone();
        self.call(invocation.invoke_async(&mut connection)).await
    }

    /// Loads the baselines of the DAY limits `missing` (1-based limit indices) for UTC day
    /// `day`, one read per counter group.
    async fn load_baselines(
        &self,
        request: &AdmitRequest<'_>,
        day: i64,
        missing: &[usize],
        values: &mut [Option<u64>],
    ) -> Result<(), LimiterError> {
        let mut loaded: Vec<(&str, DayUsage)> = Vec::new();
        for &i in missing {
            let Some(limit) = request.limits.get(i.wrapping_sub(1)) else {
                return Err(shared(format!("unexpected limit index {i}")));
            };
            let group = limit.counter_group.as_str();
            let usage = match loaded.iter().find(|(g, _)| *g == group) {
                Some((_, usage)) => *usage,
                None => {
                    let day_start = Timestamp(day.saturating_mul(DAY_MS));
                    let usage = self
                        .baseline
                        .day_usage(group, request.slug, request.mode, day_start)
                        .await?;
                    loaded.push((group, usage));
                    usage
                }
            };
            values[i - 1] = Some(match limit.kind {
                LimitType::Request => usage.requests,
                LimitType::Token => usage.tokens,
            });
        }
        Ok(())
    }
}

/// Header figures and the decision from the script's answer.
fn decide(
    request: &AdmitRequest<'_>,
    keys: &[String],
    key_of: &[usize],
    answer: &[String],
) -> Result<Decision, LimiterError> {
    let limits: &[EffectiveLimit] = request.limits;
    let n = limits.len();
    let now = Timestamp(parse(answer, 1)?);
    let refused = answer.first().map(String::as_str) == Some("refused");
    let base = if refused { 4 } else { 2 };
    let used: Vec<u64> = (0..n)
        .map(|i| parse(answer, base + i))
        .collect::<Result<_, _>>()?;
    let reset: Vec<i64> = (0..n)
        .map(|i| parse(answer, base + n + i))
        .collect::<Result<_, _>>()?;
    let headers: RateHeaders = rate_headers(limits, &used, |i| reset[i], now);
    if refused {
        let first: usize = parse(answer, 2)?;
        let retry_at: i64 = parse(answer, 3)?;
        let limit = limits
            .get(first.wrapping_sub(1))
            .ok_or_else(|| shared(format!("unexpected script answer {answer:?}")))?;
        return Ok(Decision::Refused(Refusal {
            limit: limit.clone(),
            retry_after_secs: retry_after_secs(now, Timestamp(retry_at)),
            headers,
        }));
    }
    let mut debits = Vec::new();
    for (i, limit) in limits.iter().enumerate() {
        let slot = answer
            .get(base + 2 * n + i)
            .map(String::as_str)
            .unwrap_or("");
        if slot.is_empty() {
            continue;
        }
        let slot: i64 = slot
            .parse()
            .map_err(|_| shared(format!("unexpected script answer {answer:?}")))?;
        debits.push(SharedDebit {
            key: keys[key_of[i] - 1].clone(),
            unit: limit.unit,
            slot,
        });
    }
    Ok(Decision::Admitted {
        reservation: Reservation {
            debits: Debits::Redis(SharedDebits {
                debits,
                tokens: request.estimated_tokens,
            }),
            estimated_tokens: request.estimated_tokens,
        },
        headers,
    })
}

impl RedisLimiter {
    async fn adjust(&self, reservation: Reservation, actual_tokens: u64) {
        if let Err(error) = self.try_adjust(reservation, actual_tokens).await {
            tracing::warn!(
                error = %error,
                "shared limiter: a token reservation could not be settled; its estimate stays counted"
            );
        }
    }

    /// Settles (`actual_tokens`) or refunds (0) a shared reservation; an error means Redis
    /// was not reached and the estimate stays counted. Another limiter's reservation is
    /// left alone.
    pub(crate) async fn try_adjust(
        &self,
        reservation: Reservation,
        actual_tokens: u64,
    ) -> Result<(), LimiterError> {
        let Debits::Redis(shared_debits) = reservation.debits else {
            return Ok(());
        };
        if shared_debits.debits.is_empty() {
            return Ok(());
        }
        let mut invocation = self.adjust_script.prepare_invoke();
        for debit in &shared_debits.debits {
            invocation
                .key(&debit.key)
                .arg(unit_code(debit.unit))
                .arg(debit.slot.to_string())
                .arg(shared_debits.tokens.to_string())
                .arg(actual_tokens.to_string());
        }
        let mut connection = self.connection.clone();
        let _: i64 = self.call(invocation.invoke_async(&mut connection)).await?;
        Ok(())
    }
}

#[async_trait]
impl Limiter for RedisLimiter {
    async fn admit(&self, request: AdmitRequest<'_>) -> Result<Decision, LimiterError> {
        if request.limits.is_empty() {
            return Ok(Decision::Admitted {
                reservation: Reservation {
                    debits: Debits::Redis(SharedDebits::default()),
                    estimated_tokens: request.estimated_tokens,
                },
                headers: RateHeaders::default(),
            });
        }
        // Distinct keys, and per limit its key's 1-based index.
        let mut keys: Vec<String> = Vec::new();
        let mut key_of = Vec::with_capacity(request.limits.len());
        for limit in request.limits {
            let key = self.key(
                request.tree_root,
                &limit.counter_group,
                request.slug,
                limit.kind,
                limit.unit,
            );
            let index = match keys.iter().position(|k| *k == key) {
                Some(index) => index,
                None => {
                    keys.push(key);
                    keys.len() - 1
                }
            };
            key_of.push(index + 1);
        }
        let mut baselines: Option<(i64, Vec<Option<u64>>)> = None;
        for _ in 0..ATTEMPTS {
            let answer = self
                .run_admit(&request, &keys, &key_of, baselines.as_ref())
                .await?;
            if answer.first().map(String::as_str) != Some("missing") {
                return decide(&request, &keys, &key_of, &answer);
            }
            let day: i64 = parse(&answer, 1)?;
            let missing: Vec<usize> = (2..answer.len())
                .map(|at| parse(&answer, at))
                .collect::<Result<_, _>>()?;
            let entry = match baselines.take() {
                Some((loaded_day, values)) if loaded_day == day => (day, values),
                _ => (day, vec![None; request.limits.len()]),
            };
            let (day, mut values) = entry;
            self.load_baselines(&request, day, &missing, &mut values)
                .await?;
            baselines = Some((day, values));
        }
        Err(shared(
            "the UTC day changed under every attempt to load the day's stored usage",
        ))
    }

    async fn settle(&self, reservation: Reservation, actual_tokens: u64) {
        self.adjust(reservation, actual_tokens).await;
    }

    async fn refund(&self, reservation: Reservation) {
        self.adjust(reservation, 0).await;
    }
}
