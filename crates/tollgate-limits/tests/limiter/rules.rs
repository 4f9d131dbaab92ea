//! SPEC §1.3 and §2 limit rules and the field cases, one exact number at a time.

use tollgate_core::clock::{Clock, Timestamp};
use tollgate_core::LimitMode::{Cascading, Independent};
use tollgate_limits::{Decision, HeaderLimit, RateHeaders};

use super::*;

/// Admits a request of `tokens` estimated tokens and settles it at the same count.
async fn call(
    limiter: &Subject,
    limits: &Gating,
    mode: LimitMode,
    tokens: u64,
) -> Result<(), Refusal> {
    match admit(limiter, limits, mode, tokens).await {
        Decision::Admitted { reservation, .. } => {
            limiter.settle(reservation, tokens).await;
            Ok(())
        }
        Decision::Refused(refusal) => Err(refusal),
    }
}

/// SPEC §1.3 worked example, CASCADING: O TOKEN/MINUTE 100, children F and E 70.
async fn worked_example_cascading_siblings_share_the_parents_pool(backend: Backend) {
    let o = group("O", Cascading, None, &[(TOKEN, MINUTE, 100)]);
    let f = group("F", Cascading, Some(&o), &[(TOKEN, MINUTE, 70)]);
    let e = group("E", Cascading, Some(&o), &[(TOKEN, MINUTE, 70)]);
    let (limiter, clock) = backend.at(Timestamp(DAY0 + 5_000)).await;
    let f_limits = limits(&[&f, &o]);
    let e_limits = limits(&[&e, &o]);

    for _ in 0..7 {
        call(&limiter, &f_limits, Cascading, 10).await.unwrap();
        clock.advance_millis(100);
    }
    let refusal = call(&limiter, &f_limits, Cascading, 10).await.unwrap_err();
    assert_eq!(refusal.limit.source_group, "F");
    assert_eq!(usage(&limiter, "F", TOKEN, MINUTE).await, 70);
    assert_eq!(usage(&limiter, "O", TOKEN, MINUTE).await, 70);

    let mut e_admitted = 0;
    let refusal = loop {
        match call(&limiter, &e_limits, Cascading, 10).await {
            Ok(()) => e_admitted += 1,
            Err(refusal) => break refusal,
        }
        clock.advance_millis(100);
    };
    assert_eq!(e_admitted, 3);
    assert_eq!(refusal.limit.source_group, "O");
    assert_eq!(refusal.limit.counter_group, "O");
    assert_eq!(refusal.limit.threshold, 100);
    assert_eq!(usage(&limiter, "E", TOKEN, MINUTE).await, 30);
    assert_eq!(usage(&limiter, "O", TOKEN, MINUTE).await, 100);
    // The refusal named O although E's own counter shows 30/70.
    assert_eq!(
        refusal.headers.tokens,
        Some(HeaderLimit {
            limit: 100,
            remaining: 0,
            // O's slot [0 s, 6 s) counts until 60 s after E's last debit at 5.9 s.
            reset_ms: 59_900,
        })
    );
}

/// The same tree in INDEPENDENT mode: F and E get 70 each, O's keys 100 of their own.
async fn worked_example_independent_counts_each_group_on_its_own(backend: Backend) {
    let o = group("O", Independent, None, &[(TOKEN, MINUTE, 100)]);
    let f = group("F", Independent, Some(&o), &[(TOKEN, MINUTE, 70)]);
    let e = group("E", Independent, Some(&o), &[(TOKEN, MINUTE, 70)]);
    let (limiter, _clock) = backend.at(Timestamp(DAY0 + 5_000)).await;
    for (chain, expected) in [(vec![&f, &o], 7), (vec![&e, &o], 7), (vec![&o], 10)] {
        let gating = limits(&chain);
        let mut admitted = 0;
        let refusal = loop {
            match call(&limiter, &gating, Independent, 10).await {
                Ok(()) => admitted += 1,
                Err(refusal) => break refusal,
            }
        };
        assert_eq!(admitted, expected, "{}", chain[0].id);
        assert_eq!(refusal.limit.counter_group, chain[0].id);
    }
    assert_eq!(usage(&limiter, "F", TOKEN, MINUTE).await, 70);
    assert_eq!(usage(&limiter, "E", TOKEN, MINUTE).await, 70);
    assert_eq!(usage(&limiter, "O", TOKEN, MINUTE).await, 100);
}

