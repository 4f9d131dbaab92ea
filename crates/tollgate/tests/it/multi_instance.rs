//! Several `tollgate serve` processes sharing one PostgreSQL database and one Redis
//! (SPEC §4; CASES C05, C06, C12, the CASCADING worked example across instances).
//!
//! Needs `TOLLGATE_TEST_POSTGRES_URL` and `TOLLGATE_TEST_REDIS_URL`: unset, each test prints
//! a skip line and returns; set but unreachable, it fails. Each test gets a fresh
//! PostgreSQL schema (the instances' URL carries `?options=-csearch_path%3D<schema>`,
//! which sqlx passes to the server) and the same name as its Redis key prefix
//! (`TOLLGATE_REDIS_KEY_PREFIX`), so tests run in parallel on one server of each.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::Executor as _;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tollgate_store::{PageRequest, PostgresStore, Store, UsageFilter};
use tollgate_testkit::MockUpstream;

use crate::support::{ok_json, status_json};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");
pub(crate) const ADMIN_KEY: &str = "tgm_multiinstance_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
/// Base64 of 32 zero bytes: the same on every instance.
const MASTER_KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
pub(crate) const M: &str = "acme/m";

/// The shared back-ends of one test: a fresh schema and a Redis key prefix.
pub(crate) struct Shared {
    /// The PostgreSQL URL confined to the schema.
    pub(crate) database_url: String,
    pub(crate) redis_url: String,
    pub(crate) schema: String,
    admin: sqlx::PgPool,
}

impl Shared {
    /// `None` (after printing why) when the back-ends are not configured.
    pub(crate) async fn create(test: &str) -> Option<Shared> {
        let (Ok(postgres), Ok(redis_url)) = (
            std::env::var("TOLLGATE_TEST_POSTGRES_URL"),
            std::env::var("TOLLGATE_TEST_REDIS_URL"),
        ) else {
            println!("skipped {test}: set TOLLGATE_TEST_POSTGRES_URL and TOLLGATE_TEST_REDIS_URL");
            return None;
        };
        Some(Shared::create_on(&postgres, redis_url).await)
    }

    /// A fresh schema on the PostgreSQL at `postgres` and a key prefix on `redis_url`.
    pub(crate) async fn create_on(postgres: &str, redis_url: String) -> Shared {
        let schema = format!("tg_multi_{:016x}", rand::random::<u64>());
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(postgres)
            .await
            .expect("TOLLGATE_TEST_POSTGRES_URL is set but PostgreSQL does not answer");
        admin
            .execute(format!("CREATE SCHEMA {schema}").as_str())
            .await
            .unwrap();
        let separator = if postgres.contains('?') { '&' } else { '?' };
        let database_url = format!("{postgres}{separator}options=-csearch_path%3D{schema}");
        Shared {
            database_url,
            redis_url,
            schema,
            admin,
        }
    }

    /// The same database as the instances see it.
    pub(crate) async fn store(&self) -> PostgresStore {
        PostgresStore::connect(&self.database_url).await.unwrap()
    }

    pub(crate) async fn drop_schema(self) {
        self.admin
            .execute(format!("DROP SCHEMA {} CASCADE", self.schema).as_str())
            .await
            .unwrap();
        self.admin.close().await;
    }
}

/// One `tollgate serve` process on `127.0.0.1:0`.
pub(crate) struct Instance {
    child: Child,
    pub(crate) addr: String,
    pub(crate) http: reqwest::Client,
    /// Every line the process wrote to stderr so far.
    stderr: watch::Receiver<Vec<String>>,
    /// The usage spool's directory, unless the test gave one: never the working directory,
    /// where a killed instance's spool would be taken over by the next test's.
    _spool: tempfile::TempDir,
}

impl Instance {
    /// Starts the binary on the shared back-ends (no inherited `TOLLGATE_*` variables)
    /// and waits for its "tollgate listening" line; fails if it exits first.
    pub(crate) async fn start(shared: &Shared) -> Instance {
        Instance::start_with(shared, &[]).await
    }

