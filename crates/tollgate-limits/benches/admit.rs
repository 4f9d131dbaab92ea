//! Cost of one admit + settle on the in-process limiter for a request gated by a
//! 5-level CASCADING chain with 4 limits per level (REQUEST/SECOND, TOKEN/MINUTE,
//! REQUEST/DAY, TOKEN/DAY: 20 counters), and how it scales to 2 threads on different
//! groups. Results and the command: `docs/BENCHMARKS.md`.

#![allow(clippy::panic, reason = "benchmark harness")]

use std::future::Future;
use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tollgate_core::clock::SystemClock;
use tollgate_core::hierarchy::{limits_for_slug, EffectiveLimit};
use tollgate_core::limits::MAX_THRESHOLD;
use tollgate_core::{
    Group, LimitMode, LimitType, LimitUnit, ModelAccess, RateLimit, Timestamp, UsageLimit,
};
use tollgate_limits::{AdmitRequest, Decision, InProcessLimiter, Limiter, NoStoredUsage};

const SLUG: &str = "acme/llama-70b";

/// The in-process limiter never waits once a day's baseline is loaded (and
/// `NoStoredUsage` never waits at all): one poll finishes the call. Polling directly
/// measures the limiter, not an executor.
fn ready<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("the in-process limiter waited"),
    }
}

/// `[level 5, ..., root]` of a CASCADING tree rooted at `root`, each level declaring the
/// four limits on `SLUG`; returns the limits gating the deepest group.
fn chain_limits(root: &str) -> Vec<EffectiveLimit> {
    let model = ModelAccess {
        slug: SLUG.into(),
        rate_limits: vec![
            RateLimit {
                kind: LimitType::Request,
                unit: LimitUnit::Second,
                threshold: MAX_THRESHOLD,
            },
            RateLimit {
                kind: LimitType::Token,
                unit: LimitUnit::Minute,
                threshold: MAX_THRESHOLD,
            },
        ],
        usage_limits: vec![
            UsageLimit {
                kind: LimitType::Request,
                unit: LimitUnit::Day,
                threshold: MAX_THRESHOLD,
            },
            UsageLimit {
                kind: LimitType::Token,
                unit: LimitUnit::Day,
                threshold: MAX_THRESHOLD,
            },
        ],
    };
    let chain: Vec<Group> = (1..=5u32)
        .rev()
        .map(|depth| Group {
            id: format!("grp_{root}_level{depth}"),
            workspace_id: "ws_bench".into(),
            name: None,
            external_entity_id: format!("{root}-{depth}"),
            models: vec![model.clone()],
            mode: LimitMode::Cascading,
            parent_id: (depth > 1).then(|| format!("grp_{root}_level{}", depth - 1)),
            depth,
            created_at: Timestamp(0),
        })
        .collect();
    let limits = limits_for_slug(&chain, SLUG).unwrap_or_default();
    assert_eq!(limits.len(), 20);
    limits
}

fn admit_and_settle(limiter: &InProcessLimiter, limits: &[EffectiveLimit]) {
    let decision = ready(limiter.admit(AdmitRequest {
        limits,
        slug: SLUG,
        tree_root: &limits[limits.len() - 1].counter_group,
        mode: LimitMode::Cascading,
        estimated_tokens: 25,
    }));
    match decision {
        Ok(Decision::Admitted { reservation, .. }) => {
            ready(limiter.settle(reservation, black_box(120)));
        }
        _ => panic!("refused"),
    }
}

fn limiter() -> Arc<InProcessLimiter> {
    Arc::new(InProcessLimiter::new(
        Arc::new(SystemClock),
        Arc::new(NoStoredUsage),
    ))
}

fn admit_settle(c: &mut Criterion) {
    let limiter = limiter();
    let limits = chain_limits("a");
    c.bench_function("limiter/admit_settle_cascading_5x4", |b| {
        b.iter(|| admit_and_settle(&limiter, black_box(&limits)));
    });
}

/// What one run of several threads took.
struct Run {
    /// From their common start to the last one's end.
    wall: Duration,
    /// CPU time of all threads together.
    cpu: Duration,
}

/// `chains.len()` threads, each on its own tree, each doing `iters` admit + settle.
fn run_threads(limiter: &Arc<InProcessLimiter>, chains: &[Vec<EffectiveLimit>], iters: u64) -> Run {
    let barrier = Barrier::new(chains.len() + 1);
    let (start, cpu) = std::thread::scope(|scope| {
        let workers: Vec<_> = chains
            .iter()
            .map(|limits| {
                let (limiter, barrier) = (limiter.clone(), &barrier);
                scope.spawn(move || {
                    barrier.wait();
                    let cpu = cpu_time::ThreadTime::now();
                    for _ in 0..iters {
                        admit_and_settle(&limiter, limits);
                    }
                    cpu.elapsed()
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let cpu: Duration = workers
            .into_iter()
            .map(|worker| worker.join().unwrap_or_default())
            .sum();
        (start, cpu)
    });
    Run {
        wall: start.elapsed(),
        cpu,
    }
}

/// Two measures of 1 thread against 2 threads on different trees. `throughput`: wall
/// time, so admissions per second of all threads together (2× is perfect scaling, but a
/// shared, busy 2-core machine caps it). `cpu_per_op`: CPU time per admit + settle,
/// averaged over the threads — it grows only if the threads slow each other down
/// (shared locks or cache lines), whatever else runs on the machine.
fn scaling(c: &mut Criterion) {
    let limiter = limiter();
    let chains = [chain_limits("t0"), chain_limits("t1")];
    for measure in ["throughput", "cpu_per_op"] {
        let mut group = c.benchmark_group(format!("limiter/scaling/{measure}"));
        for threads in [1usize, 2] {
            let name = if threads == 1 {
                "1_thread".to_owned()
            } else {
                format!("{threads}_threads_different_groups")
            };
            if measure == "throughput" {
                group.throughput(Throughput::Elements(threads as u64));
            }
            group.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    let run = run_threads(&limiter, &chains[..threads], iters);
                    match measure {
                        "throughput" => run.wall,
                        _ => run.cpu / threads as u32,
                    }
                });
            });
        }
        group.finish();
    }
}

criterion_group!(benches, admit_settle, scaling);
criterion_main!(benches);
