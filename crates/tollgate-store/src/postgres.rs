//! The PostgreSQL store: one pool, the same schema and semantics as SQLite, for several
//! Tollgate instances sharing one database.
//!
//! What SQLite gets from its single writer is made explicit here:
//! - tree writes (group create / patch / delete) take a per-workspace advisory
//!   transaction lock before reading the tree they check (`tree.rs`);
//! - usage-event inserts take one global advisory transaction lock
//!   ([`lock_usage_inserts`]) so their sequence numbers become visible in order;
//! - webhook cuts are compare-and-set on the cursor row, claims use `SKIP LOCKED`
//!   (`webhooks.rs`).
//!
//! [`PostgresStore::connect_in_schema`] keeps all tables in one schema (created when
//! missing), so several stores (or test runs) can share a database.

mod changes;
mod rows;
mod tree;
mod webhooks;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{ConnectOptions, Connection, Executor, PgConnection, Postgres, QueryBuilder};
use std::str::FromStr;
use std::time::Duration;
use tollgate_core::endpoint::Target;
use tollgate_core::ids::{new_id, IdKind};
use tollgate_core::{Group, Timestamp};

use crate::sqlite::rows::{
    into_page, region_str, targets_json, token_count, Sequenced, API_KEY_COLUMNS, ENDPOINT_COLUMNS,
    GROUP_COLUMNS, JOINED_WORKSPACE_COLUMNS, MANAGEMENT_KEY_COLUMNS, SECRET_COLUMNS,
    USAGE_EVENT_COLUMNS, WORKSPACE_COLUMNS,
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

/// Keys read through the management API belong to a live group (see the SQLite store).
const GROUP_IS_LIVE: &str = "EXISTS (SELECT 1 FROM groups g \
     WHERE g.id = api_keys.group_id AND g.deleted_at IS NULL)";

/// Connections per store. Every instance of a deployment opens this many, so it stays
/// well under PostgreSQL's default `max_connections` of 100 for a handful of instances.
const MAX_CONNECTIONS: u32 = 10;

/// How long a query waits for a pooled connection (the default is 30 s). A database that
/// is down fails every call within this, so the data plane answers from memory and the
/// management API answers 503 instead of hanging.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest wait for the first connection at start-up: a server that accepts and never
/// answers (a wrong port behind a proxy, a hung server) is an error, not a start that
/// waits forever.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Usage events per INSERT statement: 14 parameters each, 3,584 per statement, well under
/// PostgreSQL's 65,535.
const USAGE_ROWS_PER_STATEMENT: usize = 256;

/// The advisory lock every usage-event insert transaction holds ("tollgate" in ASCII).
const USAGE_INSERT_LOCK: i64 = 0x746f_6c6c_6761_7465;

#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connects to `url` (`postgres://...`) and applies migrations in the connection's
    /// default schema.
    pub async fn connect(url: &str) -> StoreResult<PostgresStore> {
        Self::open(url, None, CONNECT_TIMEOUT).await
    }

    /// Like [`PostgresStore::connect`], with every table in `schema`: the schema is
    /// created when missing, and every pooled connection gets `search_path` set to it
    /// when it connects.
    pub async fn connect_in_schema(url: &str, schema: &str) -> StoreResult<PostgresStore> {
        if schema.is_empty() {
            return Err(StoreError::Database(sqlx::Error::Configuration(
                "the PostgreSQL schema name is empty".into(),
            )));
        }
        Self::open(url, Some(schema), CONNECT_TIMEOUT).await
    }

    /// Migrates on one connection of its own first: an unreachable server is an error at
    /// once (a pool would keep retrying for its acquire timeout), and the pool only opens
    /// once the schema is in place.
    async fn open(
        url: &str,
        schema: Option<&str>,
        connect_timeout: Duration,
    ) -> StoreResult<PostgresStore> {
        let options = PgConnectOptions::from_str(url)?;
        let set_path =
            schema.map(|schema| format!("SET search_path TO {}", quote_identifier(schema)));
        let mut conn = tokio::time::timeout(connect_timeout, options.connect())
            .await
            .map_err(|_| {
                sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer from PostgreSQL within {connect_timeout:?}"),
                ))
            })??;
        if let Some(schema) = schema {
            conn.execute(
                format!("CREATE SCHEMA IF NOT EXISTS {}", quote_identifier(schema)).as_str(),
            )
            .await?;
        }
        if let Some(set_path) = &set_path {
            conn.execute(set_path.as_str()).await?;
        }
        sqlx::migrate!("./migrations/postgres")
            .run(&mut conn)
            .await?;
        conn.close().await?;

        let mut pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT);
        if let Some(set_path) = set_path {
            pool = pool.after_connect(move |conn, _meta| {
                let set_path = set_path.clone();
                Box::pin(async move {
                    conn.execute(set_path.as_str()).await?;
                    Ok(())
                })
            });
        }
        Ok(PostgresStore {
            pool: pool.connect_with(options).await?,
        })
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// A connection of the pool listening on the configuration change channel
    /// (`tollgate_config`, every change's `seq` as the payload): what wakes a
    /// `MirroredStore`'s refresher. It holds one of the pool's connections until dropped.
    pub async fn listen_for_config_changes(&self) -> StoreResult<sqlx::postgres::PgListener> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        listener.listen(changes::CHANNEL).await?;
        Ok(listener)
    }
}