    /// [`Instance::start`] with more environment variables (`TOLLGATE_DATABASE_URL` or
    /// `TOLLGATE_REDIS_URL` among them point it elsewhere).
    pub(crate) async fn start_with(shared: &Shared, env: &[(&str, &str)]) -> Instance {
        let spool = tempfile::tempdir().unwrap();
        let mut command = Command::new(BIN);
        for (name, _) in std::env::vars() {
            if name.starts_with("TOLLGATE_") {
                command.env_remove(name);
            }
        }
        command
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "0")
            .env("TOLLGATE_DATABASE_URL", &shared.database_url)
            .env("TOLLGATE_REDIS_URL", &shared.redis_url)
            .env("TOLLGATE_REDIS_KEY_PREFIX", &shared.schema)
            .env("TOLLGATE_ADMIN_KEY", ADMIN_KEY)
            .env("TOLLGATE_MASTER_KEY", MASTER_KEY)
            .env("TOLLGATE_ALLOW_PRIVATE_NETWORKS", "true")
            .env("TOLLGATE_SPOOL_DIR", spool.path())
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let (send, mut log) = mpsc::unbounded_channel();
        let (keep, stderr) = watch::channel(Vec::new());
        // Always reading, so a full pipe never blocks the gateway.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                keep.send_modify(|kept| kept.push(line.clone()));
                let _ = send.send(line);
            }
        });
        let addr = tokio::time::timeout(Duration::from_secs(30), async {
            let mut seen = String::new();
            loop {
                let Some(line) = log.recv().await else {
                    panic!("the gateway ended before listening:\n{seen}");
                };
                if let (true, Some(at)) = (line.contains("tollgate listening"), line.find("addr="))
                {
                    let rest = &line[at + 5..];
                    return rest.split_whitespace().next().unwrap().to_owned();
                }
                seen.push_str(&line);
                seen.push('\n');
            }
        })
        .await
        .expect("the gateway never listened");
        Instance {
            child,
            addr,
            http: reqwest::Client::new(),
            stderr,
            _spool: spool,
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The process id (`None` once it was killed).
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL, and waits until the process is gone.
    pub(crate) async fn kill(&mut self) {
        self.child.kill().await.unwrap();
    }

    /// Waits (at most `within`) for a stderr line containing `text`; returns it.
    pub(crate) async fn wait_for_log(&self, text: &str, within: Duration) -> Option<String> {
        let mut stderr = self.stderr.clone();
        let found = tokio::time::timeout(
            within,
            stderr.wait_for(|lines| lines.iter().any(|l| l.contains(text))),
        )
        .await;
        match found {
            Ok(Ok(lines)) => lines.iter().find(|l| l.contains(text)).cloned(),
            _ => self
                .stderr
                .borrow()
                .iter()
                .find(|l| l.contains(text))
                .cloned(),
        }
    }

    /// Every stderr line so far, one per line.
    pub(crate) fn stderr_text(&self) -> String {
        self.stderr.borrow().join("\n")
    }

    pub(crate) async fn admin_post(&self, path: &str, body: Value) -> Value {
        let answer = self
            .http
            .post(self.url(path))
            .header("Authorization", format!("Api-Key {ADMIN_KEY}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        ok_json(answer).await
    }

    pub(crate) async fn create_endpoint(&self, mock: &MockUpstream, target_model: &str) {
        self.admin_post(
            "/v1/gateway/endpoints",
            json!({"slug": M, "targets": [{"provider": "OPENAI_COMPATIBLE",
                "base_url": mock.base_url(), "target_model": target_model, "secret_id": null}]}),
        )
        .await;
    }

    /// A group with `models` (CASCADING under `parent`) and a key of it.
    pub(crate) async fn member(
        &self,
        ext: &str,
        parent: Option<&str>,
        models: Value,
    ) -> (String, String) {
        let group = self
            .admin_post(
                "/v1/gateway/groups",
                json!({"metadata": {"external_entity_id": ext, "name": ext}, "models": models,
                       "hierarchy": {"limit_enforcement": "CASCADING", "parent_group_id": parent}}),
            )
            .await;
        let id = group["id"].as_str().unwrap().to_owned();
        let key = self
            .admin_post(
                &format!("/v1/gateway/groups/{id}/api_keys"),
                json!({"name": "k"}),
            )
            .await["api_key"]
            .as_str()
            .unwrap()
            .to_owned();
        (id, key)
    }

    /// One chat call: status and JSON body.
    pub(crate) async fn chat(&self, key: &str) -> (u16, Value) {
        status_json(self.chat_response(key).await).await
    }

    /// One chat call ([`chat_body`]) with `key`: the response, body unread.
    pub(crate) async fn chat_response(&self, key: &str) -> reqwest::Response {
        self.http
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&chat_body())
            .send()
            .await
            .unwrap()
    }
}

pub(crate) fn chat_body() -> Value {
    json!({"model": M, "messages": [{"role": "user", "content": "hello there world"}]})
}

/// Limits on [`M`], `(type, unit, threshold)`: DAY entries are usage limits.
pub(crate) fn on_m(limits: &[(&str, &str, u64)]) -> Value {
    let entry = |(kind, unit, threshold): &(&str, &str, u64)| json!({"type": kind, "unit": unit, "threshold": threshold});
    let rate: Vec<Value> = limits.iter().filter(|l| l.1 != "DAY").map(entry).collect();
    let usage: Vec<Value> = limits.iter().filter(|l| l.1 == "DAY").map(entry).collect();
    json!([{"slug": M, "rate_limits": rate, "usage_limits": usage}])
}

/// Two instances on fresh shared back-ends, endpoint [`M`] on a mock scripted by
/// `target_model`; `None` when the back-ends are not configured.
async fn two_instances(
    test: &str,
    target_model: &str,
) -> Option<(Shared, MockUpstream, Instance, Instance)> {
    let shared = Shared::create(test).await?;
    // One after the other: the first start creates the tables and the default workspace.
    let one = Instance::start(&shared).await;
    let two = Instance::start(&shared).await;
    let mock = MockUpstream::start().await.unwrap();
    one.create_endpoint(&mock, target_model).await;
    Some((shared, mock, one, two))
}

async fn events_of_group(store: &PostgresStore, group: &str) -> usize {
    let page = PageRequest {
        limit: 1000,
        after: None,
    };
    let events = store
        .list_usage_events(&UsageFilter::default(), page)
        .await
        .unwrap()
        .items;
    events.iter().filter(|e| e.group_id == group).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c05_across_instances_exactly_the_limit_is_admitted() {
    let Some((shared, _mock, one, two)) = two_instances(
        "c05_across_instances_exactly_the_limit_is_admitted",
        "echo?latency_ms=500&prompt_tokens=10&completion_tokens=5",
    )
    .await
    else {
        return;
    };
    let (group, key) = one
        .member("c05", None, on_m(&[("REQUEST", "DAY", 5)]))
        .await;
    let instances = Arc::new([one, two]);
    let barrier = Arc::new(tokio::sync::Barrier::new(20));
    let mut tasks = Vec::new();
    for n in 0..20 {
        let (barrier, instances, key) = (barrier.clone(), instances.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let instance = &instances[n % 2];
            let request = instance
                .http
                .post(instance.url("/v1/chat/completions"))
                .bearer_auth(key)
                .json(&chat_body());
            barrier.wait().await;
            request.send().await.unwrap().status().as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        15,
        "{statuses:?}"
    );
    // Events are committed before each response ends: all five are there already.
    let store = shared.store().await;
    assert_eq!(events_of_group(&store, &group).await, 5);
    store.close().await;
    drop(instances);
    shared.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c06_instances_share_rate_limits() {
    let Some((shared, _mock, one, two)) = two_instances(
        "c06_instances_share_rate_limits",
        "echo?prompt_tokens=100&completion_tokens=200",
    )
    .await
    else {
        return;
    };
    let (_o, key) = one
        .member(
            "o",
            None,
            on_m(&[("TOKEN", "MINUTE", 1000), ("REQUEST", "MINUTE", 4)]),
        )
        .await;
    let mut statuses = Vec::new();
    for n in 0..6 {
        let instance = if n % 2 == 0 { &one } else { &two };
        statuses.push(instance.chat(&key).await.0);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 429, 429]);
    drop((one, two));
    shared.drop_schema().await;
}

/// SPEC §1.3's tree on TOKEN/DAY: O 100 › F 70, E 70, 10-token calls; F's key used on
/// instance 1, E's on instance 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worked_example_cascading_with_the_siblings_on_different_instances() {
    let Some((shared, _mock, one, two)) = two_instances(
        "worked_example_cascading_with_the_siblings_on_different_instances",
        "echo?prompt_tokens=5&completion_tokens=5",
    )
    .await
    else {
        return;
    };
    let (o, _) = one.member("o", None, on_m(&[("TOKEN", "DAY", 100)])).await;
    let (f, kf) = one
        .member("f", Some(&o), on_m(&[("TOKEN", "DAY", 70)]))
        .await;
    let (_e, ke) = two
        .member("e", Some(&o), on_m(&[("TOKEN", "DAY", 70)]))
        .await;

    let admitted_until_refused = |instance: &Instance, key: String| {
        let instance_url = instance.url("/v1/chat/completions");
        let http = instance.http.clone();
        async move {
            for admitted in 0..20 {
                let answer = http
                    .post(&instance_url)
                    .bearer_auth(&key)
                    .json(&chat_body())
                    .send()
                    .await
                    .unwrap();
                let (status, body) = status_json(answer).await;
                if status != 200 {
                    assert_eq!(status, 429, "{body}");
                    let message = body["error"]["message"].as_str().unwrap().to_owned();
                    return (admitted, message);
                }
            }
            panic!("never refused in 20 calls");
        }
    };
    let (admitted, message) = admitted_until_refused(&one, kf).await;
    assert_eq!(admitted, 7);
    assert!(
        message.contains(&format!("TOKEN/DAY 70 of group {f} (external id f)")),
        "{message}"
    );
    let (admitted, message) = admitted_until_refused(&two, ke).await;
    assert_eq!(admitted, 3);
    assert!(
        message.contains(&format!("TOKEN/DAY 100 of group {o} (external id o)")),
        "{message}"
    );
    drop((one, two));
    shared.drop_schema().await;
}

/// C12's first half: a key revoked through one instance is refused by the other. The
/// other instance has the key cached (it served a call with it first); the revocation
/// reaches its memory through the change log's notification (`MirroredStore`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c12_a_key_revoked_on_one_instance_is_refused_by_the_other() {
    let Some((shared, _mock, one, two)) = two_instances(
        "c12_a_key_revoked_on_one_instance_is_refused_by_the_other",
        "echo?prompt_tokens=5&completion_tokens=5",
    )
    .await
    else {
        return;
    };
    let (group, key) = one.member("c12", None, on_m(&[])).await;
    assert_eq!(two.chat(&key).await.0, 200);
    let prefix = &key[..16];
    let revoked = one
        .http
        .delete(one.url(&format!("/v1/gateway/groups/{group}/api_keys/{prefix}")))
        .header("Authorization", format!("Api-Key {ADMIN_KEY}"))
        .send()
        .await
        .unwrap();
    let revoked_at = Instant::now();
    assert_eq!(ok_json(revoked).await, json!({"prefix": prefix}));
    let delay = models_until(&two, &key, revoked_at, |status, _| status == 401).await;
    println!(
        "C12 propagation: key revocation reached the other instance in {} ms",
        delay.as_millis()
    );
    assert!(delay < Duration::from_secs(1), "{delay:?}");
    let (status, body) = two.chat(&key).await;
    assert_eq!(status, 401, "{body}");
    drop((one, two));
    shared.drop_schema().await;
}

/// A group deleted through one instance: the keys of its subtree, cached on the other,
/// are refused there within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c12_propagation_of_a_group_delete() {
    let Some((shared, _mock, one, two)) = two_instances(
        "c12_propagation_of_a_group_delete",
        "echo?prompt_tokens=5&completion_tokens=5",
    )
    .await
    else {
        return;
    };
    let (root, _) = one.member("root", None, on_m(&[])).await;
    let (_child, key) = one.member("child", Some(&root), on_m(&[])).await;
    assert_eq!(two.chat(&key).await.0, 200);
    let deleted = one
        .http
        .delete(one.url(&format!("/v1/gateway/groups/{root}")))
        .header("Authorization", format!("Api-Key {ADMIN_KEY}"))
        .send()
        .await
        .unwrap();
    let deleted_at = Instant::now();
    assert_eq!(ok_json(deleted).await["id"], root.as_str());
    let delay = models_until(&two, &key, deleted_at, |status, _| status == 401).await;
    println!(
        "C12 propagation: group delete reached the other instance in {} ms",
        delay.as_millis()
    );
    assert!(delay < Duration::from_secs(1), "{delay:?}");
    let (status, body) = two.chat(&key).await;
    assert_eq!(status, 401, "{body}");
    drop((one, two));
    shared.drop_schema().await;
}

