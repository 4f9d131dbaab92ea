//! The conformance suite run against PostgreSQL: every case in `conformance/cases.rs` and
//! `conformance/webhooks.rs`, each in a fresh schema (`tg_test_<random>`, dropped after
//! the case) so cases run in parallel on one database, plus what only a shared server
//! has: several stores on one schema at once.
//!
//! `TOLLGATE_TEST_POSTGRES_URL` names the database (CI sets it). Unset, every case prints
//! a "skipped" line and returns, so a plain `cargo test` works without PostgreSQL; set but
//! unreachable, every case fails with the reason.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr,
    reason = "tests fail loudly and say when they are skipped"
)]

#[path = "conformance/cases.rs"]
#[macro_use]
mod cases;
#[path = "conformance/webhooks.rs"]
#[macro_use]
mod webhooks;
#[path = "conformance/changes.rs"]
#[macro_use]
mod changes;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use sqlx::{Connection, Executor};
use tollgate_core::hierarchy::HierarchyError;
use tollgate_core::{LimitMode, LimitType, LimitUnit, ModelAccess, RateLimit};
use tollgate_store::{
    GroupPatch, GroupWriteError, NewGroup, PostgresStore, Store, UsageEvent, UsageStatus,
};

const URL_VARIABLE: &str = "TOLLGATE_TEST_POSTGRES_URL";

/// The database URL, or `None` (after saying so) when the variable is unset.
fn postgres_url() -> Option<String> {
    match std::env::var(URL_VARIABLE) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("skipped: {URL_VARIABLE} unset");
            None
        }
    }
}

/// Drops the test's schema when the case ends (passed or failed), on a thread of its own
/// since `Drop` cannot await.
struct Schema {
    url: String,
    name: String,
}

impl Schema {
    fn fresh(url: &str) -> Schema {
        Schema {
            url: url.to_owned(),
            name: format!("tg_test_{:016x}", rand::random::<u64>()),
        }
    }

    async fn open(&self) -> PostgresStore {
        PostgresStore::connect_in_schema(&self.url, &self.name)
            .await
            .unwrap_or_else(|e| {
                panic!("{URL_VARIABLE} is set but PostgreSQL there is unusable: {e}")
            })
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let url = self.url.clone();
        let drop_schema = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.name);
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&url).await?;
                conn.execute(drop_schema.as_str()).await?;
                conn.close().await?;
                Ok::<_, sqlx::Error>(())
            })?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("could not drop test schema {}: {e}", self.name);
        }
    }
}

impl Schema {
    /// Makes every INSERT or UPDATE statement on `table` sleep up to `max_ms` before its
    /// transaction can commit: a test-only trigger that widens the window between a write's
    /// checks (or its sequence number) and its commit, where races happen.
    async fn slow_down(&self, table: &str, max_ms: u32) {
        let mut conn = sqlx::PgConnection::connect(&self.url).await.unwrap();
        let schema = &self.name;
        conn.execute(
            format!(
                "CREATE FUNCTION \"{schema}\".slow_down() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN PERFORM pg_sleep(random() * {max_ms} / 1000.0); RETURN NULL; END $$; \
                 CREATE TRIGGER slow_down AFTER INSERT OR UPDATE ON \"{schema}\".{table} \
                 FOR EACH STATEMENT EXECUTE FUNCTION \"{schema}\".slow_down()"
            )
            .as_str(),
        )
        .await
        .unwrap();
        conn.close().await.unwrap();
    }
}

async fn fresh_postgres() -> Option<(Schema, Arc<dyn Store>)> {
    let schema = Schema::fresh(&postgres_url()?);
    let store = schema.open().await;
    Some((schema, Arc::new(store)))
}

conformance_cases!(fresh_postgres);
webhook_conformance_cases!(fresh_postgres);
change_log_conformance_cases!(fresh_postgres);

fn token_minute(threshold: u64) -> Vec<ModelAccess> {
    vec![ModelAccess {
        slug: "acme/m".into(),
        rate_limits: vec![RateLimit {
            kind: LimitType::Token,
            unit: LimitUnit::Minute,
            threshold,
        }],
        usage_limits: vec![],
    }]
}