/// C07: O TOKEN/DAY 100 › A › B › C › D, 30-token calls, from D, from A and from O.
async fn c07_an_ancestors_day_limit_holds_at_every_depth(backend: Backend) {
    let o = group("O", Cascading, None, &[(TOKEN, DAY, 100)]);
    let a = group("A", Cascading, Some(&o), &[]);
    let b = group("B", Cascading, Some(&a), &[]);
    let c = group("C", Cascading, Some(&b), &[]);
    let d = group("D", Cascading, Some(&c), &[]);
    assert_eq!(d.depth, 5);
    for chain in [vec![&d, &c, &b, &a, &o], vec![&a, &o], vec![&o]] {
        let (limiter, _clock) = backend.at(utc("2026-12-03T12:00:00Z")).await;
        let gating = limits(&chain);
        let mut before = Vec::new();
        let refusal = loop {
            before.push(usage(&limiter, "O", TOKEN, DAY).await);
            // Estimated at 8 (prompt bytes / 4), settled at usage(10, 20).
            match admit(&limiter, &gating, Cascading, 8).await {
                Decision::Admitted { reservation, .. } => limiter.settle(reservation, 30).await,
                Decision::Refused(refusal) => break refusal,
            }
        };
        assert_eq!(before, [0, 30, 60, 90, 120], "from {}", chain[0].id);
        assert_eq!(refusal.limit.source_group, "O");
        assert_eq!(refusal.limit.counter_group, "O");
        assert_eq!(usage(&limiter, "O", TOKEN, DAY).await, 120);
        // 12:00 UTC → next midnight.
        assert_eq!(refusal.retry_after_secs, 12 * 3_600);
    }
}

/// C09: a threshold of 0 blocks from the first request, with a sane Retry-After and
/// headers; no limit at all is unlimited.
async fn c09_threshold_zero_blocks_and_no_limit_is_unlimited(backend: Backend) {
    let (limiter, _clock) = backend.at(utc("2026-12-03T22:00:00Z")).await;
    let zero = group("Z", Independent, None, &[(REQUEST, MINUTE, 0)]);
    let refusal = refused(admit(&limiter, &limits(&[&zero]), Independent, 5).await);
    assert_eq!(refusal.retry_after_secs, 60);
    assert_eq!(
        refusal.headers,
        RateHeaders {
            requests: Some(HeaderLimit {
                limit: 0,
                remaining: 0,
                reset_ms: 0,
            }),
            tokens: None,
        }
    );
    assert_eq!(usage(&limiter, "Z", REQUEST, MINUTE).await, 0);

    let zero_day = group("ZD", Independent, None, &[(TOKEN, DAY, 0)]);
    let refusal = refused(admit(&limiter, &limits(&[&zero_day]), Independent, 0).await);
    assert_eq!(refusal.retry_after_secs, 7_200);

    let zero_second = group("ZS", Independent, None, &[(TOKEN, SECOND, 0)]);
    let refusal = refused(admit(&limiter, &limits(&[&zero_second]), Independent, 0).await);
    assert_eq!(refusal.retry_after_secs, 1);

    let free = group("F", Independent, None, &[]);
    let free_limits = limits(&[&free]);
    assert!(free_limits.is_empty());
    for _ in 0..1_000 {
        match admit(&limiter, &free_limits, Independent, 1_000_000).await {
            Decision::Admitted {
                reservation,
                headers,
            } => {
                assert_eq!(headers, RateHeaders::default());
                assert_eq!(reservation.estimated_tokens(), 1_000_000);
                limiter.settle(reservation, 5_000_000).await;
            }
            Decision::Refused(_) => panic!("refused without a limit"),
        }
    }
}