/// An endpoint deleted through one instance leaves the other's model list, and calls to
/// it there are 404, within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c12_propagation_of_an_endpoint_delete() {
    let Some((shared, _mock, one, two)) = two_instances(
        "c12_propagation_of_an_endpoint_delete",
        "echo?prompt_tokens=5&completion_tokens=5",
    )
    .await
    else {
        return;
    };
    let (_group, key) = one.member("ep", None, on_m(&[])).await;
    assert_eq!(two.chat(&key).await.0, 200);
    let listed = one
        .http
        .get(one.url("/v1/gateway/endpoints"))
        .header("Authorization", format!("Api-Key {ADMIN_KEY}"))
        .send()
        .await
        .unwrap();
    let id = ok_json(listed).await["items"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let deleted = one
        .http
        .delete(one.url(&format!("/v1/gateway/endpoints/{id}")))
        .header("Authorization", format!("Api-Key {ADMIN_KEY}"))
        .send()
        .await
        .unwrap();
    let deleted_at = Instant::now();
    assert_eq!(deleted.status(), 200);
    let delay = models_until(&two, &key, deleted_at, |status, body| {
        status == 200 && body["data"] == json!([])
    })
    .await;
    println!(
        "C12 propagation: endpoint delete reached the other instance in {} ms",
        delay.as_millis()
    );
    assert!(delay < Duration::from_secs(1), "{delay:?}");
    let (status, body) = two.chat(&key).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "model_not_found");
    drop((one, two));
    shared.drop_schema().await;
}