fn cascading(workspace: &str, id: &str, parent: Option<&str>, threshold: u64) -> NewGroup {
    NewGroup {
        id: id.into(),
        workspace_id: workspace.into(),
        name: None,
        external_entity_id: format!("ext-{id}"),
        models: token_minute(threshold),
        mode: LimitMode::Cascading,
        parent_id: parent.map(str::to_owned),
        created_at: cases::T0,
    }
}

/// Two instances (two stores, two pools) on one schema race a child at 50 tokens/minute
/// against lowering its parent to 40: in every round exactly one of the two writes wins
/// — never both, which would leave a child above its parent. A trigger makes each group
/// write linger before its commit; without the workspace lock both transactions would
/// check a tree without the other's write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_tree_writes_across_two_stores_serialize() {
    let Some(url) = postgres_url() else { return };
    let schema = Schema::fresh(&url);
    let first = Arc::new(schema.open().await);
    let second = Arc::new(schema.open().await);
    let ws = first.create_workspace("acme", cases::T0).await.unwrap().id;
    schema.slow_down("groups", 20).await;

    let rounds = 20;
    let mut child_won = 0;
    let mut patch_won = 0;
    for round in 0..rounds {
        let root = format!("grp_root{round}");
        first
            .create_group(cascading(&ws, &root, None, 100))
            .await
            .unwrap();
        let (creator, patcher) = if round % 2 == 0 {
            (first.clone(), second.clone())
        } else {
            (second.clone(), first.clone())
        };
        let child = cascading(&ws, &format!("grp_child{round}"), Some(&root), 50);
        let create = tokio::spawn(async move { creator.create_group(child).await });
        let patch_root = root.clone();
        let patch = tokio::spawn(async move {
            patcher
                .update_group(
                    &patch_root,
                    GroupPatch {
                        name: None,
                        models: Some(token_minute(40)),
                    },
                )
                .await
        });
        match (create.await.unwrap(), patch.await.unwrap()) {
            (Ok(_), Err(GroupWriteError::Hierarchy(HierarchyError::ExceedsParent))) => {
                child_won += 1;
            }
            (Err(GroupWriteError::Hierarchy(HierarchyError::ExceedsParent)), Ok(_)) => {
                patch_won += 1;
            }
            (created, patched) => {
                panic!("round {round}: child {created:?}, parent {patched:?}")
            }
        }
    }
    assert_eq!(child_won + patch_won, rounds);
    first.close().await;
    second.close().await;
}

fn usage(key: &str, workspace: &str) -> UsageEvent {
    UsageEvent {
        idempotency_key: key.into(),
        timestamp: cases::T0,
        request_id: format!("req-{key}"),
        request_metadata: None,
        model_slug: "acme/m".into(),
        external_entity_id: "cust-1".into(),
        api_key_prefix: "tg_0000000000001".into(),
        group_id: "grp_1".into(),
        workspace_id: workspace.into(),
        status: UsageStatus::Completed,
        input_tokens: 1,
        output_tokens: 2,
        cached_input_tokens: 0,
        is_estimated: false,
    }
}