/// C10: REQUEST/MINUTE 60, one request every 500 ms for 60 s, starting 30 s into a minute.
async fn c10_rolling_minute_through_the_limiter(backend: Backend) {
    let o = group("O", Independent, None, &[(REQUEST, MINUTE, 60)]);
    let gating = limits(&[&o]);
    let (limiter, clock) = backend.at(Timestamp(DAY0 + 30_000)).await;
    let mut log = Vec::new();
    for i in 0..120 {
        clock.set(Timestamp(DAY0 + 30_000 + i * 500));
        if let Some(reservation) = admitted(admit(&limiter, &gating, Independent, 0).await) {
            limiter.settle(reservation, 0).await;
            log.push(i * 500);
        }
    }
    assert_eq!(log.len(), 60);
    let most_in_a_minute = log
        .iter()
        .enumerate()
        .map(|(i, start)| log[i..].iter().take_while(|t| **t < start + 60_000).count())
        .max()
        .unwrap();
    assert_eq!(most_in_a_minute, 60);
}

/// C11: TOKEN/DAY 100 and 30-token calls at 23:50 UTC; the next day starts at the first
/// call after midnight. The server's time zone plays no part: time is UTC milliseconds.
async fn c11_the_day_is_a_utc_day(backend: Backend) {
    let a = group("A", Independent, None, &[(TOKEN, DAY, 100)]);
    let gating = limits(&[&a]);
    let (limiter, clock) = backend.at(utc("2026-12-03T23:50:00Z")).await;
    for _ in 0..4 {
        let reservation = admitted(admit(&limiter, &gating, Independent, 8).await).unwrap();
        limiter.settle(reservation, 30).await;
    }
    let refusal = refused(admit(&limiter, &gating, Independent, 8).await);
    assert_eq!(refusal.retry_after_secs, 600);
    assert_eq!(usage(&limiter, "A", TOKEN, DAY).await, 120);

    clock.set(utc("2026-12-04T00:00:05Z"));
    assert_eq!(limiter.current_usage(&key("A", TOKEN, DAY)).await, None);
    let reservation = admitted(admit(&limiter, &gating, Independent, 8).await).unwrap();
    limiter.settle(reservation, 30).await;
    assert_eq!(usage(&limiter, "A", TOKEN, DAY).await, 30);
}

/// C13: REQUEST/MINUTE 2: the third request gets a Retry-After in 1..=60 and a retry
/// after exactly that long is admitted; a DAY limit hit at 22:00 UTC says 7200.
async fn c13_retry_after_is_whole_seconds_and_enough(backend: Backend) {
    let o = group("O", Independent, None, &[(REQUEST, MINUTE, 2)]);
    let gating = limits(&[&o]);
    let (limiter, clock) = backend.at(utc("2026-12-03T17:53:24.123Z")).await;
    for _ in 0..2 {
        let _ = admitted(admit(&limiter, &gating, Independent, 0).await).unwrap();
        clock.advance_millis(100);
    }
    let refusal = refused(admit(&limiter, &gating, Independent, 0).await);
    assert_eq!(refusal.retry_after_secs, 60);
    assert!((1..=60).contains(&refusal.retry_after_secs));
    let refused_at = clock.now();
    // Both admissions share a slot whose latest debit was 100 ms before the refusal.
    clock.advance_millis(59_899);
    assert!(admitted(admit(&limiter, &gating, Independent, 0).await).is_none());
    clock.set(Timestamp(
        refused_at.0 + refusal.retry_after_secs as i64 * 1_000,
    ));
    assert!(admitted(admit(&limiter, &gating, Independent, 0).await).is_some());

    let day = group("D", Independent, None, &[(REQUEST, DAY, 1)]);
    let gating = limits(&[&day]);
    let (limiter, _clock) = backend.at(utc("2026-12-03T22:00:00Z")).await;
    let _ = admitted(admit(&limiter, &gating, Independent, 0).await).unwrap();
    assert_eq!(
        refused(admit(&limiter, &gating, Independent, 0).await).retry_after_secs,
        7_200
    );
}