/// On SQLite the other writer is the CLI: `tollgate workspace disable` in another process
/// reaches the running server's memory through its poll of the change log (every second),
/// so the workspace's keys are refused within about a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_workspace_disabled_by_the_cli_reaches_the_running_server() {
    let server = crate::support::TestServer::start().await;
    server.create_endpoint(M, "echo").await;
    let group = server.group("cli", "INDEPENDENT", None, on_m(&[])).await;
    let key = server.create_key(&group).await;
    let models = server.url("/v1/models");
    let answer = server
        .http
        .get(&models)
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(ok_json(answer).await["data"][0]["id"], M);

    let db = format!(
        "sqlite://{}",
        server.dir.path().join("tollgate.db").display()
    );
    let mut command = Command::new(BIN);
    for (name, _) in std::env::vars() {
        if name.starts_with("TOLLGATE_") {
            command.env_remove(name);
        }
    }
    let output = command
        .args(["workspace", "disable", "default", "--database", &db])
        .env("RUST_LOG", "info")
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let disabled_at = Instant::now();
    let delay = models_at_until(&server.http, &models, &key, disabled_at, |status, _| {
        status == 401
    })
    .await;
    println!(
        "SQLite propagation: a workspace disabled by the CLI reached the server in {} ms",
        delay.as_millis()
    );
    assert!(delay < Duration::from_secs(2), "{delay:?}");
    server.shutdown().await;
}

