//! Back-end faults under load (SPEC §4): two `tollgate serve` processes on back-ends the
//! test owns (`RedisServer`, `PostgresServer` from the testkit, on free ports), one of
//! which is stopped like a crash while requests keep coming, then started again.
//!
//! Switched on like the other PostgreSQL suites, by `TOLLGATE_TEST_POSTGRES_URL`: unset,
//! each test prints a skip line and returns.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tollgate_testkit::{MockUpstream, PostgresServer, RedisServer};

use crate::multi_instance::{on_m, Instance, Shared, ADMIN_KEY};

/// How long a log line or a switch back may take to show.
const WAIT: Duration = Duration::from_secs(15);
/// Limits while Redis is down are each instance's share: threshold / 2.
const TWO_INSTANCES: [(&str, &str); 1] = [("TOLLGATE_EXPECTED_INSTANCES", "2")];

/// The PostgreSQL URL of the suite, or `None` after printing the skip line.
fn postgres_url(test: &str) -> Option<String> {
    match std::env::var("TOLLGATE_TEST_POSTGRES_URL") {
        Ok(url) => Some(url),
        Err(_) => {
            println!("skipped {test}: set TOLLGATE_TEST_POSTGRES_URL");
            None
        }
    }
}

/// The body of `GET /metrics`.
async fn scrape(instance: &Instance) -> String {
    let answer = instance
        .http
        .get(instance.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    answer.text().await.unwrap()
}

/// The line of `metric` (name and value), e.g. `tollgate_limiter_shared 1`.
async fn metric(instance: &Instance, metric: &str) -> String {
    let text = scrape(instance).await;
    text.lines()
        .find(|line| line.split(' ').next() == Some(metric))
        .unwrap_or_else(|| panic!("no {metric} in:\n{text}"))
        .to_owned()
}

/// `GET /readyz` (always 200 while the process serves) once its status is `status`, or
/// its last answer after [`WAIT`].
async fn readiness_when(instance: &Instance, status: &str) -> Value {
    let started = Instant::now();
    loop {
        let answer = instance
            .http
            .get(instance.url("/readyz"))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        let body: Value = answer.json().await.unwrap();
        if body["status"] == status || started.elapsed() > WAIT {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One answer of the load: its status and `x-request-id`.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    request_id: String,
}

/// One chat call through `instance`.
async fn call(instance: &Instance, key: &str) -> Answer {
    let answer = instance.chat_response(key).await;
    let status = answer.status().as_u16();
    let request_id = answer
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    answer.bytes().await.unwrap();
    Answer { status, request_id }
}

/// Requests that keep coming, `clients` at a time, spread over the instances, each
/// answer filed under the phase current when it was asked.
struct Load {
    phase: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<Vec<Vec<Answer>>>>,
}

impl Load {
    fn start(instances: Arc<Vec<Instance>>, key: &str, clients: usize, phases: usize) -> Load {
        let phase = Arc::new(AtomicUsize::new(0));
        let tasks = (0..clients)
            .map(|client| {
                let (instances, key, current) = (instances.clone(), key.to_owned(), phase.clone());
                tokio::spawn(async move {
                    let mut answers = vec![Vec::new(); phases];
                    for n in client.. {
                        let at = current.load(Ordering::Acquire);
                        if at >= phases {
                            break;
                        }
                        let instance = &instances[n % instances.len()];
                        answers[at].push(call(instance, &key).await);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    answers
                })
            })
            .collect();
        Load { phase, tasks }
    }

    /// Files later answers under the next phase.
    fn next_phase(&self) {
        self.phase.fetch_add(1, Ordering::AcqRel);
    }

    /// Ends the load after the last phase; every client's answers, by phase.
    async fn finish(self) -> Vec<Vec<Answer>> {
        self.phase.store(usize::MAX, Ordering::Release);
        let mut phases: Vec<Vec<Answer>> = Vec::new();
        for task in self.tasks {
            for (at, answers) in task.await.unwrap().into_iter().enumerate() {
                if phases.len() <= at {
                    phases.resize(at + 1, Vec::new());
                }
                phases[at].extend(answers);
            }
        }
        phases
    }
}

/// Asserts every phase had answers, all 200; prints how many.
fn assert_all_served(test: &str, names: &[&str], phases: &[Vec<Answer>]) {
    println!(
        "{test}: the load got {:?} answers ({})",
        phases.iter().map(Vec::len).collect::<Vec<_>>(),
        names.join(" / ")
    );
    assert_eq!(phases.len(), names.len());
    for (name, answers) in names.iter().zip(phases) {
        assert!(!answers.is_empty(), "no load {name}");
        let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
        assert!(statuses.iter().all(|s| *s == 200), "{name}: {statuses:?}");
    }
}

/// Redis crashes while two instances serve: every request is still answered 200, each
/// instance logs the switch once and reports `tollgate_limiter_shared 0`, and a limit of
/// 10 a minute admits 5 on each (its share); Redis back, both switch back by themselves
/// and a limit is counted across them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_under_load_serves_with_per_instance_limits_then_shares_again() {
    let test = "redis_stopped_under_load_serves_with_per_instance_limits_then_shares_again";
    let Some(postgres) = postgres_url(test) else {
        return;
    };
    let mut redis = RedisServer::start().await.unwrap();
    let shared = Shared::create_on(&postgres, redis.url()).await;
    // One after the other: the first start creates the tables and the default workspace.
    let one = Instance::start_with(&shared, &TWO_INSTANCES).await;
    let two = Instance::start_with(&shared, &TWO_INSTANCES).await;
    let mock = MockUpstream::start().await.unwrap();
    one.create_endpoint(&mock, "echo?prompt_tokens=5&completion_tokens=5")
        .await;
    // The load's limit is far away, but its admissions go through Redis all the same.
    let (_load_group, load_key) = one
        .member("load", None, on_m(&[("REQUEST", "MINUTE", 1_000_000)]))
        .await;
    let (_g, key_down) = one
        .member("down", None, on_m(&[("REQUEST", "MINUTE", 10)]))
        .await;
    let (_h, key_back) = one
        .member("back", None, on_m(&[("REQUEST", "MINUTE", 4)]))
        .await;
    for instance in [&one, &two] {
        assert_eq!(
            metric(instance, "tollgate_limiter_shared").await,
            "tollgate_limiter_shared 1"
        );
    }
    let instances = Arc::new(vec![one, two]);
    let load = Load::start(instances.clone(), &load_key, 1, 3);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Down: the load's next admission on each instance fails and switches it.
    load.next_phase();
    redis.stop().await.unwrap();
    for instance in instances.iter() {
        let line = instance
            .wait_for_log("shared limiter unreachable", WAIT)
            .await;
        assert!(
            line.is_some_and(|l| l.contains("ERROR")),
            "{}",
            instance.stderr_text()
        );
        assert_eq!(
            metric(instance, "tollgate_limiter_shared").await,
            "tollgate_limiter_shared 0"
        );
        assert_eq!(
            metric(instance, "tollgate_limiter_fallback_switches_total").await,
            "tollgate_limiter_fallback_switches_total 1"
        );
        assert_eq!(
            readiness_when(instance, "degraded").await,
            json!({"status": "degraded", "database": "up", "redis": "unavailable"})
        );
    }
    // Each instance admits its share of 10 a minute, alone.
    for instance in instances.iter() {
        let mut statuses = Vec::new();
        for _ in 0..7 {
            statuses.push(instance.chat(&key_down).await.0);
        }
        assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429]);
    }
    // More load while down, before the way back.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Back: the probe finds Redis within a second and both count there again.
    load.next_phase();
    redis.start_again().await.unwrap();
    for instance in instances.iter() {
        let line = instance
            .wait_for_log("shared limiter reachable again", WAIT)
            .await;
        assert!(line.is_some(), "{}", instance.stderr_text());
        assert_eq!(
            metric(instance, "tollgate_limiter_shared").await,
            "tollgate_limiter_shared 1"
        );
        assert_eq!(
            readiness_when(instance, "ready").await,
            json!({"status": "ready", "database": "up", "redis": "up"})
        );
        // The switch down was logged once, however many requests failed on it.
        let downs = instance
            .stderr_text()
            .matches("shared limiter unreachable")
            .count();
        assert_eq!(downs, 1);
    }
    let mut statuses = Vec::new();
    for n in 0..6 {
        statuses.push(instances[n % 2].chat(&key_back).await.0);
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 200, 429, 429],
        "4 a minute, shared"
    );

    let phases = load.finish().await;
    assert_all_served(
        "redis fault",
        &["before", "while Redis was down", "after"],
        &phases,
    );
    drop(instances);
    shared.drop_schema().await;
}