/// `schema` as a quoted SQL identifier (`"a""b"` for `a"b`).
fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Serializes usage-event inserts across every connection and instance until the
/// transaction ends.
///
/// The webhook batcher and the events pull API page by `seq` and move their cursor past
/// the largest one they saw (`Store::usage_events_after`). PostgreSQL hands out identity
/// values when a row is inserted, not when it commits: two concurrent transactions could
/// take 7 and 8, the one holding 8 commit first, a reader see 8 and move its cursor past
/// 7 — which then commits and is never sent. Holding this lock from before the INSERT to
/// the commit means a transaction takes its numbers only after every earlier one is
/// visible (PostgreSQL makes a commit visible before it releases the transaction's
/// locks), so numbers become visible in increasing order. The data plane writes events
/// in group-commit batches, so the lock is taken once per batch, not per request.
/// Pinned by `usage_sequence_numbers_become_visible_in_order` in
/// `tests/conformance_postgres.rs`.
pub(super) async fn lock_usage_inserts(conn: &mut PgConnection) -> StoreResult<()> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(USAGE_INSERT_LOCK)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The constraint or index a UNIQUE violation broke, if that is what `e` is.
fn unique_violation(e: &sqlx::Error) -> Option<&str> {
    match e {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            Some(db.constraint().unwrap_or(""))
        }
        _ => None,
    }
}

/// Maps a UNIQUE violation of `constraint` to `Duplicate(what)`, any other one to
/// `Duplicate("id")` (a clash of random ids), and everything else to a database error.
fn duplicate_on(e: sqlx::Error, constraint: &str, what: &'static str) -> StoreError {
    match unique_violation(&e) {
        Some(broken) if broken == constraint => StoreError::Duplicate(what),
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
fn usage_insert(events: &[UsageEvent]) -> QueryBuilder<'_, Postgres> {
    let mut query = QueryBuilder::<Postgres>::new(
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
            .push_bind(token_count(event.input_tokens))
            .push_bind(token_count(event.output_tokens))
            .push_bind(token_count(event.cached_input_tokens))
            .push_bind(event.is_estimated);
    });
    query.push(" ON CONFLICT (idempotency_key) DO NOTHING");
    query
}

async fn fetch_page<T>(
    query: &mut QueryBuilder<'_, Postgres>,
    pool: &PgPool,
    limit: usize,
    decode: fn(&PgRow) -> StoreResult<Sequenced<T>>,
) -> StoreResult<Page<T>> {
    let found = query.build().fetch_all(pool).await?;
    let decoded = found.iter().map(decode).collect::<StoreResult<Vec<_>>>()?;
    Ok(into_page(decoded, limit))
}

