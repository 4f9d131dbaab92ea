//! Admission under real concurrency: tasks on a multi-thread runtime, released together.

use std::sync::Arc;

use tokio::sync::Barrier;
use tollgate_core::LimitMode::{Cascading, Independent};

use super::*;

/// Runs `n` admissions at once, each of `gating[i % gating.len()]`; returns how many of
/// each were admitted.
async fn race(limiter: Arc<Subject>, gating: Vec<Gating>, n: usize, mode: LimitMode) -> Vec<usize> {
    let barrier = Arc::new(Barrier::new(n));
    let gating = Arc::new(gating);
    let mut tasks = Vec::new();
    for i in 0..n {
        let (limiter, gating, barrier) = (limiter.clone(), gating.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            let which = i % gating.len();
            barrier.wait().await;
            let decision = admit(limiter.as_ref(), &gating[which], mode, 1).await;
            (which, admitted(decision).is_some())
        }));
    }
    let mut counts = vec![0; gating.len()];
    for task in tasks {
        let (which, is_admitted) = task.await.unwrap();
        counts[which] += usize::from(is_admitted);
    }
    counts
}

/// C05: N concurrent requests against REQUEST/DAY K admit exactly min(N, K).
async fn concurrent_admits_take_exactly_the_limit(backend: Backend) {
    for (k, n) in [(5, 64), (5, 20), (64, 20), (1, 8), (50, 200)] {
        for round in 0..10 {
            let a = group("A", Independent, None, &[(REQUEST, DAY, k)]);
            let (limiter, _clock) = backend.at(utc("2026-12-03T12:00:00Z")).await;
            let limiter = Arc::new(limiter);
            let counts = race(limiter.clone(), vec![limits(&[&a])], n, Independent).await;
            let expected = (k as usize).min(n);
            assert_eq!(counts, [expected], "K {k}, N {n}, round {round}");
            assert_eq!(usage(&limiter, "A", REQUEST, DAY).await, expected as u64);
        }
    }
}

/// Siblings racing for their parent's pool: exactly the pool is admitted, split however
/// the race goes, and each child's own counter holds exactly its admissions.
async fn concurrent_siblings_share_the_parents_pool_exactly(backend: Backend) {
    for round in 0..10 {
        let o = group(
            "O",
            Cascading,
            None,
            &[(REQUEST, MINUTE, 10), (TOKEN, MINUTE, 1_000)],
        );
        let a = group("A", Cascading, Some(&o), &[(REQUEST, MINUTE, 8)]);
        let b = group("B", Cascading, Some(&o), &[(REQUEST, SECOND, 8)]);
        let (limiter, _clock) = backend.at(utc("2026-12-03T12:00:00Z")).await;
        let limiter = Arc::new(limiter);
        let counts = race(
            limiter.clone(),
            vec![limits(&[&a, &o]), limits(&[&b, &o])],
            40,
            Cascading,
        )
        .await;
        assert_eq!(counts.iter().sum::<usize>(), 10, "round {round}");
        assert!(
            counts[0] <= 8 && counts[1] <= 8,
            "round {round}: {counts:?}"
        );
        assert_eq!(usage(&limiter, "O", REQUEST, MINUTE).await, 10);
        assert_eq!(usage(&limiter, "O", TOKEN, MINUTE).await, 10);
        assert_eq!(
            usage(&limiter, "A", REQUEST, MINUTE).await,
            counts[0] as u64
        );
        assert_eq!(
            usage(&limiter, "B", REQUEST, SECOND).await,
            counts[1] as u64
        );
    }
}

/// Admissions of chains that share counters in opposite orders (a CASCADING chain and an
/// INDEPENDENT-looking list naming the same counters reversed) never deadlock.
async fn opposite_orders_over_shared_counters_do_not_deadlock(backend: Backend) {
    let o = group("O", Cascading, None, &[(REQUEST, MINUTE, 100_000)]);
    let a = group("A", Cascading, Some(&o), &[(REQUEST, MINUTE, 100_000)]);
    let forward = limits(&[&a, &o]);
    let mut backward = forward.clone();
    backward.reverse();
    let (limiter, _clock) = backend.at(utc("2026-12-03T12:00:00Z")).await;
    let limiter = Arc::new(limiter);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let limiter = limiter.clone();
        let gating = if i % 2 == 0 {
            forward.clone()
        } else {
            backward.clone()
        };
        tasks.push(tokio::spawn(async move {
            for _ in 0..2_000 {
                let _ = admitted(admit(limiter.as_ref(), &gating, Cascading, 0).await).unwrap();
            }
        }));
    }
    for task in tasks {
        tokio::time::timeout(std::time::Duration::from_secs(60), task)
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(usage(&limiter, "A", REQUEST, MINUTE).await, 16_000);
    assert_eq!(usage(&limiter, "O", REQUEST, MINUTE).await, 16_000);
}

/// The same counter named twice in one request is locked once and debited once.
async fn a_counter_named_twice_is_debited_once(backend: Backend) {
    let a = group("A", Independent, None, &[(REQUEST, MINUTE, 3)]);
    let once = limits(&[&a]);
    let mut twice = once.clone();
    twice.push(once[0].clone());
    let (limiter, _clock) = backend.at(utc("2026-12-03T12:00:00Z")).await;
    for _ in 0..3 {
        let _ = admitted(admit(&limiter, &twice, Independent, 0).await).unwrap();
    }
    assert_eq!(usage(&limiter, "A", REQUEST, MINUTE).await, 3);
    assert!(admitted(admit(&limiter, &twice, Independent, 0).await).is_none());
}

crate::conformance! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)] concurrent_admits_take_exactly_the_limit,
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)] concurrent_siblings_share_the_parents_pool_exactly,
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)] opposite_orders_over_shared_counters_do_not_deadlock,
    #[tokio::test] a_counter_named_twice_is_debited_once,
}