/// PostgreSQL stopped under a running instance: a key it has cached keeps working from
/// memory, a key it never saw is a 503 (not a 500, not a 401); the loss and the return
/// are logged once each; after the return the unseen key works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_keys_in_memory_keep_working_and_the_loss_is_logged_once() {
    if std::env::var("TOLLGATE_TEST_POSTGRES_URL").is_err() {
        println!(
            "skipped postgres_down_keys_in_memory_keep_working_and_the_loss_is_logged_once: \
             set TOLLGATE_TEST_POSTGRES_URL"
        );
        return;
    }
    let mut postgres = tollgate_testkit::PostgresServer::start().await.unwrap();
    let redis = tollgate_testkit::RedisServer::start().await.unwrap();
    let shared = Shared::create_on(&postgres.url(), redis.url()).await;
    let spool = tempfile::tempdir().unwrap();
    let spool_dir = spool.path().display().to_string();
    let instance = Instance::start_with(&shared, &[("TOLLGATE_SPOOL_DIR", &spool_dir)]).await;
    let mock = MockUpstream::start().await.unwrap();
    instance.create_endpoint(&mock, "echo").await;
    let (_used, used_key) = instance.member("used", None, on_m(&[])).await;
    let (_unseen, unseen_key) = instance.member("unseen", None, on_m(&[])).await;
    let models = instance.url("/v1/models");
    let status = |key: String| {
        let (http, models) = (instance.http.clone(), models.clone());
        async move {
            let answer = http.get(&models).bearer_auth(&key).send().await.unwrap();
            status_json(answer).await
        }
    };
    assert_eq!(status(used_key.clone()).await.0, 200);

    postgres.stop().await.unwrap();
    let (code, body) = status(unseen_key.clone()).await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["error"]["code"], "service_unavailable");
    let lost = instance
        .wait_for_log("database unreachable", Duration::from_secs(15))
        .await;
    assert!(lost.is_some(), "{}", instance.stderr_text());
    for _ in 0..20 {
        let (code, body) = status(used_key.clone()).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["data"][0]["id"], M);
    }
    let (code, _) = status(unseen_key.clone()).await;
    assert_eq!(code, 503);

    postgres.start_again().await.unwrap();
    let back = instance
        .wait_for_log("database reachable again", Duration::from_secs(15))
        .await;
    assert!(back.is_some(), "{}", instance.stderr_text());
    let started = Instant::now();
    let delay = models_until(&instance, &unseen_key, started, |code, _| code == 200).await;
    assert!(delay < Duration::from_secs(5), "{delay:?}");
    let log = instance.stderr_text();
    assert_eq!(log.matches("database unreachable").count(), 1, "{log}");
    assert_eq!(log.matches("database reachable again").count(), 1, "{log}");
    drop(instance);
    shared.drop_schema().await;
}

/// Calls `GET /v1/models` on `instance` with `key` every 20 ms until `is_done` holds for
/// its answer; the time from `since` to that answer. Gives up after 10 s.
async fn models_until(
    instance: &Instance,
    key: &str,
    since: Instant,
    is_done: impl Fn(u16, &Value) -> bool,
) -> Duration {
    models_at_until(
        &instance.http,
        &instance.url("/v1/models"),
        key,
        since,
        is_done,
    )
    .await
}

/// [`models_until`] on the models URL `url`.
async fn models_at_until(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    since: Instant,
    is_done: impl Fn(u16, &Value) -> bool,
) -> Duration {
    loop {
        let answer = http.get(url).bearer_auth(key).send().await.unwrap();
        let (status, body) = status_json(answer).await;
        if is_done(status, &body) {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "no change after 10 s: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
