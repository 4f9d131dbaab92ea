//! Token reservations: reserve at admission, settle to actual, refund on failure, and the
//! overshoot bound of `docs/limits.md`.

use tollgate_core::clock::Timestamp;
use tollgate_core::LimitMode::{Cascading, Independent};

use super::*;

async fn settle_replaces_the_estimate_on_every_token_counter(backend: Backend) {
    let o = group("O", Cascading, None, &[(TOKEN, DAY, 5_000)]);
    let a = group(
        "A",
        Cascading,
        Some(&o),
        &[(TOKEN, MINUTE, 1_000), (REQUEST, MINUTE, 10)],
    );
    let gating = limits(&[&a, &o]);
    let (limiter, _clock) = backend.at(utc("2026-12-03T12:00:00Z")).await;
    async fn counters(l: &Subject) -> [u64; 3] {
        [
            usage(l, "A", TOKEN, MINUTE).await,
            usage(l, "O", TOKEN, DAY).await,
            usage(l, "A", REQUEST, MINUTE).await,
        ]
    }

    let first = admitted(admit(&limiter, &gating, Cascading, 40).await).unwrap();
    assert_eq!(counters(&limiter).await, [40, 40, 1]);
    limiter.settle(first, 100).await;
    assert_eq!(counters(&limiter).await, [100, 100, 1]);

    let failed = admitted(admit(&limiter, &gating, Cascading, 40).await).unwrap();
    assert_eq!(counters(&limiter).await, [140, 140, 2]);
    limiter.refund(failed).await;
    // The tokens come back; the request admission stays counted.
    assert_eq!(counters(&limiter).await, [100, 100, 2]);

    let small = admitted(admit(&limiter, &gating, Cascading, 40).await).unwrap();
    limiter.settle(small, 10).await;
    assert_eq!(counters(&limiter).await, [110, 110, 3]);

    let unused = admitted(admit(&limiter, &gating, Cascading, 0).await).unwrap();
    assert_eq!(unused.estimated_tokens(), 0);
    limiter.settle(unused, 7).await;
    assert_eq!(counters(&limiter).await, [117, 117, 4]);
}

/// Tokens count from the admission that reserved them, in that admission's slot.
async fn settled_tokens_count_in_the_admissions_slot(backend: Backend) {
    let a = group("A", Independent, None, &[(TOKEN, MINUTE, 1_000)]);
    let gating = limits(&[&a]);
    let (limiter, clock) = backend.at(Timestamp(DAY0)).await;
    let reservation = admitted(admit(&limiter, &gating, Independent, 10).await).unwrap();
    clock.advance_millis(30_000);
    limiter.settle(reservation, 100).await;
    assert_eq!(usage(&limiter, "A", TOKEN, MINUTE).await, 100);
    clock.set(Timestamp(DAY0 + 59_999));
    assert_eq!(usage(&limiter, "A", TOKEN, MINUTE).await, 100);
    clock.set(Timestamp(DAY0 + 60_000));
    assert_eq!(usage(&limiter, "A", TOKEN, MINUTE).await, 0);

    // A reservation settled after its slot left the window changes nothing.
    let late = admitted(admit(&limiter, &gating, Independent, 10).await).unwrap();
    clock.advance_millis(70_000);
    let fresh = admitted(admit(&limiter, &gating, Independent, 5).await).unwrap();
    limiter.settle(late, 900).await;
    assert_eq!(usage(&limiter, "A", TOKEN, MINUTE).await, 5);
    limiter.refund(fresh).await;
    assert_eq!(usage(&limiter, "A", TOKEN, MINUTE).await, 0);
}

/// A refusal leaves every counter exactly as it was, tokens and requests.
async fn counters_are_unchanged_after_a_refusal(backend: Backend) {
    let o = group(
        "O",
        Cascading,
        None,
        &[(TOKEN, MINUTE, 100), (TOKEN, DAY, 1_000)],
    );
    let a = group(
        "A",
        Cascading,
        Some(&o),
        &[
            (REQUEST, MINUTE, 5),
            (REQUEST, DAY, 50),
            (TOKEN, MINUTE, 100),
        ],
    );
    let gating = limits(&[&a, &o]);
    let (limiter, _clock) = backend.at(utc("2026-12-03T12:00:00Z")).await;
    async fn snapshot(l: &Subject) -> [u64; 5] {
        [
            usage(l, "A", REQUEST, MINUTE).await,
            usage(l, "A", REQUEST, DAY).await,
            usage(l, "A", TOKEN, MINUTE).await,
            usage(l, "O", TOKEN, MINUTE).await,
            usage(l, "O", TOKEN, DAY).await,
        ]
    }
    let r = admitted(admit(&limiter, &gating, Cascading, 60).await).unwrap();
    limiter.settle(r, 120).await;
    let before = snapshot(&limiter).await;
    assert_eq!(before, [1, 1, 120, 120, 120]);
    for _ in 0..5 {
        let refusal = refused(admit(&limiter, &gating, Cascading, 60).await);
        assert_eq!(refusal.limit.source_group, "A");
        assert_eq!(refusal.limit.kind, TOKEN);
        assert_eq!(snapshot(&limiter).await, before);
    }
}