/// Six writers on two stores insert 600 events (single inserts and batches) while a
/// reader follows them the way the webhook batcher does: `usage_events_after(cursor)`,
/// then the cursor moves to the largest number seen. The reader ends with every event
/// exactly once — no number became visible after a larger one. A trigger makes each
/// insert linger before its commit, so without the usage-insert lock numbers would
/// commit out of order and the reader would skip some.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_sequence_numbers_become_visible_in_order() {
    let Some(url) = postgres_url() else { return };
    let schema = Schema::fresh(&url);
    let first = Arc::new(schema.open().await);
    let second = Arc::new(schema.open().await);
    let ws = first.create_workspace("acme", cases::T0).await.unwrap().id;
    schema.slow_down("usage_events", 4).await;

    let writers = 6;
    let per_writer = 100;
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let store = if writer % 2 == 0 {
            first.clone()
        } else {
            second.clone()
        };
        let ws = ws.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while n < per_writer {
                if n % 3 == 0 {
                    let batch: Vec<UsageEvent> = (n..(n + 5).min(per_writer))
                        .map(|k| usage(&format!("w{writer}-{k}"), &ws))
                        .collect();
                    n += batch.len();
                    store.insert_usage_events(&batch).await.unwrap();
                } else {
                    store
                        .insert_usage_event(&usage(&format!("w{writer}-{n}"), &ws))
                        .await
                        .unwrap();
                    n += 1;
                }
            }
        }));
    }

    let total = writers * per_writer;
    let mut seen = HashSet::new();
    let mut cursor = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    // Until a read after every writer finished finds nothing more.
    while tokio::time::Instant::now() < deadline {
        let writers_done = tasks.iter().all(|task| task.is_finished());
        let page = second.usage_events_after(&ws, cursor, 7).await.unwrap();
        for (seq, event) in &page {
            assert!(*seq > cursor);
            assert!(
                seen.insert(event.idempotency_key.clone()),
                "{event:?} twice"
            );
            cursor = *seq;
        }
        if page.is_empty() {
            if writers_done {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(
        seen.len(),
        total,
        "events the cursor moved past before they were visible"
    );
    let stored = first.usage_events_after(&ws, 0, 1000).await.unwrap();
    assert_eq!(stored.len(), total, "every event stored once");
    first.close().await;
    second.close().await;
}

/// Four writers on two stores mint 200 API keys while a reader follows the change log
/// the way a mirror does (`config_changes_after(cursor)`, then the cursor moves to the
/// largest number seen): it ends with every change exactly once. A trigger makes each
/// change row linger before its commit, so without the change-log lock numbers would
/// commit out of order and the reader would skip some.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_changes_become_visible_in_order() {
    let Some(url) = postgres_url() else { return };
    let schema = Schema::fresh(&url);
    let first = Arc::new(schema.open().await);
    let second = Arc::new(schema.open().await);
    let ws = first.create_workspace("acme", cases::T0).await.unwrap().id;
    first
        .create_group(NewGroup {
            id: "grp_o".into(),
            workspace_id: ws.clone(),
            name: None,
            external_entity_id: "ext-o".into(),
            models: vec![],
            mode: LimitMode::Independent,
            parent_id: None,
            created_at: cases::T0,
        })
        .await
        .unwrap();
    let start = first.newest_config_change().await.unwrap();
    schema.slow_down("config_changes", 4).await;

    let writers = 4_u32;
    let per_writer = 50_u32;
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let store = if writer % 2 == 0 {
            first.clone()
        } else {
            second.clone()
        };
        tasks.push(tokio::spawn(async move {
            for n in 0..per_writer {
                store
                    .insert_api_key(tollgate_store::NewApiKey {
                        group_id: "grp_o".into(),
                        prefix: format!("tg_{:013}", writer * 1000 + n),
                        hash: vec![1; 32],
                        name: None,
                        created_at: cases::T0,
                    })
                    .await
                    .unwrap();
            }
        }));
    }
    let total = usize::try_from(writers * per_writer).unwrap();
    let mut seen = HashSet::new();
    let mut cursor = start;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        let writers_done = tasks.iter().all(|task| task.is_finished());
        let page = second.config_changes_after(cursor, 7).await.unwrap();
        for change in &page.changes {
            assert!(change.seq > cursor);
            assert!(seen.insert(change.object_id.clone()), "{change:?} twice");
            cursor = change.seq;
        }
        if page.changes.is_empty() {
            if writers_done {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(
        seen.len(),
        total,
        "changes the cursor moved past before they were visible"
    );
    first.close().await;
    second.close().await;
}

/// A notification on `tollgate_config` carries the change's number and arrives once the
/// write commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_is_announced_on_tollgate_config() {
    let Some(url) = postgres_url() else { return };
    let schema = Schema::fresh(&url);
    let store = schema.open().await;
    let mut listener = sqlx::postgres::PgListener::connect(&url).await.unwrap();
    listener.listen("tollgate_config").await.unwrap();
    let ws = store.create_workspace("acme", cases::T0).await.unwrap().id;
    let seq = store.newest_config_change().await.unwrap();
    // Other schemas' tests share the channel: wait for this schema's number.
    let heard = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let note = listener.recv().await.unwrap();
            if note.payload() == seq.to_string() {
                return note.payload().to_owned();
            }
        }
    })
    .await
    .expect("announced within 10 s");
    assert_eq!(heard, seq.to_string());
    let changes = store.config_changes_after(0, 10).await.unwrap().changes;
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].object_id, ws);
    assert_eq!(changes[0].seq, seq);
    store.close().await;
}

