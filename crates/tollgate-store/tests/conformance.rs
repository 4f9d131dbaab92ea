//! The conformance suite run against SQLite: every case in `conformance/cases.rs` on a
//! fresh database file, plus what only a file-backed store has (reopening, URL forms,
//! the journal mode).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
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

use std::sync::Arc;

use tempfile::TempDir;
use tollgate_core::{LimitMode, ModelAccess};
use tollgate_store::{
    NewApiKey, NewGroup, SqliteStore, Store, UsageEvent, UsageFilter, UsageStatus,
};

async fn fresh_sqlite() -> (TempDir, Arc<dyn Store>) {
    let dir = TempDir::new().unwrap();
    let url = format!("sqlite://{}", dir.path().join("tollgate.db").display());
    let store = SqliteStore::open(&url).await.unwrap();
    (dir, Arc::new(store))
}

conformance_cases!(fresh_sqlite);
webhook_conformance_cases!(fresh_sqlite);
change_log_conformance_cases!(fresh_sqlite);

#[tokio::test]
async fn data_survives_reopening_the_file() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("tollgate.db");
    let url = format!("sqlite://{}", path.display());

    let store = SqliteStore::open(&url).await.unwrap();
    let ws = store.create_workspace("acme", cases::T0).await.unwrap();
    store
        .create_group(NewGroup {
            id: "grp_1".into(),
            workspace_id: ws.id.clone(),
            name: Some("Acme".into()),
            external_entity_id: "cust-1".into(),
            models: vec![ModelAccess {
                slug: "acme/m".into(),
                rate_limits: vec![],
                usage_limits: vec![],
            }],
            mode: LimitMode::Cascading,
            parent_id: None,
            created_at: cases::T0,
        })
        .await
        .unwrap();
    store
        .insert_api_key(NewApiKey {
            group_id: "grp_1".into(),
            prefix: "tg_0000000000001".into(),
            hash: vec![9; 32],
            name: None,
            created_at: cases::T0,
        })
        .await
        .unwrap();
    let before = store
        .resolve_api_key("tg_0000000000001")
        .await
        .unwrap()
        .unwrap();
    store.close().await;

    // The same file through the other accepted spellings.
    for spelling in [
        format!("sqlite:{}", path.display()),
        path.display().to_string(),
    ] {
        let store = SqliteStore::open(&spelling).await.unwrap();
        let after = store
            .resolve_api_key("tg_0000000000001")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(after.key, before.key);
        assert_eq!(after.chain, before.chain);
        assert_eq!(after.workspace, before.workspace);
        assert_eq!(after.chain[0].name, Some("Acme".into()));
        let events = store
            .list_usage_events(&UsageFilter::default(), cases_all())
            .await;
        assert!(events.unwrap().items.is_empty());
        store.close().await;
    }
}

fn cases_all() -> tollgate_store::PageRequest {
    tollgate_store::PageRequest {
        limit: 100,
        after: None,
    }
}

#[tokio::test]
async fn open_creates_missing_directories_and_uses_wal() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("data").join("nested").join("tollgate.db");
    let store = SqliteStore::open(&format!("sqlite:{}", path.display()))
        .await
        .unwrap();
    store.create_workspace("acme", cases::T0).await.unwrap();
    assert!(path.exists());

    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&format!(
        "sqlite://{}",
        path.display()
    ))
    .await
    .unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    store.close().await;
}

#[tokio::test]
async fn an_in_memory_store_works_on_one_connection() {
    let store = SqliteStore::open("sqlite::memory:").await.unwrap();
    let ws = store.create_workspace("acme", cases::T0).await.unwrap();
    assert_eq!(store.workspace(&ws.id).await.unwrap(), Some(ws));
}

#[tokio::test]
async fn an_unusable_path_is_an_error_not_a_panic() {
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let inside_a_file = file.join("tollgate.db");
    let result = SqliteStore::open(&inside_a_file.display().to_string()).await;
    assert!(result.is_err());
    assert!(SqliteStore::open("sqlite:").await.is_err());
}

