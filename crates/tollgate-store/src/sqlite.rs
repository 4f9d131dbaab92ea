//! The embedded SQLite store: one file, WAL journal, two pools.
//!
//! Reads go through a pool of several read-only connections; writes go through a pool of
//! exactly one connection, so every write transaction is serialized in-process. In WAL
//! mode readers never wait for the writer, and because no other connection of this
//! process ever writes, a read-then-write transaction (`create_group`) cannot fail to
//! upgrade its lock with SQLITE_BUSY. Write transactions start with `BEGIN IMMEDIATE` so
//! that another process on the same file (`tollgate workspace create` next to a running
//! server) waits on the busy timeout instead of failing half-way.
//! Pinned by `concurrent_create_group_never_busy` in `tests/conformance.rs`.

mod changes;
pub(crate) mod rows;
mod tree;
mod webhooks;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Sqlite, SqliteConnection, Transaction};
use tollgate_core::endpoint::Target;
use tollgate_core::ids::{new_id, IdKind};
use tollgate_core::{Group, Timestamp};

use rows::{
    into_page, Sequenced, API_KEY_COLUMNS, ENDPOINT_COLUMNS, GROUP_COLUMNS,
    JOINED_WORKSPACE_COLUMNS, MANAGEMENT_KEY_COLUMNS, SECRET_COLUMNS, USAGE_EVENT_COLUMNS,
    WORKSPACE_COLUMNS,
};

use crate::{
    ApiKey, DayUsage, Endpoint, GroupFilter, GroupPatch, GroupWriteError, KeyGrant, ManagementKey,
    NewApiKey, NewEndpoint, NewGroup, NewManagementKey, NewSecret, Page, PageRequest, Secret,
    Store, StoreError, StoreResult, UsageEvent, UsageFilter, Workspace,
};
use crate::{ConfigChanges, ConfigKind};
use crate::{
    NewWebhookDelivery, NewWebhookEndpoint, SequencedUsageEvent, WebhookAttempt, WebhookDelivery,
    WebhookEndpoint, WebhookSecret,
};

/// Keys read through the management API belong to a live group. `delete_group` revokes
/// a subtree's keys, but a key inserted while its group was being deleted would
/// otherwise show up under a deleted group.
const GROUP_IS_LIVE: &str = "EXISTS (SELECT 1 FROM groups g \
     WHERE g.id = api_keys.group_id AND g.deleted_at IS NULL)";

/// How long a connection waits for a lock held by another process before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Read connections; the machine Tollgate targets has few cores and reads are short.
const READ_CONNECTIONS: u32 = 4;
/// Usage events per INSERT statement of a batch (the data plane's largest batch): 14
/// columns each, 3,584 parameters, well under the 32,766 SQLite allows since 3.32 (the
/// bundled SQLite is newer).
const USAGE_ROWS_PER_STATEMENT: usize = 256;

/// How often the WAL is checkpointed into the database file, off the commit path.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);

#[derive(Debug, Clone)]
pub struct SqliteStore {
    read: SqlitePool,
    /// Exactly one connection: the in-process write lock.
    write: SqlitePool,
    /// One connection that only checkpoints the WAL (file databases).
    checkpoint: Option<SqlitePool>,
}

/// Where the database lives, from a `--database` value.
#[derive(Debug, PartialEq, Eq)]
enum Location {
    File(PathBuf),
    /// `sqlite::memory:` — one connection serves reads and writes, since every new
    /// connection to `:memory:` would be a different, empty database.
    Memory,
}

impl Location {
    /// Accepts `sqlite://path.db`, `sqlite:path.db` and a plain path
    /// (`sqlite:///abs/path.db` is the absolute `/abs/path.db`). URL options such as
    /// `?mode=ro` are refused rather than ignored: Tollgate sets the connection options
    /// itself, and a plain path may contain `?`.
    fn parse(url: &str) -> Result<Location, String> {
        let path = match url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            Some(path) if path.contains('?') => {
                return Err(format!(
                    "SQLite URL options are not supported (in '{url}'); give the path alone"
                ))
            }
            Some(path) => path,
            None => url,
        };
        if path.is_empty() {
            return Err("the SQLite database path is empty".into());
        }
        Ok(if path == ":memory:" {
            Location::Memory
        } else {
            Location::File(PathBuf::from(path))
        })
    }
}

impl SqliteStore {
    /// Opens (creating it when missing) the database at `url` and applies migrations.
    pub async fn open(url: &str) -> StoreResult<SqliteStore> {
        let location = Location::parse(url)
            .map_err(|why| StoreError::Database(sqlx::Error::Configuration(why.into())))?;
        let store = match location {
            Location::Memory => Self::open_memory().await?,
            Location::File(path) => Self::open_file(&path).await?,
        };
        sqlx::migrate!("./migrations/sqlite")
            .run(&store.write)
            .await?;
        Ok(store)
    }