async fn workspace_by_id(conn: &mut PgConnection, id: &str) -> StoreResult<Option<Workspace>> {
    let row = sqlx::query(&format!(
        "SELECT {WORKSPACE_COLUMNS} FROM workspaces WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(rows::workspace).transpose()
}

#[async_trait]
impl Store for PostgresStore {
    // --- workspaces -------------------------------------------------------------------

    async fn create_workspace(&self, name: &str, now: Timestamp) -> StoreResult<Workspace> {
        let workspace = Workspace {
            id: new_id(IdKind::Workspace),
            name: name.to_owned(),
            is_enabled: true,
            signing_key: None,
            created_at: now,
        };
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO workspaces (id, name, is_enabled, created_at) VALUES ($1, $2, TRUE, $3)",
        )
        .bind(&workspace.id)
        .bind(&workspace.name)
        .bind(now.0)
        .execute(&mut *tx)
        .await
        .map_err(|e| duplicate_on(e, "workspaces_name_key", "workspace"))?;
        changes::record(&mut tx, ConfigKind::Workspace, &workspace.id).await?;
        tx.commit().await?;
        Ok(workspace)
    }

    async fn workspace_by_name(&self, name: &str) -> StoreResult<Option<Workspace>> {
        let row = sqlx::query(&format!(
            "SELECT {WORKSPACE_COLUMNS} FROM workspaces WHERE name = $1"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(rows::workspace).transpose()
    }

    async fn workspace(&self, id: &str) -> StoreResult<Option<Workspace>> {
        let mut conn = self.pool.acquire().await?;
        workspace_by_id(&mut conn, id).await
    }

    async fn set_workspace_enabled(&self, name: &str, enabled: bool) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        let id: Option<String> = sqlx::query_scalar(
            "UPDATE workspaces SET is_enabled = $1 WHERE name = $2 RETURNING id",
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
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("UPDATE workspaces SET signing_key = $1 WHERE id = $2")
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
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&key.prefix)
        .bind(&key.workspace_id)
        .bind(&key.hash)
        .bind(&key.name)
        .bind(key.scope.as_str())
        .bind(key.created_at.0)
        .execute(&self.pool)
        .await
        .map_err(|e| duplicate_on(e, "management_keys_prefix_key", "prefix"))?;
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
        let mut tx = self.pool.begin().await?;
        let live =
            sqlx::query("SELECT 1 FROM management_keys WHERE hash = $1 AND revoked_at IS NULL")
                .bind(&key.hash)
                .fetch_optional(&mut *tx)
                .await?;
        if live.is_none() {
            sqlx::query(
                "INSERT INTO management_keys \
                 (prefix, workspace_id, hash, name, scope, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
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
        let mut conn = self.pool.acquire().await?;
        let row = sqlx::query(&format!(
            "SELECT {MANAGEMENT_KEY_COLUMNS} FROM management_keys \
             WHERE prefix = $1 AND revoked_at IS NULL"
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
        fetch_page(&mut query, &self.pool, limit, rows::management_key).await
    }

    async fn revoke_management_key(
        &self,
        workspace_id: &str,
        prefix: &str,
        now: Timestamp,
    ) -> StoreResult<Option<ManagementKey>> {
        let row = sqlx::query(&format!(
            "UPDATE management_keys SET revoked_at = $1 \
             WHERE workspace_id = $2 AND prefix = $3 AND revoked_at IS NULL \
             RETURNING {MANAGEMENT_KEY_COLUMNS}"
        ))
        .bind(now.0)
        .bind(workspace_id)
        .bind(prefix)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row
            .as_ref()
            .map(rows::management_key)
            .transpose()?
            .map(|(_, key)| key))
    }

    // --- secrets ----------------------------------------------------------------------

    async fn insert_secret(&self, secret: NewSecret) -> StoreResult<Secret> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO secrets (id, workspace_id, name, ciphertext, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&secret.id)
        .bind(&secret.workspace_id)
        .bind(&secret.name)
        .bind(&secret.ciphertext)
        .bind(secret.created_at.0)
        .execute(&mut *tx)
        .await
        .map_err(|e| duplicate_on(e, "secrets_live_name", "name"))?;
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
            "SELECT {SECRET_COLUMNS} FROM secrets WHERE id = $1 AND deleted_at IS NULL"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
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
        fetch_page(&mut query, &self.pool, limit, rows::secret).await
    }

    async fn delete_secret(&self, id: &str, now: Timestamp) -> StoreResult<Option<Secret>> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!(
            "UPDATE secrets SET deleted_at = $1 WHERE id = $2 AND deleted_at IS NULL \
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
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO endpoints \
             (id, workspace_id, slug, region, targets, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $6)",
        )
        .bind(&endpoint.id)
        .bind(&endpoint.workspace_id)
        .bind(&endpoint.slug)
        .bind(region_str(endpoint.region))
        .bind(targets_json(&endpoint.targets)?)
        .bind(endpoint.created_at.0)
        .execute(&mut *tx)
        .await
        .map_err(|e| duplicate_on(e, "endpoints_live_slug", "slug"))?;
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
            "SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE id = $1 AND deleted_at IS NULL"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
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
             WHERE slug = $1 AND deleted_at IS NULL"
        ))
        .bind(slug)
        .fetch_optional(&self.pool)
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
        fetch_page(&mut query, &self.pool, limit, rows::endpoint).await
    }

    async fn update_endpoint_targets(
        &self,
        id: &str,
        targets: &[Target],
        now: Timestamp,
    ) -> StoreResult<Option<Endpoint>> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!(
            "UPDATE endpoints SET targets = $1, updated_at = $2 \
             WHERE id = $3 AND deleted_at IS NULL RETURNING {ENDPOINT_COLUMNS}"
        ))
        .bind(targets_json(targets)?)
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
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!(
            "UPDATE endpoints SET deleted_at = $1 \
             WHERE id = $2 AND deleted_at IS NULL RETURNING {ENDPOINT_COLUMNS}"
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
        let mut tx = self.pool.begin().await?;
        let created = tree::create(&mut tx, group).await?;
        changes::record(&mut tx, ConfigKind::Group, &created.id).await?;
        tx.commit().await?;
        Ok(created)
    }

    async fn group(&self, id: &str) -> StoreResult<Option<Group>> {
        let row = sqlx::query(&format!(
            "SELECT {GROUP_COLUMNS} FROM groups g WHERE g.id = $1 AND g.deleted_at IS NULL"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(rows::group).transpose()?.map(|(_, g)| g))
    }

    async fn group_chain(&self, id: &str) -> StoreResult<Vec<Group>> {
        let mut conn = self.pool.acquire().await?;
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
        fetch_page(&mut query, &self.pool, limit, rows::group).await
    }

    async fn update_group(&self, id: &str, patch: GroupPatch) -> Result<Group, GroupWriteError> {
        let mut tx = self.pool.begin().await?;
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
        let mut tx = self.pool.begin().await?;
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
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO api_keys (prefix, group_id, hash, name, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&key.prefix)
        .bind(&key.group_id)
        .bind(&key.hash)
        .bind(&key.name)
        .bind(key.created_at.0)
        .execute(&mut *tx)
        .await
        .map_err(|e| duplicate_on(e, "api_keys_prefix_key", "prefix"))?;
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
             WHERE group_id = $1 AND prefix = $2 AND revoked_at IS NULL AND {GROUP_IS_LIVE}"
        ))
        .bind(group_id)
        .bind(prefix)
        .fetch_optional(&self.pool)
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
        fetch_page(&mut query, &self.pool, limit, rows::api_key).await
    }

    async fn revoke_api_key(
        &self,
        group_id: &str,
        prefix: &str,
        now: Timestamp,
    ) -> StoreResult<Option<ApiKey>> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!(
            "UPDATE api_keys SET revoked_at = $1 \
             WHERE group_id = $2 AND prefix = $3 AND revoked_at IS NULL \
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
        let row = sqlx::query("SELECT 1 FROM api_keys WHERE prefix = $1")
            .bind(prefix)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    /// Two statements in one REPEATABLE READ transaction, so the key, its workspace and
    /// its chain come from the same snapshot: the live key with its workspace, then the
    /// chain.
    async fn resolve_api_key(&self, prefix: &str) -> StoreResult<Option<KeyGrant>> {
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let row = sqlx::query(&format!(
            "SELECT k.seq AS seq, k.group_id AS group_id, k.prefix AS prefix, \
             k.hash AS hash, k.name AS name, k.created_at AS created_at, \
             {JOINED_WORKSPACE_COLUMNS} \
             FROM api_keys k JOIN groups g ON g.id = k.group_id \
             JOIN workspaces w ON w.id = g.workspace_id \
             WHERE k.prefix = $1 AND k.revoked_at IS NULL AND g.deleted_at IS NULL"
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
        changes::after(&self.pool, after, limit).await
    }

    async fn newest_config_change(&self) -> StoreResult<i64> {
        changes::newest(&self.pool).await
    }

    async fn prune_config_changes(&self, keep: std::time::Duration) -> StoreResult<u64> {
        changes::prune(&self.pool, keep).await
    }

    async fn workspaces_page(&self, page: PageRequest) -> StoreResult<Page<Workspace>> {
        changes::workspaces(&self.pool, page).await
    }

    async fn live_groups_page(&self, page: PageRequest) -> StoreResult<Page<Group>> {
        changes::live_groups(&self.pool, page).await
    }

    async fn live_api_keys_page(&self, page: PageRequest) -> StoreResult<Page<ApiKey>> {
        changes::live_api_keys(&self.pool, page).await
    }

    async fn live_endpoints_page(&self, page: PageRequest) -> StoreResult<Page<Endpoint>> {
        changes::live_endpoints(&self.pool, page).await
    }

    async fn live_secrets_page(&self, page: PageRequest) -> StoreResult<Page<Secret>> {
        changes::live_secrets(&self.pool, page).await
    }

    // --- usage ------------------------------------------------------------------------

    /// Idempotent on `idempotency_key`: storing the same event twice (a spool replayed
    /// after a crash) keeps the first copy.
    async fn insert_usage_event(&self, event: &UsageEvent) -> StoreResult<()> {
        self.insert_usage_events(std::slice::from_ref(event)).await
    }

    /// One transaction under the usage-insert lock (`lock_usage_inserts`), one multi-row
    /// INSERT per 256 events.
    async fn insert_usage_events(&self, events: &[UsageEvent]) -> StoreResult<()> {
        if events.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        lock_usage_inserts(&mut tx).await?;
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
        fetch_page(&mut query, &self.pool, limit, rows::usage_event).await
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
        // SUM over BIGINT is NUMERIC in PostgreSQL; the day's tokens fit a BIGINT.
        let row = sqlx::query(
            "SELECT COUNT(*) AS requests, \
             COALESCE(SUM(input_tokens + output_tokens), 0)::BIGINT AS tokens \
             FROM usage_events WHERE group_id = ANY($1) AND model_slug = $2 \
             AND timestamp >= $3 AND timestamp < $4",
        )
        .bind(group_ids)
        .bind(slug)
        .bind(day_start.0)
        .bind(day_start.0.saturating_add(tollgate_core::clock::DAY_MS))
        .fetch_one(&self.pool)
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
        let mut conn = self.pool.acquire().await?;
        tree::descendant_ids_with_deleted(&mut conn, id).await
    }

    // --- billing webhooks -------------------------------------------------------------

    async fn insert_webhook_endpoint(
        &self,
        endpoint: NewWebhookEndpoint,
    ) -> StoreResult<WebhookEndpoint> {
        let mut tx = self.pool.begin().await?;
        let created = webhooks::insert_endpoint(&mut tx, endpoint).await?;
        tx.commit().await?;
        Ok(created)
    }

    async fn webhook_endpoint(&self, id: &str) -> StoreResult<Option<WebhookEndpoint>> {
        webhooks::endpoint_by_id(&self.pool, id).await
    }

    async fn list_webhook_endpoints(
        &self,
        workspace_id: &str,
        page: PageRequest,
    ) -> StoreResult<Page<WebhookEndpoint>> {
        webhooks::list_endpoints(&self.pool, workspace_id, page).await
    }

    async fn all_webhook_endpoints(&self) -> StoreResult<Vec<WebhookEndpoint>> {
        webhooks::all_endpoints(&self.pool).await
    }

    async fn delete_webhook_endpoint(
        &self,
        id: &str,
        now: Timestamp,
    ) -> StoreResult<Option<WebhookEndpoint>> {
        webhooks::delete_endpoint(&self.pool, id, now).await
    }

    async fn rotate_webhook_secret(
        &self,
        webhook_id: &str,
        ciphertext: Vec<u8>,
        now: Timestamp,
        retire_at: Timestamp,
    ) -> StoreResult<Option<WebhookSecret>> {
        let mut tx = self.pool.begin().await?;
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
        webhooks::live_secrets(&self.pool, webhook_id, now).await
    }

    async fn usage_events_after(
        &self,
        workspace_id: &str,
        after: i64,
        limit: u32,
    ) -> StoreResult<Vec<SequencedUsageEvent>> {
        webhooks::events_after(&self.pool, workspace_id, after, limit).await
    }

    async fn cut_webhook_batch(
        &self,
        delivery: NewWebhookDelivery,
        expected_cursor: i64,
    ) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
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
        webhooks::claim_due(&self.pool, now, lease_until, limit).await
    }

    async fn release_webhook_delivery(&self, id: &str) -> StoreResult<()> {
        webhooks::release(&self.pool, id).await
    }

    async fn record_webhook_attempt(
        &self,
        id: &str,
        attempt: WebhookAttempt,
    ) -> StoreResult<Option<WebhookDelivery>> {
        webhooks::record_attempt(&self.pool, id, attempt).await
    }

    async fn webhook_delivery(&self, id: &str) -> StoreResult<Option<WebhookDelivery>> {
        webhooks::delivery_by_id(&self.pool, id).await
    }

    async fn list_webhook_deliveries(
        &self,
        webhook_id: &str,
        page: PageRequest,
    ) -> StoreResult<Page<WebhookDelivery>> {
        webhooks::list_deliveries(&self.pool, webhook_id, page).await
    }

    async fn retry_webhook_delivery(
        &self,
        id: &str,
        now: Timestamp,
    ) -> StoreResult<Option<WebhookDelivery>> {
        webhooks::reset_for_retry(&self.pool, id, now).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_server_that_accepts_and_never_answers_is_an_error() {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("postgres://u@{}/x", silent.local_addr().unwrap());
        let error = PostgresStore::open(&url, None, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "database error: error communicating with database: no answer from PostgreSQL \
             within 200ms"
        );
    }
}
