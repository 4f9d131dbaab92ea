//! What only the shared limiter has: keys under one hash tag, expiry, the server's clock,
//! several instances over one Redis, and a Redis that cannot be reached.

use std::collections::BTreeSet;

use ::redis::AsyncCommands;
use tokio::sync::Barrier;
use tollgate_core::LimitMode::{Cascading, Independent};
use tollgate_limits::LimiterError;
use tollgate_store::DayUsage;

use super::*;

fn url() -> Option<String> {
    match Backend::redis()? {
        Backend::Redis(url) => Some(url),
        Backend::InProcess => None,
    }
}

async fn raw(url: &str) -> ::redis::aio::MultiplexedConnection {
    ::redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Every key of a request carries the tree's root as its one hash tag, and expires a
/// little after its window (DAY: an hour after the UTC day ends).
#[tokio::test]
async fn keys_share_the_roots_hash_tag_and_expire_after_their_window() {
    let Some(url) = url() else { return };
    let prefix = test_prefix();
    let clock = Arc::new(ManualClock::new(utc("2026-12-03T23:00:00Z")));
    let limiter = RedisLimiter::connect(&url, Arc::new(NoStoredUsage))
        .await
        .unwrap()
        .with_key_prefix(&prefix)
        .with_test_clock(clock.clone());
    let subject = Subject::from_redis(limiter);
    let o = group("grp_o", Cascading, None, &[(TOKEN, DAY, 1_000)]);
    let a = group("grp_a", Cascading, Some(&o), &[(REQUEST, SECOND, 5)]);
    let d = group("grp_d", Cascading, Some(&a), &[(REQUEST, MINUTE, 5)]);
    let r = admitted(admit(&subject, &limits(&[&d, &a, &o]), Cascading, 7).await).unwrap();
    subject.settle(r, 9).await;

    let mut redis = raw(&url).await;
    let keys: BTreeSet<String> = redis.keys(format!("{prefix}:*")).await.unwrap();
    let expected: BTreeSet<String> = [
        format!("{prefix}:{{grp_o}}:grp_d:acme/m:REQUEST:MINUTE"),
        format!("{prefix}:{{grp_o}}:grp_a:acme/m:REQUEST:SECOND"),
        format!("{prefix}:{{grp_o}}:grp_o:acme/m:TOKEN:DAY"),
    ]
    .into();
    assert_eq!(keys, expected);
    let slots: BTreeSet<u16> = keys.iter().map(|k| cluster_slot(k)).collect();
    assert_eq!(slots.len(), 1);

    let ttl = |key: &str| {
        let key = format!("{prefix}:{{grp_o}}:{key}");
        let mut redis = redis.clone();
        async move { redis.pttl::<_, i64>(key).await.unwrap() }
    };
    // SECOND: 1 s + a 100 ms slot + 60 s; MINUTE: 60 s + 6 s + 60 s (less the time the
    // test took); DAY: one hour to midnight on the test clock, plus an hour.
    let second = ttl("grp_a:acme/m:REQUEST:SECOND").await;
    assert!((59_000..=61_100).contains(&second), "{second}");
    let minute = ttl("grp_d:acme/m:REQUEST:MINUTE").await;
    assert!((124_000..=126_000).contains(&minute), "{minute}");
    let day = ttl("grp_o:acme/m:TOKEN:DAY").await;
    assert!((7_190_000..=7_200_000).contains(&day), "{day}");
    assert_eq!(usage(&subject, "grp_o", TOKEN, DAY).await, 9);
}

/// CRC16 (XMODEM) of the hash tag modulo 16384: the Redis Cluster slot of a key.
fn cluster_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = key
        .find('{')
        .and_then(|open| {
            let close = key[open + 1..].find('}')?;
            (close > 0).then(|| &bytes[open + 1..open + 1 + close])
        })
        .unwrap_or(bytes);
    let mut crc: u16 = 0;
    for &byte in tagged {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16_384
}

/// Without the test override the script counts on the server's clock.
#[tokio::test]
async fn the_servers_clock_drives_the_windows() {
    let Some(url) = url() else { return };
    let limiter = RedisLimiter::connect(&url, Arc::new(NoStoredUsage))
        .await
        .unwrap()
        .with_key_prefix(&test_prefix());
    let subject = Subject::from_redis(limiter);
    let o = group("O", Independent, None, &[(REQUEST, MINUTE, 2)]);
    let gating = limits(&[&o]);
    for remaining in [1, 0] {
        let Decision::Admitted { headers, .. } = admit(&subject, &gating, Independent, 0).await
        else {
            panic!("refused");
        };
        let requests = headers.requests.unwrap();
        assert_eq!(requests.remaining, remaining);
        assert!(
            (59_000..=60_000).contains(&requests.reset_ms),
            "{requests:?}"
        );
    }
    let refusal = refused(admit(&subject, &gating, Independent, 0).await);
    assert!((59..=60).contains(&refusal.retry_after_secs), "{refusal:?}");
    assert_eq!(usage(&subject, "O", REQUEST, MINUTE).await, 2);
}

/// Usage stored before: 3 requests today.
struct Three;

#[async_trait::async_trait]
impl DayBaseline for Three {
    async fn day_usage(
        &self,
        _counter_group: &str,
        _slug: &str,
        _mode: LimitMode,
        _day_start: Timestamp,
    ) -> Result<DayUsage, LimiterError> {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        Ok(DayUsage {
            requests: 3,
            tokens: 0,
        })
    }
}

/// C05 across instances: three limiters (three connections) over one Redis, 64 requests
/// released together against REQUEST/DAY 5 whose day starts at 3 stored → exactly 2,
/// the baseline counted once although every first request loaded it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_sharing_one_redis_admit_exactly_the_limit() {
    let Some(url) = url() else { return };
    for round in 0..5 {
        let prefix = test_prefix();
        let clock = Arc::new(ManualClock::new(utc("2026-12-03T12:00:00Z")));
        let mut instances = Vec::new();
        for _ in 0..3 {
            let limiter = RedisLimiter::connect(&url, Arc::new(Three))
                .await
                .unwrap()
                .with_key_prefix(&prefix)
                .with_test_clock(clock.clone());
            instances.push(Arc::new(Subject::from_redis(limiter)));
        }
        let a = group("A", Independent, None, &[(REQUEST, DAY, 5)]);
        let gating = Arc::new(limits(&[&a]));
        let barrier = Arc::new(Barrier::new(64));
        let mut tasks = Vec::new();
        for i in 0..64 {
            let (subject, gating, barrier) =
                (instances[i % 3].clone(), gating.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                admitted(admit(&subject, &gating, Independent, 0).await).is_some()
            }));
        }
        let mut count = 0;
        for task in tasks {
            count += usize::from(task.await.unwrap());
        }
        assert_eq!(count, 2, "round {round}");
        assert_eq!(usage(&instances[1], "A", REQUEST, DAY).await, 5);
    }
}

/// A Redis that cannot be reached is an error, never a panic or a silent admission.
#[tokio::test]
async fn an_unreachable_redis_is_an_error() {
    let error = match RedisLimiter::connect("redis://127.0.0.1:1", Arc::new(NoStoredUsage)).await {
        Ok(_) => panic!("connected to port 1"),
        Err(error) => error,
    };
    assert!(matches!(error, LimiterError::Shared(_)), "{error}");
    assert!(error.to_string().starts_with("shared limiter: "), "{error}");
    let error = match RedisLimiter::connect("not a url", Arc::new(NoStoredUsage)).await {
        Ok(_) => panic!("connected"),
        Err(error) => error,
    };
    assert!(matches!(error, LimiterError::Shared(_)), "{error}");
}