/// Where each instance spools usage events while the database is down.
const SPOOL_DIR_ENV: &str = "TOLLGATE_SPOOL_DIR";

/// PostgreSQL crashes while two instances serve a key both have used: every request is
/// still answered 200 (configuration from memory, usage events spooled to local files)
/// and the management API answers 503 with Retry-After; PostgreSQL back, every served
/// request's usage event is in the database, once, within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_under_load_serves_from_memory_and_stores_every_event_after() {
    let test = "postgres_stopped_under_load_serves_from_memory_and_stores_every_event_after";
    if postgres_url(test).is_none() {
        return;
    }
    let mut postgres = PostgresServer::start().await.unwrap();
    let redis = RedisServer::start().await.unwrap();
    let shared = Shared::create_on(&postgres.url(), redis.url()).await;
    // One directory for both: each instance spools under its own name in it.
    let spool = tempfile::tempdir().unwrap();
    let spool_dir = spool.path().display().to_string();
    let env = [(SPOOL_DIR_ENV, spool_dir.as_str())];
    let one = Instance::start_with(&shared, &env).await;
    let two = Instance::start_with(&shared, &env).await;
    let mock = MockUpstream::start().await.unwrap();
    one.create_endpoint(&mock, "echo?prompt_tokens=5&completion_tokens=5")
        .await;
    let (_group, key) = one.member("spooled", None, on_m(&[])).await;
    let mut served = Vec::new();
    for instance in [&one, &two] {
        let answer = call(instance, &key).await;
        assert_eq!(answer.status, 200);
        served.push(answer.request_id);
    }
    let instances = Arc::new(vec![one, two]);
    let load = Load::start(instances.clone(), &key, 4, 3);
    tokio::time::sleep(Duration::from_millis(300)).await;

    load.next_phase();
    postgres.stop().await.unwrap();
    for instance in instances.iter() {
        let answer = instance
            .http
            .post(instance.url("/v1/gateway/groups"))
            .header("Authorization", format!("Api-Key {ADMIN_KEY}"))
            .json(
                &json!({"metadata": {"external_entity_id": "late", "name": "late"},
                "models": [], "hierarchy": {"limit_enforcement": "INDEPENDENT",
                "parent_group_id": null}}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 503);
        assert_eq!(answer.headers()["retry-after"], "5");
        let body: Value = answer.json().await.unwrap();
        assert_eq!(body["code"], "database_unavailable", "{body}");
    }
    // Load on the way down and through a few seconds without the database; meanwhile
    // each instance says it serves without it, and stays in the load balancer.
    let down = Instant::now();
    for instance in instances.iter() {
        assert_eq!(
            readiness_when(instance, "degraded").await,
            json!({"status": "degraded", "database": "unavailable", "redis": "up"})
        );
        assert_eq!(
            metric(instance, "tollgate_database_up").await,
            "tollgate_database_up 0"
        );
    }
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(down.elapsed())).await;

    load.next_phase();
    postgres.start_again().await.unwrap();
    let back = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let phases = load.finish().await;
    assert_all_served(
        "postgres fault",
        &["before", "while PostgreSQL was down", "after"],
        &phases,
    );
    served.extend(phases.iter().flatten().map(|a| a.request_id.clone()));

    // Every event in the database within seconds of the start, and once.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&shared.database_url)
        .await
        .unwrap();
    let stored_ids = || async {
        let mut ids: Vec<String> = sqlx::query_scalar("SELECT request_id FROM usage_events")
            .fetch_all(&pool)
            .await
            .unwrap();
        ids.sort();
        ids
    };
    let mut stored = stored_ids().await;
    while stored.len() < served.len() && back.elapsed() < WAIT {
        tokio::time::sleep(Duration::from_millis(100)).await;
        stored = stored_ids().await;
    }
    println!(
        "postgres fault: {} events stored {:?} after PostgreSQL was back",
        stored.len(),
        back.elapsed()
    );
    for instance in instances.iter() {
        assert_eq!(
            readiness_when(instance, "ready").await,
            json!({"status": "ready", "database": "up", "redis": "up"})
        );
        assert_eq!(
            metric(instance, "tollgate_database_up").await,
            "tollgate_database_up 1"
        );
    }
    // Another drain round (one a second) adds nothing.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stored = stored_ids().await;
    served.sort();
    assert_eq!(stored.len(), served.len());
    assert_eq!(stored, served);
    pool.close().await;

    drop(instances);
    shared.drop_schema().await;
}