/// Two stores claiming due deliveries at once take disjoint sets (`SKIP LOCKED` plus the
/// lease), and together take every due delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_from_two_stores_are_disjoint() {
    let Some(url) = postgres_url() else { return };
    let schema = Schema::fresh(&url);
    let first = Arc::new(schema.open().await);
    let second = Arc::new(schema.open().await);
    let ws = first.create_workspace("acme", cases::T0).await.unwrap().id;
    first
        .insert_webhook_endpoint(tollgate_store::NewWebhookEndpoint {
            id: "wh_1".into(),
            workspace_id: ws.clone(),
            url: "https://billing.example.com/wh".into(),
            description: None,
            secret_ciphertext: b"sealed".to_vec(),
            created_at: cases::T0,
        })
        .await
        .unwrap();
    let deliveries = 40;
    for n in 0..deliveries {
        let cut = first
            .cut_webhook_batch(
                tollgate_store::NewWebhookDelivery {
                    id: format!("dlv_{n}"),
                    webhook_id: "wh_1".into(),
                    body: b"{}".to_vec(),
                    event_count: 1,
                    first_event_seq: n + 1,
                    last_event_seq: n + 1,
                    created_at: cases::T0,
                    next_attempt_at: cases::T0,
                },
                n,
            )
            .await
            .unwrap();
        assert!(cut);
    }
    let lease = tollgate_core::Timestamp(cases::T0.0 + 60_000);
    let mut tasks = Vec::new();
    for claimer in 0..8 {
        let store = if claimer % 2 == 0 {
            first.clone()
        } else {
            second.clone()
        };
        tasks.push(tokio::spawn(async move {
            store
                .claim_due_webhook_deliveries(cases::T0, lease, 7)
                .await
                .unwrap()
        }));
    }
    let mut claimed = Vec::new();
    for task in tasks {
        claimed.extend(task.await.unwrap().into_iter().map(|d| d.id));
    }
    let distinct: HashSet<_> = claimed.iter().cloned().collect();
    assert_eq!(distinct.len(), claimed.len(), "a delivery claimed twice");
    // 8 claims of up to 7 cover the 40 due deliveries; nothing is left unleased.
    assert_eq!(claimed.len(), 40);
    assert!(first
        .claim_due_webhook_deliveries(cases::T0, lease, 100)
        .await
        .unwrap()
        .is_empty());
    first.close().await;
    second.close().await;
}

/// A server that does not answer is an error from `connect`, not a panic or a hang.
#[tokio::test]
async fn an_unreachable_server_is_an_error() {
    let result = tokio::time::timeout(
        Duration::from_secs(60),
        PostgresStore::connect("postgres://postgres@127.0.0.1:1/test"),
    )
    .await
    .expect("connect gave up within a minute");
    assert!(
        matches!(result, Err(tollgate_store::StoreError::Database(_))),
        "{result:?}"
    );
}

/// An empty schema name is refused before anything is created.
#[tokio::test]
async fn an_empty_schema_name_is_refused() {
    let result = PostgresStore::connect_in_schema("postgres://postgres@127.0.0.1:1/test", "").await;
    assert_eq!(
        result.map(|_| ()).unwrap_err().to_string(),
        "database error: error with configuration: the PostgreSQL schema name is empty"
    );
}