/// C14: REQUEST/SECOND 1 + REQUEST/MINUTE 3; a refusal by one counter debits no other.
async fn c14_a_refused_request_consumes_nothing(backend: Backend) {
    let o = group(
        "O",
        Independent,
        None,
        &[(REQUEST, SECOND, 1), (REQUEST, MINUTE, 3)],
    );
    let gating = limits(&[&o]);
    let (limiter, clock) = backend.at(Timestamp(DAY0)).await;
    let mut outcomes = Vec::new();
    for at in [0, 100, 1_200, 2_400] {
        clock.set(Timestamp(DAY0 + at));
        match admit(&limiter, &gating, Independent, 0).await {
            Decision::Admitted { .. } => outcomes.push("200"),
            Decision::Refused(refusal) => {
                assert_eq!(refusal.limit.unit, SECOND);
                assert_eq!(refusal.retry_after_secs, 1);
                outcomes.push("429");
            }
        }
    }
    assert_eq!(outcomes, ["200", "429", "200", "200"]);
    assert_eq!(usage(&limiter, "O", REQUEST, MINUTE).await, 3);
}

/// C14 across a CASCADING chain: the parent's pool refuses, the child's counters stay.
async fn c14_a_parent_refusal_leaves_the_childs_counters_untouched(backend: Backend) {
    let o = group(
        "O",
        Cascading,
        None,
        &[(REQUEST, MINUTE, 2), (TOKEN, DAY, 1_000)],
    );
    let a = group(
        "A",
        Cascading,
        Some(&o),
        &[(REQUEST, MINUTE, 2), (TOKEN, MINUTE, 500)],
    );
    let b = group("B", Cascading, Some(&o), &[(REQUEST, MINUTE, 2)]);
    let (limiter, _clock) = backend.at(utc("2026-12-03T12:00:00Z")).await;
    for _ in 0..2 {
        let r = admitted(admit(&limiter, &limits(&[&b, &o]), Cascading, 40).await).unwrap();
        limiter.settle(r, 40).await;
    }
    let refusal = refused(admit(&limiter, &limits(&[&a, &o]), Cascading, 40).await);
    assert_eq!(refusal.limit.source_group, "O");
    assert_eq!(refusal.limit.kind, REQUEST);
    assert_eq!(usage(&limiter, "A", REQUEST, MINUTE).await, 0);
    assert_eq!(usage(&limiter, "A", TOKEN, MINUTE).await, 0);
    assert_eq!(usage(&limiter, "O", REQUEST, MINUTE).await, 2);
    assert_eq!(usage(&limiter, "O", TOKEN, DAY).await, 80);
}

/// The refusal names the first exhausted limit in resolution order; Retry-After waits for
/// every exhausted one.
async fn refusal_names_the_first_exhausted_and_waits_for_all(backend: Backend) {
    let o = group(
        "O",
        Cascading,
        None,
        &[(REQUEST, MINUTE, 1), (REQUEST, DAY, 1)],
    );
    let a = group("A", Cascading, Some(&o), &[(REQUEST, SECOND, 1)]);
    let (limiter, clock) = backend.at(utc("2026-12-03T23:00:00Z")).await;
    let gating = limits(&[&a, &o]);
    assert_eq!(gating[0].source_group, "A");
    let _ = admitted(admit(&limiter, &gating, Cascading, 0).await).unwrap();
    clock.advance_millis(500);
    let refusal = refused(admit(&limiter, &gating, Cascading, 0).await);
    assert_eq!(refusal.limit.source_group, "A");
    assert_eq!(refusal.limit.unit, SECOND);
    // The DAY limit is exhausted too: 59 min 59.5 s to midnight, rounded up.
    assert_eq!(refusal.retry_after_secs, 3_600);
    clock.advance_millis(1_000);
    let refusal = refused(admit(&limiter, &gating, Cascading, 0).await);
    assert_eq!(refusal.limit.source_group, "O");
    assert_eq!(refusal.limit.unit, MINUTE);
}