/// Two stores on one file stand for `tollgate workspace create` next to a running
/// server: their write transactions wait on each other (`BEGIN IMMEDIATE` + busy
/// timeout) instead of failing with SQLITE_BUSY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_on_one_file_wait_for_each_other() {
    let dir = TempDir::new().unwrap();
    let url = format!("sqlite://{}", dir.path().join("tollgate.db").display());
    let first = Arc::new(SqliteStore::open(&url).await.unwrap());
    let second = Arc::new(SqliteStore::open(&url).await.unwrap());
    let ws = first.create_workspace("acme", cases::T0).await.unwrap();

    let mut tasks = Vec::new();
    for n in 0..20 {
        let store = if n % 2 == 0 {
            first.clone()
        } else {
            second.clone()
        };
        let ws = ws.id.clone();
        tasks.push(tokio::spawn(async move {
            store
                .create_group(NewGroup {
                    id: format!("grp_{n}"),
                    workspace_id: ws,
                    name: None,
                    external_entity_id: format!("cust-{n}"),
                    models: vec![],
                    mode: LimitMode::Independent,
                    parent_id: None,
                    created_at: cases::T0,
                })
                .await
                .map(|group| group.id)
        }));
    }
    for task in tasks {
        let created = task.await.unwrap();
        assert!(created.is_ok(), "{created:?}");
    }
    let listed = second
        .list_groups(&ws.id, &Default::default(), cases_all())
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 20);
    first.close().await;
    second.close().await;
}

/// A batch of usage events is one transaction: when one row fails (here a trigger
/// refuses it, standing for a full disk), none of the batch is stored, and the next
/// batch is unaffected — for a batch of one INSERT statement and one of several.
#[tokio::test]
async fn a_usage_batch_is_stored_whole_or_not_at_all() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("tollgate.db");
    let store = SqliteStore::open(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&format!(
        "sqlite://{}",
        path.display()
    ))
    .await
    .unwrap();
    sqlx::query(
        "CREATE TRIGGER refuse_poison BEFORE INSERT ON usage_events \
         WHEN NEW.request_id = 'req-poison' BEGIN SELECT RAISE(ABORT, 'poison'); END",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let event = |n: u32, request_id: &str| UsageEvent {
        idempotency_key: format!("idem-{n}"),
        timestamp: cases::T0,
        request_id: request_id.into(),
        request_metadata: None,
        model_slug: "acme/m".into(),
        external_entity_id: "cust-1".into(),
        api_key_prefix: "tg_0000000000001".into(),
        group_id: "grp_1".into(),
        workspace_id: "ws_1".into(),
        status: UsageStatus::Completed,
        input_tokens: 1,
        output_tokens: 2,
        cached_input_tokens: 0,
        is_estimated: false,
    };
    let stored = || async {
        store
            .list_usage_events(
                &UsageFilter::default(),
                tollgate_store::PageRequest {
                    limit: 1000,
                    after: None,
                },
            )
            .await
            .unwrap()
            .items
            .len()
    };
    let mut expected = 0;
    for (size, poison_at) in [(100, 80), (600, 550)] {
        let first = u32::try_from(expected).unwrap();
        let mut batch: Vec<UsageEvent> = (first..first + size)
            .map(|n| event(n, &format!("req-{n}")))
            .collect();
        batch.insert(poison_at, event(100_000, "req-poison"));
        assert!(store.insert_usage_events(&batch).await.is_err());
        assert_eq!(stored().await, expected, "batch of {size}");
        batch.remove(poison_at);
        store.insert_usage_events(&batch).await.unwrap();
        expected += usize::try_from(size).unwrap();
        assert_eq!(stored().await, expected);
    }
    store.close().await;
}

/// The writer never checkpoints (its commits stay cheap); a background connection does:
/// shortly after a write, the database file alone — without its WAL — holds the rows.
#[tokio::test]
async fn the_wal_is_checkpointed_in_the_background() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("tollgate.db");
    let store = SqliteStore::open(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    store.create_workspace("acme", cases::T0).await.unwrap();
    let copy = dir.path().join("copy.db");
    let mut names = Vec::new();
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        // The main file only: what is still in the WAL is not in the copy.
        std::fs::copy(&path, &copy).unwrap();
        let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&format!(
            "sqlite://{}?mode=ro&immutable=1",
            copy.display()
        ))
        .await
        .unwrap();
        names = sqlx::query_scalar::<_, String>(
            "SELECT name FROM sqlite_master WHERE name = 'workspaces' \
             UNION ALL SELECT name FROM workspaces",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap_or_default();
        if names.len() == 2 {
            break;
        }
    }
    assert_eq!(names, ["workspaces", "acme"]);
    store.close().await;
}