/// The bound of `docs/limits.md`, exact: 10 requests reserve 10 tokens each against a
/// TOKEN/MINUTE 100, all in flight, each then uses 50.
async fn overshoot_is_what_requests_in_flight_use_beyond_their_estimate(backend: Backend) {
    let a = group("A", Independent, None, &[(TOKEN, MINUTE, 100)]);
    let gating = limits(&[&a]);
    let (limiter, _clock) = backend.at(Timestamp(DAY0)).await;
    let mut in_flight = Vec::new();
    while let Some(r) = admitted(admit(&limiter, &gating, Independent, 10).await) {
        in_flight.push(r);
    }
    assert_eq!(in_flight.len(), 10);
    assert_eq!(usage(&limiter, "A", TOKEN, MINUTE).await, 100);
    for r in in_flight {
        limiter.settle(r, 50).await;
    }
    let counted = usage(&limiter, "A", TOKEN, MINUTE).await;
    assert_eq!(counted, 500);
    // (T − 1) + estimate of the last admission + Σ (actual − estimate) over the requests
    // in flight when it was admitted (itself included): 99 + 10 + 10 × 40.
    assert!(counted <= 99 + 10 + 10 * 40);

    // One request at a time, the bound is T − 1 + the largest actual use (C01: 100 and
    // 60-token calls → admitted at 0 and 60, refused at 120).
    let (limiter, _clock) = backend.at(Timestamp(DAY0)).await;
    let mut admitted_calls = 0;
    while let Some(r) = admitted(admit(&limiter, &gating, Independent, 3).await) {
        limiter.settle(r, 60).await;
        admitted_calls += 1;
    }
    assert_eq!(admitted_calls, 2);
    let counted = usage(&limiter, "A", TOKEN, MINUTE).await;
    assert_eq!(counted, 120);
    assert!(counted <= 99 + 60);
}

/// The bound measured over many interleavings of admissions and settlements within one
/// window (a deterministic pseudo-random schedule): the counter always ends at the sum
/// of actual uses, never above the bound, and the bound is reached when every request
/// in flight overruns.
async fn overshoot_never_exceeds_the_bound(backend: Backend) {
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = |below: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % below
    };
    let mut worst_ratio = 0.0f64;
    for run in 0..300 {
        let threshold = 1 + next(1_000);
        let a = group("A", Independent, None, &[(TOKEN, MINUTE, threshold)]);
        let gating = limits(&[&a]);
        let (limiter, _clock) = backend.at(Timestamp(DAY0)).await;
        // (reservation, estimate, actual)
        let mut in_flight: Vec<(Reservation, u64, u64)> = Vec::new();
        let mut bound = 0u64;
        let mut total_actual = 0u64;
        for _ in 0..200 {
            if in_flight.is_empty() || next(3) > 0 {
                let estimate = next(60);
                let actual = next(300);
                if let Some(r) = admitted(admit(&limiter, &gating, Independent, estimate).await) {
                    in_flight.push((r, estimate, actual));
                    total_actual += actual;
                    let excess: u64 = in_flight.iter().map(|(_, e, a)| a.saturating_sub(*e)).sum();
                    bound = bound.max(threshold - 1 + estimate + excess);
                }
            } else {
                let i = next(in_flight.len() as u64) as usize;
                let (r, _, actual) = in_flight.swap_remove(i);
                limiter.settle(r, actual).await;
            }
        }
        for (r, _, actual) in in_flight {
            limiter.settle(r, actual).await;
        }
        let counted = usage(&limiter, "A", TOKEN, MINUTE).await;
        assert_eq!(counted, total_actual, "run {run}");
        assert!(counted <= bound, "run {run}: {counted} > {bound}");
        worst_ratio = worst_ratio.max(counted as f64 / threshold as f64);
    }
    // With up to ~200 requests in flight overrunning by up to 300 tokens, a small
    // threshold can be overrun many times over: the bound is about concurrency.
    assert!(worst_ratio > 1.0);
}

crate::conformance! {
    #[tokio::test] settle_replaces_the_estimate_on_every_token_counter,
    #[tokio::test] settled_tokens_count_in_the_admissions_slot,
    #[tokio::test] counters_are_unchanged_after_a_refusal,
    #[tokio::test] overshoot_is_what_requests_in_flight_use_beyond_their_estimate,
    #[tokio::test] overshoot_never_exceeds_the_bound,
}