/// Headers: per type the limit with the least remaining after this request (ties: the
/// smaller threshold), never negative.
async fn headers_describe_the_tightest_limit_of_each_type(backend: Backend) {
    let o = group(
        "O",
        Cascading,
        None,
        &[
            (REQUEST, MINUTE, 10),
            (TOKEN, MINUTE, 1_000),
            (TOKEN, DAY, 150),
        ],
    );
    let a = group(
        "A",
        Cascading,
        Some(&o),
        &[
            (REQUEST, SECOND, 5),
            (REQUEST, DAY, 10),
            (TOKEN, MINUTE, 500),
        ],
    );
    let (limiter, clock) = backend.at(utc("2026-12-03T23:59:00Z")).await;
    let gating = limits(&[&a, &o]);
    let Decision::Admitted {
        reservation,
        headers,
    } = admit(&limiter, &gating, Cascading, 100).await
    else {
        panic!("refused");
    };
    // Requests: SECOND 5 → 4 left; DAY 10 and MINUTE 10 → 9 left. Tokens: DAY 150 → 50,
    // MINUTE 500 → 400, MINUTE 1000 → 900.
    assert_eq!(
        headers,
        RateHeaders {
            requests: Some(HeaderLimit {
                limit: 5,
                remaining: 4,
                reset_ms: 1_000,
            }),
            tokens: Some(HeaderLimit {
                limit: 150,
                remaining: 50,
                reset_ms: 60_000,
            }),
        }
    );
    limiter.settle(reservation, 400).await;
    clock.advance_millis(1_000);
    let refusal = refused(admit(&limiter, &gating, Cascading, 100).await);
    assert_eq!(refusal.limit.kind, TOKEN);
    assert_eq!(refusal.limit.unit, DAY);
    assert_eq!(refusal.retry_after_secs, 59);
    assert_eq!(
        refusal.headers.tokens,
        Some(HeaderLimit {
            limit: 150,
            remaining: 0,
            reset_ms: 59_000,
        })
    );
    // The SECOND window is empty again: all 5 left, nothing to reset.
    assert_eq!(
        refusal.headers.requests,
        Some(HeaderLimit {
            limit: 5,
            remaining: 5,
            reset_ms: 0,
        })
    );
}

/// Equal remaining: the smaller threshold is the tighter limit, whatever the order.
async fn headers_break_ties_on_the_smaller_threshold(backend: Backend) {
    let o = group("O", Cascading, None, &[(REQUEST, MINUTE, 10)]);
    let a = group("A", Cascading, Some(&o), &[(REQUEST, DAY, 12)]);
    let (limiter, clock) = backend.at(utc("2026-12-03T12:00:00Z")).await;
    let gating = limits(&[&a, &o]);
    assert_eq!(gating[0].threshold, 12);
    for _ in 0..2 {
        let _ = admitted(admit(&limiter, &gating, Cascading, 0).await).unwrap();
    }
    clock.advance_millis(61_000);
    let Decision::Admitted { headers, .. } = admit(&limiter, &gating, Cascading, 0).await else {
        panic!("refused");
    };
    // MINUTE 10 holds 1 (9 left), DAY 12 holds 3 (9 left).
    assert_eq!(
        headers.requests,
        Some(HeaderLimit {
            limit: 10,
            remaining: 9,
            reset_ms: 60_000,
        })
    );
}

async fn limits_are_per_slug(backend: Backend) {
    let o = group("O", Independent, None, &[(REQUEST, MINUTE, 1)]);
    let gating = limits(&[&o]);
    let (limiter, _clock) = backend.at(Timestamp(DAY0)).await;
    let _ = admitted(admit(&limiter, &gating, Independent, 0).await).unwrap();
    assert!(admitted(admit(&limiter, &gating, Independent, 0).await).is_none());
    let other = request(&limiter, &gating, "acme/other", Independent, 0);
    assert!(admitted(limiter.admit(other).await.unwrap()).is_some());
}

crate::conformance! {
    #[tokio::test] worked_example_cascading_siblings_share_the_parents_pool,
    #[tokio::test] worked_example_independent_counts_each_group_on_its_own,
    #[tokio::test] c07_an_ancestors_day_limit_holds_at_every_depth,
    #[tokio::test] c09_threshold_zero_blocks_and_no_limit_is_unlimited,
    #[tokio::test] c10_rolling_minute_through_the_limiter,
    #[tokio::test] c11_the_day_is_a_utc_day,
    #[tokio::test] c13_retry_after_is_whole_seconds_and_enough,
    #[tokio::test] c14_a_refused_request_consumes_nothing,
    #[tokio::test] c14_a_parent_refusal_leaves_the_childs_counters_untouched,
    #[tokio::test] refusal_names_the_first_exhausted_and_waits_for_all,
    #[tokio::test] headers_describe_the_tightest_limit_of_each_type,
    #[tokio::test] headers_break_ties_on_the_smaller_threshold,
    #[tokio::test] limits_are_per_slug,
}