    async fn open_file(path: &Path) -> StoreResult<SqliteStore> {
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| StoreError::Database(sqlx::Error::Io(e)))?;
        }
        let base = SqliteConnectOptions::new()
            .filename(path)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT)
            // In WAL mode NORMAL syncs at checkpoints, not at every commit: a committed
            // transaction survives a crash of the process (the WAL is in the OS's hands),
            // and only a power loss or kernel crash can roll back the last commits.
            .synchronous(SqliteSynchronous::Normal);
        // Checkpoints copy the WAL into the database file and sync both. SQLite runs them
        // by default inside the commit that fills the WAL past 1,000 pages, so every
        // few hundred commits one request's commit paid for two fsyncs (the usage
        // commit's p99, `docs/BENCHMARKS.md`). The writer never checkpoints; a
        // connection of its own does, in the background (`checkpoint_in_background`),
        // without blocking the writer or the readers.
        let write_options = base
            .clone()
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .pragma("wal_autocheckpoint", "0");
        // The writer stays open for the life of the store, so the WAL index is always
        // there for the read-only connections.
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            // A file's connection cannot hang up the way a server's can; pinging it on
            // every acquire only adds a round trip to its thread to every write (the
            // usage commit's latency, `docs/BENCHMARKS.md`).
            .test_before_acquire(false)
            .connect_with(write_options)
            .await?;
        let checkpoint = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(base.clone())
            .await?;
        tokio::spawn(checkpoint_in_background(checkpoint.clone()));
        let read = SqlitePoolOptions::new()
            .max_connections(READ_CONNECTIONS)
            .connect_with(base.read_only(true))
            .await?;
        Ok(SqliteStore {
            read,
            write,
            checkpoint: Some(checkpoint),
        })
    }

    async fn open_memory() -> StoreResult<SqliteStore> {
        let options = SqliteConnectOptions::from_str("sqlite::memory:")?.foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await?;
        Ok(SqliteStore {
            read: pool.clone(),
            write: pool,
            checkpoint: None,
        })
    }

    /// Closes the pools, waiting for connections in use to be returned. Called once on
    /// graceful shutdown, after the last write. The last connection to close
    /// checkpoints the WAL into the database file.
    pub async fn close(&self) {
        if let Some(checkpoint) = &self.checkpoint {
            checkpoint.close().await;
        }
        self.read.close().await;
        self.write.close().await;
    }

    async fn begin_write(&self) -> StoreResult<Transaction<'static, Sqlite>> {
        Ok(self.write.begin_with("BEGIN IMMEDIATE").await?)
    }
}

/// Checkpoints the WAL every [`CHECKPOINT_EVERY`] until the store is closed. PASSIVE:
/// copies what no reader still needs and never waits for, or blocks, the writer or the
/// readers. Pinned by `the_wal_is_checkpointed_in_the_background` in
/// `tests/conformance.rs`.
async fn checkpoint_in_background(pool: SqlitePool) {
    let mut every = tokio::time::interval(CHECKPOINT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if pool.is_closed() {
            return;
        }
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&pool)
            .await
        {
            if pool.is_closed() {
                return;
            }
            // Another process checkpointing at the same moment; the next round catches up.
            tracing::debug!(error = %e, "WAL checkpoint skipped");
        }
    }
}

/// The message of a UNIQUE violation (`UNIQUE constraint failed: table.column`), if that
/// is what `e` is.
fn unique_violation(e: &sqlx::Error) -> Option<&str> {
    match e {
        sqlx::Error::Database(db) if db.is_unique_violation() => Some(db.message()),
        _ => None,
    }
}

/// Maps a UNIQUE violation on `column` to `Duplicate(what)`, any other one to
/// `Duplicate("id")` (a clash of random ids), and everything else to a database error.
fn duplicate_on(e: sqlx::Error, column: &str, what: &'static str) -> StoreError {
    match unique_violation(&e) {
        Some(message) if message.contains(column) => StoreError::Duplicate(what),
        Some(_) => StoreError::Duplicate("id"),
        None => StoreError::Database(e),
    }
}

/// Keyset parameters: at least one row per page, `limit + 1` fetched to learn if more.
fn page_bounds(page: PageRequest) -> (usize, i64, i64) {
    let limit = page.limit.max(1);
    let after = page.after.unwrap_or(0);
    (limit as usize, after, i64::from(limit) + 1)
}

/// `INSERT ... VALUES (...), (...) ON CONFLICT (idempotency_key) DO NOTHING` for
/// `events`: a key already stored, or repeated within `events`, keeps its first copy.
fn usage_insert(events: &[UsageEvent]) -> QueryBuilder<'_, Sqlite> {
    let mut query = QueryBuilder::<Sqlite>::new(
        "INSERT INTO usage_events (idempotency_key, timestamp, request_id, \
         request_metadata, model_slug, external_entity_id, api_key_prefix, group_id, \
         workspace_id, status, input_tokens, output_tokens, cached_input_tokens, \
         is_estimated) ",
    );
    query.push_values(events, |mut row, event| {
        row.push_bind(event.idempotency_key.as_str())
            .push_bind(event.timestamp.0)
            .push_bind(event.request_id.as_str())
            .push_bind(event.request_metadata.as_deref())
            .push_bind(event.model_slug.as_str())
            .push_bind(event.external_entity_id.as_str())
            .push_bind(event.api_key_prefix.as_str())
            .push_bind(event.group_id.as_str())
            .push_bind(event.workspace_id.as_str())
            .push_bind(event.status.as_str())
            .push_bind(rows::token_count(event.input_tokens))
            .push_bind(rows::token_count(event.output_tokens))
            .push_bind(rows::token_count(event.cached_input_tokens))
            .push_bind(event.is_estimated);
    });
    query.push(" ON CONFLICT (idempotency_key) DO NOTHING");
    query
}

async fn fetch_page<T>(
    query: &mut QueryBuilder<'_, Sqlite>,
    pool: &SqlitePool,
    limit: usize,
    decode: fn(&sqlx::sqlite::SqliteRow) -> StoreResult<Sequenced<T>>,
) -> StoreResult<Page<T>> {
    let rows = query.build().fetch_all(pool).await?;
    let decoded = rows.iter().map(decode).collect::<StoreResult<Vec<_>>>()?;
    Ok(into_page(decoded, limit))
}

async fn workspace_by_id(conn: &mut SqliteConnection, id: &str) -> StoreResult<Option<Workspace>> {
    let row = sqlx::query(&format!(
        "SELECT {WORKSPACE_COLUMNS} FROM workspaces WHERE id = ?1"
    ))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(rows::workspace).transpose()
}

#[async_trait]
impl Store for SqliteStore {
    // --- workspaces -------------------------------------------------------------------

    async fn create_workspace(&self, name: &str, now: Timestamp) -> StoreResult<Workspace> {
        let workspace = Workspace {
            id: new_id(IdKind::Workspace),
            name: name.to_owned(),
            is_enabled: true,
            signing_key: None,
            created_at: now,
        };
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO workspaces (id, name, is_enabled, created_at) VALUES (?1, ?2, 1, ?3)",
        )
        .bind(&workspace.id)
        .bind(&workspace.name)
        .bind(now.0)
        .execute(&mut *tx)
        .await
        .map_err(|e| duplicate_on(e, "workspaces.name", "workspace"))?;
        changes::record(&mut tx, ConfigKind::Workspace, &workspace.id).await?;
        tx.commit().await?;
        Ok(workspace)
    }

    async fn workspace_by_name(&self, name: &str) -> StoreResult<Option<Workspace>> {
        let row = sqlx::query(&format!(
            "SELECT {WORKSPACE_COLUMNS} FROM workspaces WHERE name = ?1"
        ))
        .bind(name)
        .fetch_optional(&self.read)
        .await?;
        row.as_ref().map(rows::workspace).transpose()
    }

    async fn workspace(&self, id: &str) -> StoreResult<Option<Workspace>> {
        let mut conn = self.read.acquire().await?;
        workspace_by_id(&mut conn, id).await
    }

    async fn set_workspace_enabled(&self, name: &str, enabled: bool) -> StoreResult<bool> {
        let mut tx = self.begin_write().await?;
        let id: Option<String> = sqlx::query_scalar(
            "UPDATE workspaces SET is_enabled = ?1 WHERE name = ?2 RETURNING id",
        )
        .bind(enabled)
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(id) = &id {
            changes::record(&mut tx, ConfigKind::Workspace, id).await?;
        }
        tx.commit().await?;
        Ok(id.is_some())
    }

    async fn set_signing_key(&self, workspace_id: &str, public_key: &[u8]) -> StoreResult<()> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query("UPDATE workspaces SET signing_key = ?1 WHERE id = ?2")
            .bind(public_key)
            .bind(workspace_id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() > 0 {
            changes::record(&mut tx, ConfigKind::Workspace, workspace_id).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    // --- management keys --------------------------------------------------------------

    async fn insert_management_key(&self, key: NewManagementKey) -> StoreResult<ManagementKey> {
        sqlx::query(
            "INSERT INTO management_keys (prefix, workspace_id, hash, name, scope, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .bind(&key.prefix)
        .bind(&key.workspace_id)
        .bind(&key.hash)
        .bind(&key.name)
        .bind(key.scope.as_str())
        .bind(key.created_at.0)
        .execute(&self.write)
        .await
        .map_err(|e| duplicate_on(e, "management_keys.prefix", "prefix"))?;
        Ok(ManagementKey {
            workspace_id: key.workspace_id,
            prefix: key.prefix,
            hash: key.hash,
            name: key.name,
            scope: key.scope,
            created_at: key.created_at,
        })
    }

    /// A live key with the same hash (anywhere) means there is nothing to do. Otherwise
    /// the key is inserted; when its prefix is already used — by a revoked copy of this
    /// very key, or by a different key that happens to share the prefix — that row is
    /// replaced by this key (live again, new workspace, name, scope and created_at), since
    /// prefixes identify management keys and the configured key must work.
    async fn ensure_management_key(&self, key: NewManagementKey) -> StoreResult<()> {
        let mut tx = self.begin_write().await?;
        let live =
            sqlx::query("SELECT 1 FROM management_keys WHERE hash = ?1 AND revoked_at IS NULL")
                .bind(&key.hash)
                .fetch_optional(&mut *tx)
                .await?;
        if live.is_none() {
            sqlx::query(
                "INSERT INTO management_keys \
                 (prefix, workspace_id, hash, name, scope, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                 ON CONFLICT (prefix) DO UPDATE SET workspace_id = excluded.workspace_id, \
                 hash = excluded.hash, name = excluded.name, scope = excluded.scope, \
                 created_at = excluded.created_at, revoked_at = NULL",
            )
            .bind(&key.prefix)
            .bind(&key.workspace_id)
            .bind(&key.hash)
            .bind(&key.name)
            .bind(key.scope.as_str())
            .bind(key.created_at.0)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn management_key_by_prefix(
        &self,
        prefix: &str,
    ) -> StoreResult<Option<(ManagementKey, Workspace)>> {
        let mut conn = self.read.acquire().await?;
        let row = sqlx::query(&format!(
            "SELECT {MANAGEMENT_KEY_COLUMNS} FROM management_keys \
             WHERE prefix = ?1 AND revoked_at IS NULL"
        ))
        .bind(prefix)
        .fetch_optional(&mut *conn)
        .await?;
        let Some((_, key)) = row.as_ref().map(rows::management_key).transpose()? else {
            return Ok(None);
        };
        Ok(workspace_by_id(&mut conn, &key.workspace_id)
            .await?
            .map(|workspace| (key, workspace)))
    }

    async fn list_management_keys(
        &self,
        workspace_id: &str,
        page: PageRequest,
    ) -> StoreResult<Page<ManagementKey>> {
        let (limit, after, fetch) = page_bounds(page);
        let mut query = QueryBuilder::new(format!(
            "SELECT {MANAGEMENT_KEY_COLUMNS} FROM management_keys WHERE revoked_at IS NULL"
        ));
        query
            .push(" AND workspace_id = ")
            .push_bind(workspace_id.to_owned());
        query.push(" AND seq > ").push_bind(after);
        query.push(" ORDER BY seq LIMIT ").push_bind(fetch);
        fetch_page(&mut query, &self.read, limit, rows::management_key).await
    }

    async fn revoke_management_key(
        &self,
        workspace_id: &str,
        prefix: &str,
        now: Timestamp,
    ) -> StoreResult<Option<ManagementKey>> {
        let row = sqlx::query(&format!(
            "UPDATE management_keys SET revoked_at = ?1 \
             WHERE workspace_id = ?2 AND prefix = ?3 AND revoked_at IS NULL \
             RETURNING {MANAGEMENT_KEY_COLUMNS}"
        ))
        .bind(now.0)
        .bind(workspace_id)
        .bind(prefix)
        .fetch_optional(&self.write)
        .await?;
        Ok(row
            .as_ref()
            .map(rows::management_key)
            .transpose()?
            .map(|(_, key)| key))
    }

    // --- secrets ----------------------------------------------------------------------

    async fn insert_secret(&self, secret: NewSecret) -> StoreResult<Secret> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO secrets (id, workspace_id, name, ciphertext, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .bind(&secret.id)
        .bind(&secret.workspace_id)
        .bind(&secret.name)
        .bind(&secret.ciphertext)
        .bind(secret.created_at.0)
        .execute(&mut *tx)
        .await
        .map_err(|e| duplicate_on(e, "secrets.name", "name"))?;
        changes::record(&mut tx, ConfigKind::Secret, &secret.id).await?;
        tx.commit().await?;
        Ok(Secret {
            id: secret.id,
            workspace_id: secret.workspace_id,
            name: secret.name,
            ciphertext: secret.ciphertext,
            created_at: secret.created_at,
        })
    }

    async fn secret(&self, id: &str) -> StoreResult<Option<Secret>> {
        let row = sqlx::query(&format!(
            "SELECT {SECRET_COLUMNS} FROM secrets WHERE id = ?1 AND deleted_at IS NULL"
        ))
        .bind(id)
        .fetch_optional(&self.read)
        .await?;
        Ok(row.as_ref().map(rows::secret).transpose()?.map(|(_, s)| s))
    }

    async fn list_secrets(
        &self,
        workspace_id: &str,
        page: PageRequest,
    ) -> StoreResult<Page<Secret>> {
        let (limit, after, fetch) = page_bounds(page);
        let mut query = QueryBuilder::new(format!(
            "SELECT {SECRET_COLUMNS} FROM secrets WHERE deleted_at IS NULL"
        ));
        query
            .push(" AND workspace_id = ")
            .push_bind(workspace_id.to_owned());
        query.push(" AND seq > ").push_bind(after);
        query.push(" ORDER BY seq LIMIT ").push_bind(fetch);
        fetch_page(&mut query, &self.read, limit, rows::secret).await
    }

    async fn delete_secret(&self, id: &str, now: Timestamp) -> StoreResult<Option<Secret>> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(&format!(
            "UPDATE secrets SET deleted_at = ?1 WHERE id = ?2 AND deleted_at IS NULL \
             RETURNING {SECRET_COLUMNS}"
        ))
        .bind(now.0)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let deleted = row.as_ref().map(rows::secret).transpose()?.map(|(_, s)| s);
        if deleted.is_some() {
            changes::record(&mut tx, ConfigKind::Secret, id).await?;
        }
        tx.commit().await?;
        Ok(deleted)
    }

    // --- endpoints --------------------------------------------------------------------

    async fn insert_endpoint(&self, endpoint: NewEndpoint) -> StoreResult<Endpoint> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO endpoints \
             (id, workspace_id, slug, region, targets, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
        )
        .bind(&endpoint.id)
        .bind(&endpoint.workspace_id)
        .bind(&endpoint.slug)
        .bind(rows::region_str(endpoint.region))
        .bind(rows::targets_json(&endpoint.targets)?)
        .bind(endpoint.created_at.0)
        .execute(&mut *tx)
        .await
        .map_err(|e| duplicate_on(e, "endpoints.slug", "slug"))?;
        changes::record(&mut tx, ConfigKind::Endpoint, &endpoint.id).await?;
        tx.commit().await?;
        Ok(Endpoint {
            id: endpoint.id,
            workspace_id: endpoint.workspace_id,
            slug: endpoint.slug,
            region: endpoint.region,
            targets: endpoint.targets,
            created_at: endpoint.created_at,
            updated_at: endpoint.created_at,
        })
    }

    async fn endpoint(&self, id: &str) -> StoreResult<Option<Endpoint>> {
        let row = sqlx::query(&format!(
            "SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE id = ?1 AND deleted_at IS NULL"
        ))
        .bind(id)
        .fetch_optional(&self.read)
        .await?;
        Ok(row
            .as_ref()
            .map(rows::endpoint)
            .transpose()?
            .map(|(_, e)| e))
    }

    async fn endpoint_by_slug(&self, slug: &str) -> StoreResult<Option<Endpoint>> {
        let row = sqlx::query(&format!(
            "SELECT {ENDPOINT_COLUMNS} FROM endpoints \
             WHERE slug = ?1 AND deleted_at IS NULL"
        ))
        .bind(slug)
        .fetch_optional(&self.read)
        .await?;
        Ok(row
            .as_ref()
            .map(rows::endpoint)
            .transpose()?
            .map(|(_, e)| e))
    }

    async fn list_endpoints(
        &self,
        workspace_id: &str,
        page: PageRequest,
    ) -> StoreResult<Page<Endpoint>> {
        let (limit, after, fetch) = page_bounds(page);
        let mut query = QueryBuilder::new(format!(
            "SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE deleted_at IS NULL"
        ));
        query
            .push(" AND workspace_id = ")
            .push_bind(workspace_id.to_owned());
        query.push(" AND seq > ").push_bind(after);
        query.push(" ORDER BY seq LIMIT ").push_bind(fetch);
        fetch_page(&mut query, &self.read, limit, rows::endpoint).await
    }

    async fn update_endpoint_targets(
        &self,
        id: &str,
        targets: &[Target],
        now: Timestamp,
    ) -> StoreResult<Option<Endpoint>> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(&format!(
            "UPDATE endpoints SET targets = ?1, updated_at = ?2 \
             WHERE id = ?3 AND deleted_at IS NULL RETURNING {ENDPOINT_COLUMNS}"
        ))
        .bind(rows::targets_json(targets)?)
        .bind(now.0)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let updated = row
            .as_ref()
            .map(rows::endpoint)
            .transpose()?
            .map(|(_, e)| e);
        if updated.is_some() {
            changes::record(&mut tx, ConfigKind::Endpoint, id).await?;
        }
        tx.commit().await?;
        Ok(updated)
    }

    async fn delete_endpoint(&self, id: &str, now: Timestamp) -> StoreResult<Option<Endpoint>> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(&format!(
            "UPDATE endpoints SET deleted_at = ?1 \
             WHERE id = ?2 AND deleted_at IS NULL RETURNING {ENDPOINT_COLUMNS}"
        ))
        .bind(now.0)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let deleted = row
            .as_ref()
            .map(rows::endpoint)
            .transpose()?
            .map(|(_, e)| e);
        if deleted.is_some() {
            changes::record(&mut tx, ConfigKind::Endpoint, id).await?;
        }
        tx.commit().await?;
        Ok(deleted)
    }

    // --- groups -----------------------------------------------------------------------

    async fn create_group(&self, group: NewGroup) -> Result<Group, GroupWriteError> {
        let mut tx = self.begin_write().await?;
        let created = tree::create(&mut tx, group).await?;
        changes::record(&mut tx, ConfigKind::Group, &created.id).await?;
        tx.commit().await?;
        Ok(created)
    }

    async fn group(&self, id: &str) -> StoreResult<Option<Group>> {
        let row = sqlx::query(&format!(
            "SELECT {GROUP_COLUMNS} FROM groups g WHERE g.id = ?1 AND g.deleted_at IS NULL"
        ))
        .bind(id)
        .fetch_optional(&self.read)
        .await?;
        Ok(row.as_ref().map(rows::group).transpose()?.map(|(_, g)| g))
    }

    async fn group_chain(&self, id: &str) -> StoreResult<Vec<Group>> {
        let mut conn = self.read.acquire().await?;
        tree::chain(&mut conn, id).await
    }

    async fn list_groups(
        &self,
        workspace_id: &str,
        filter: &GroupFilter,
        page: PageRequest,
    ) -> StoreResult<Page<Group>> {
        let (limit, after, fetch) = page_bounds(page);
        let mut query = QueryBuilder::new(format!(
            "SELECT {GROUP_COLUMNS} FROM groups g WHERE g.deleted_at IS NULL"
        ));
        query
            .push(" AND g.workspace_id = ")
            .push_bind(workspace_id.to_owned());
        if let Some(external_id) = &filter.external_entity_id {
            query
                .push(" AND g.external_entity_id = ")
                .push_bind(external_id.clone());
        }
        if let Some(parent_id) = &filter.parent_group_id {
            query
                .push(" AND g.parent_id = ")
                .push_bind(parent_id.clone());
        }
        query.push(" AND g.seq > ").push_bind(after);
        query.push(" ORDER BY g.seq LIMIT ").push_bind(fetch);
        fetch_page(&mut query, &self.read, limit, rows::group).await
    }

    async fn update_group(&self, id: &str, patch: GroupPatch) -> Result<Group, GroupWriteError> {
        let mut tx = self.begin_write().await?;
        let updated = tree::update(&mut tx, id, patch).await?;
        changes::record(&mut tx, ConfigKind::Group, id).await?;
        tx.commit().await?;
        Ok(updated)
    }

    async fn delete_group(
        &self,
        id: &str,
        now: Timestamp,
    ) -> StoreResult<Option<(Group, Timestamp)>> {
        let mut tx = self.begin_write().await?;
        let deleted = tree::delete(&mut tx, id, now).await?;
        if deleted.is_some() {
            // One row for the subtree's root: a mirror drops the whole subtree and its keys.
            changes::record(&mut tx, ConfigKind::Group, id).await?;
        }
        tx.commit().await?;
        Ok(deleted.map(|group| (group, now)))
    }

    // --- API keys ---------------------------------------------------------------------

    async fn insert_api_key(&self, key: NewApiKey) -> StoreResult<ApiKey> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO api_keys (prefix, group_id, hash, name, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .bind(&key.prefix)
        .bind(&key.group_id)
        .bind(&key.hash)
        .bind(&key.name)
        .bind(key.created_at.0)
        .execute(&mut *tx)
        .await
        .map_err(|e| duplicate_on(e, "api_keys.prefix", "prefix"))?;
        changes::record(&mut tx, ConfigKind::ApiKey, &key.prefix).await?;
        tx.commit().await?;
        Ok(ApiKey {
            group_id: key.group_id,
            prefix: key.prefix,
            hash: key.hash,
            name: key.name,
            created_at: key.created_at,
        })
    }

    async fn api_key(&self, group_id: &str, prefix: &str) -> StoreResult<Option<ApiKey>> {
        let row = sqlx::query(&format!(
            "SELECT {API_KEY_COLUMNS} FROM api_keys \
             WHERE group_id = ?1 AND prefix = ?2 AND revoked_at IS NULL AND {GROUP_IS_LIVE}"
        ))
        .bind(group_id)
        .bind(prefix)
        .fetch_optional(&self.read)
        .await?;
        Ok(row.as_ref().map(rows::api_key).transpose()?.map(|(_, k)| k))
    }

    async fn list_api_keys(&self, group_id: &str, page: PageRequest) -> StoreResult<Page<ApiKey>> {
        let (limit, after, fetch) = page_bounds(page);
        let mut query = QueryBuilder::new(format!(
            "SELECT {API_KEY_COLUMNS} FROM api_keys WHERE revoked_at IS NULL AND {GROUP_IS_LIVE}"
        ));
        query
            .push(" AND group_id = ")
            .push_bind(group_id.to_owned());
        query.push(" AND seq > ").push_bind(after);
        query.push(" ORDER BY seq LIMIT ").push_bind(fetch);
        fetch_page(&mut query, &self.read, limit, rows::api_key).await
    }

    async fn revoke_api_key(
        &self,
        group_id: &str,
        prefix: &str,
        now: Timestamp,
    ) -> StoreResult<Option<ApiKey>> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(&format!(
            "UPDATE api_keys SET revoked_at = ?1 \
             WHERE group_id = ?2 AND prefix = ?3 AND revoked_at IS NULL \
             RETURNING {API_KEY_COLUMNS}"
        ))
        .bind(now.0)
        .bind(group_id)
        .bind(prefix)
        .fetch_optional(&mut *tx)
        .await?;
        let revoked = row.as_ref().map(rows::api_key).transpose()?.map(|(_, k)| k);
        if revoked.is_some() {
            changes::record(&mut tx, ConfigKind::ApiKey, prefix).await?;
        }
        tx.commit().await?;
        Ok(revoked)
    }

    async fn api_key_prefix_exists(&self, prefix: &str) -> StoreResult<bool> {
        let row = sqlx::query("SELECT 1 FROM api_keys WHERE prefix = ?1")
            .bind(prefix)
            .fetch_optional(&self.read)
            .await?;
        Ok(row.is_some())
    }

    /// Two statements in one read transaction, so the key, its workspace and its chain
    /// come from the same snapshot: the live key with its workspace, then the chain.
    async fn resolve_api_key(&self, prefix: &str) -> StoreResult<Option<KeyGrant>> {
        let mut tx = self.read.begin().await?;
        let row = sqlx::query(&format!(
            "SELECT k.seq AS seq, k.group_id AS group_id, k.prefix AS prefix, \
             k.hash AS hash, k.name AS name, k.created_at AS created_at, \
             {JOINED_WORKSPACE_COLUMNS} \
             FROM api_keys k JOIN groups g ON g.id = k.group_id \
             JOIN workspaces w ON w.id = g.workspace_id \
             WHERE k.prefix = ?1 AND k.revoked_at IS NULL AND g.deleted_at IS NULL"
        ))
        .bind(prefix)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let (_, key) = rows::api_key(&row)?;
        let workspace = rows::joined_workspace(&row)?;
        let chain = tree::chain(&mut tx, &key.group_id).await?;
        tx.commit().await?;
        if chain.is_empty() {
            return Ok(None);
        }
        Ok(Some(KeyGrant {
            key,
            chain,
            workspace,
        }))
    }

    // --- configuration change log and bulk loads -----------------------------------------

    async fn config_changes_after(&self, after: i64, limit: u32) -> StoreResult<ConfigChanges> {
        changes::after(&self.read, after, limit).await
    }

    async fn newest_config_change(&self) -> StoreResult<i64> {
        changes::newest(&self.read).await
    }

    async fn prune_config_changes(&self, keep: Duration) -> StoreResult<u64> {
        let mut tx = self.begin_write().await?;
        let pruned = changes::prune(&mut tx, keep).await?;
        tx.commit().await?;
        Ok(pruned)
    }

    async fn workspaces_page(&self, page: PageRequest) -> StoreResult<Page<Workspace>> {
        changes::workspaces(&self.read, page).await
    }

    async fn live_groups_page(&self, page: PageRequest) -> StoreResult<Page<Group>> {
        changes::live_groups(&self.read, page).await
    }

    async fn live_api_keys_page(&self, page: PageRequest) -> StoreResult<Page<ApiKey>> {
        changes::live_api_keys(&self.read, page).await
    }

    async fn live_endpoints_page(&self, page: PageRequest) -> StoreResult<Page<Endpoint>> {
        changes::live_endpoints(&self.read, page).await
    }

    async fn live_secrets_page(&self, page: PageRequest) -> StoreResult<Page<Secret>> {
        changes::live_secrets(&self.read, page).await
    }

    // --- usage ------------------------------------------------------------------------

    /// Idempotent on `idempotency_key`: storing the same event twice (a spool replayed
    /// after a crash) keeps the first copy.
    async fn insert_usage_event(&self, event: &UsageEvent) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO usage_events (idempotency_key, timestamp, request_id, \
             request_metadata, model_slug, external_entity_id, api_key_prefix, group_id, \
             workspace_id, status, input_tokens, output_tokens, cached_input_tokens, \
             is_estimated) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14) \
             ON CONFLICT (idempotency_key) DO NOTHING",
        )
        .bind(&event.idempotency_key)
        .bind(event.timestamp.0)
        .bind(&event.request_id)
        .bind(&event.request_metadata)
        .bind(&event.model_slug)
        .bind(&event.external_entity_id)
        .bind(&event.api_key_prefix)
        .bind(&event.group_id)
        .bind(&event.workspace_id)
        .bind(event.status.as_str())
        .bind(rows::token_count(event.input_tokens))
        .bind(rows::token_count(event.output_tokens))
        .bind(rows::token_count(event.cached_input_tokens))
        .bind(event.is_estimated)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    /// One multi-row INSERT, which SQLite runs as one implicit transaction: atomic, one
    /// commit (one WAL write) for the whole batch, and one round trip to the connection's
    /// thread instead of three for BEGIN / INSERT / COMMIT — under CPU load each round
    /// trip waits for a thread to be scheduled. Larger batches take several statements in
    /// one `BEGIN IMMEDIATE` transaction.
    async fn insert_usage_events(&self, events: &[UsageEvent]) -> StoreResult<()> {
        if events.is_empty() {
            return Ok(());
        }
        if events.len() <= USAGE_ROWS_PER_STATEMENT {
            usage_insert(events).build().execute(&self.write).await?;
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        for chunk in events.chunks(USAGE_ROWS_PER_STATEMENT) {
            usage_insert(chunk).build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn list_usage_events(
        &self,
        filter: &UsageFilter,
        page: PageRequest,
    ) -> StoreResult<Page<UsageEvent>> {
        let (limit, after, fetch) = page_bounds(page);
        let mut query = QueryBuilder::new(format!(
            "SELECT {USAGE_EVENT_COLUMNS} FROM usage_events WHERE 1 = 1"
        ));
        if let Some(workspace_id) = &filter.workspace_id {
            query
                .push(" AND workspace_id = ")
                .push_bind(workspace_id.clone());
        }
        if let Some(group_id) = &filter.group_id {
            query.push(" AND group_id = ").push_bind(group_id.clone());
        }
        if let Some(request_id) = &filter.request_id {
            query
                .push(" AND request_id = ")
                .push_bind(request_id.clone());
        }
        if let Some(external_id) = &filter.external_entity_id {
            query
                .push(" AND external_entity_id = ")
                .push_bind(external_id.clone());
        }
        if let Some(prefix) = &filter.api_key_prefix {
            query
                .push(" AND api_key_prefix = ")
                .push_bind(prefix.clone());
        }
        if let Some(start) = filter.start_time {
            query.push(" AND timestamp >= ").push_bind(start.0);
        }
        if let Some(end) = filter.end_time {
            query.push(" AND timestamp < ").push_bind(end.0);
        }
        query.push(" AND seq > ").push_bind(after);
        query.push(" ORDER BY seq LIMIT ").push_bind(fetch);
        fetch_page(&mut query, &self.read, limit, rows::usage_event).await
    }

    async fn day_usage(
        &self,
        group_ids: &[String],
        slug: &str,
        day_start: Timestamp,
    ) -> StoreResult<Option<DayUsage>> {
        if group_ids.is_empty() {
            return Ok(None);
        }
        // The ids go in as one JSON array rather than one parameter each: a CASCADING
        // root's pool can hold more groups than SQLite allows parameters (32,766), and
        // the index on (group_id, model_slug, timestamp) is still searched id by id.
        let ids = serde_json::to_string(group_ids)
            .map_err(|e| StoreError::Corrupt(format!("group ids as JSON: {e}")))?;
        let row = sqlx::query(
            "SELECT COUNT(*) AS requests, \
             COALESCE(SUM(input_tokens + output_tokens), 0) AS tokens \
             FROM usage_events \
             WHERE group_id IN (SELECT value FROM json_each(?1)) \
             AND model_slug = ?2 AND timestamp >= ?3 AND timestamp < ?4",
        )
        .bind(ids)
        .bind(slug)
        .bind(day_start.0)
        .bind(day_start.0.saturating_add(tollgate_core::clock::DAY_MS))
        .fetch_one(&self.read)
        .await?;
        let requests: i64 = sqlx::Row::try_get(&row, "requests")?;
        let tokens: i64 = sqlx::Row::try_get(&row, "tokens")?;
        if requests == 0 {
            return Ok(None);
        }
        Ok(Some(DayUsage {
            requests: u64::try_from(requests).unwrap_or(0),
            tokens: u64::try_from(tokens).unwrap_or(0),
        }))
    }

    async fn pool_descendant_ids(&self, id: &str) -> StoreResult<Vec<String>> {
        let mut conn = self.read.acquire().await?;
        tree::descendant_ids_with_deleted(&mut conn, id).await
    }

    // --- billing webhooks -------------------------------------------------------------

    async fn insert_webhook_endpoint(
        &self,
        endpoint: NewWebhookEndpoint,
    ) -> StoreResult<WebhookEndpoint> {
        let mut tx = self.begin_write().await?;
        let created = webhooks::insert_endpoint(&mut tx, endpoint).await?;
        tx.commit().await?;
        Ok(created)
    }

    async fn webhook_endpoint(&self, id: &str) -> StoreResult<Option<WebhookEndpoint>> {
        webhooks::endpoint_by_id(&self.read, id).await
    }

    async fn list_webhook_endpoints(
        &self,
        workspace_id: &str,
        page: PageRequest,
    ) -> StoreResult<Page<WebhookEndpoint>> {
        webhooks::list_endpoints(&self.read, workspace_id, page).await
    }

    async fn all_webhook_endpoints(&self) -> StoreResult<Vec<WebhookEndpoint>> {
        webhooks::all_endpoints(&self.read).await
    }

    async fn delete_webhook_endpoint(
        &self,
        id: &str,
        now: Timestamp,
    ) -> StoreResult<Option<WebhookEndpoint>> {
        webhooks::delete_endpoint(&self.write, id, now).await
    }

    async fn rotate_webhook_secret(
        &self,
        webhook_id: &str,
        ciphertext: Vec<u8>,
        now: Timestamp,
        retire_at: Timestamp,
    ) -> StoreResult<Option<WebhookSecret>> {
        let mut tx = self.begin_write().await?;
        let rotated =
            webhooks::rotate_secret(&mut tx, webhook_id, ciphertext, now, retire_at).await?;
        tx.commit().await?;
        Ok(rotated)
    }

    async fn webhook_secrets(
        &self,
        webhook_id: &str,
        now: Timestamp,
    ) -> StoreResult<Vec<WebhookSecret>> {
        webhooks::live_secrets(&self.read, webhook_id, now).await
    }

    async fn usage_events_after(
        &self,
        workspace_id: &str,
        after: i64,
        limit: u32,
    ) -> StoreResult<Vec<SequencedUsageEvent>> {
        webhooks::events_after(&self.read, workspace_id, after, limit).await
    }

    async fn cut_webhook_batch(
        &self,
        delivery: NewWebhookDelivery,
        expected_cursor: i64,
    ) -> StoreResult<bool> {
        let mut tx = self.begin_write().await?;
        let cut = webhooks::cut_batch(&mut tx, delivery, expected_cursor).await?;
        if cut {
            tx.commit().await?;
        } else {
            tx.rollback().await?;
        }
        Ok(cut)
    }

    async fn claim_due_webhook_deliveries(
        &self,
        now: Timestamp,
        lease_until: Timestamp,
        limit: u32,
    ) -> StoreResult<Vec<WebhookDelivery>> {
        webhooks::claim_due(&self.write, now, lease_until, limit).await
    }

    async fn release_webhook_delivery(&self, id: &str) -> StoreResult<()> {
        webhooks::release(&self.write, id).await
    }

    async fn record_webhook_attempt(
        &self,
        id: &str,
        attempt: WebhookAttempt,
    ) -> StoreResult<Option<WebhookDelivery>> {
        webhooks::record_attempt(&self.write, id, attempt).await
    }

    async fn webhook_delivery(&self, id: &str) -> StoreResult<Option<WebhookDelivery>> {
        webhooks::delivery_by_id(&self.read, id).await
    }

    async fn list_webhook_deliveries(
        &self,
        webhook_id: &str,
        page: PageRequest,
    ) -> StoreResult<Page<WebhookDelivery>> {
        webhooks::list_deliveries(&self.read, webhook_id, page).await
    }

    async fn retry_webhook_delivery(
        &self,
        id: &str,
        now: Timestamp,
    ) -> StoreResult<Option<WebhookDelivery>> {
        webhooks::reset_for_retry(&self.write, id, now).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Location {
        fn parse_ok(url: &str) -> Location {
            Location::parse(url).unwrap()
        }
    }

    #[test]
    fn database_urls_with_options_or_no_path_are_refused() {
        assert_eq!(
            Location::parse("sqlite://t.db?mode=ro"),
            Err(
                "SQLite URL options are not supported (in 'sqlite://t.db?mode=ro'); \
                 give the path alone"
                    .into()
            )
        );
        assert_eq!(
            Location::parse("sqlite:"),
            Err("the SQLite database path is empty".into())
        );
        assert_eq!(
            Location::parse(""),
            Err("the SQLite database path is empty".into())
        );
        assert_eq!(
            Location::parse_ok("odd?name.db"),
            Location::File(PathBuf::from("odd?name.db"))
        );
    }

    #[test]
    fn database_urls_name_a_file_or_memory() {
        assert_eq!(
            Location::parse_ok("sqlite://tollgate.db"),
            Location::File(PathBuf::from("tollgate.db"))
        );
        assert_eq!(
            Location::parse_ok("sqlite:data/t.db"),
            Location::File(PathBuf::from("data/t.db"))
        );
        assert_eq!(
            Location::parse_ok("sqlite:///var/lib/tollgate.db"),
            Location::File(PathBuf::from("/var/lib/tollgate.db"))
        );
        assert_eq!(
            Location::parse_ok("/tmp/x.db"),
            Location::File(PathBuf::from("/tmp/x.db"))
        );
        assert_eq!(Location::parse_ok("sqlite::memory:"), Location::Memory);
    }
}
