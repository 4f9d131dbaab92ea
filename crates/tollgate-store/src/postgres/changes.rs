//! The configuration change log in PostgreSQL and the bulk loads a mirror starts from.
//!
//! `record` runs last in the writing transaction: it takes one global advisory lock
//! ([`CONFIG_CHANGE_LOCK`]), inserts the row and queues `pg_notify('tollgate_config',
//! seq)`, delivered at commit. As with usage events (`lock_usage_inserts`), the lock
//! held from before the number is taken until the commit makes numbers visible in
//! increasing order, so a mirror that moves its cursor past N never misses a change
//! numbered below N. Pinned by `config_changes_become_visible_in_order` in
//! `tests/conformance_postgres.rs`.
//!
//! Lock order: a tree write takes its workspace's tree lock first and this lock last;
//! no transaction takes them the other way round. Once a transaction holds this lock it
//! only inserts a new row into `config_changes` and commits — it waits for no row lock —
//! so whoever holds it always finishes, and nobody waiting for it can be part of a cycle.

use std::time::Duration;

use sqlx::{PgConnection, PgPool, QueryBuilder};
use tollgate_core::Group;

use super::{fetch_page, page_bounds, rows, GROUP_IS_LIVE};
use crate::sqlite::rows::{
    API_KEY_COLUMNS, CONFIG_CHANGE_COLUMNS, ENDPOINT_COLUMNS, GROUP_COLUMNS, SECRET_COLUMNS,
    WORKSPACE_COLUMNS,
};
use crate::{
    ApiKey, ConfigChanges, ConfigKind, Endpoint, Page, PageRequest, Secret, StoreResult, Workspace,
};

/// The advisory lock every change-log insert holds until its commit ("tgconfig" in
/// ASCII); distinct from the usage-insert lock, so configuration writes never wait for
/// usage batches.
const CONFIG_CHANGE_LOCK: i64 = 0x7467_636f_6e66_6967;

/// The channel every change is announced on, with its `seq` as the payload. One channel
/// per database: a listener woken by another schema's change only reads its own log and
/// finds nothing new.
pub(crate) const CHANNEL: &str = "tollgate_config";

/// The database's clock in milliseconds since the epoch.
const NOW_MS: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::BIGINT";

/// Appends one change and announces it; call it as the last statement before the commit
/// of the write it describes.
pub(super) async fn record(
    conn: &mut PgConnection,
    kind: ConfigKind,
    object_id: &str,
) -> StoreResult<()> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(CONFIG_CHANGE_LOCK)
        .execute(&mut *conn)
        .await?;
    sqlx::query(&format!(
        "WITH change AS ( \
             INSERT INTO config_changes (kind, object_id, changed_at) \
             VALUES ($1, $2, {NOW_MS}) RETURNING seq \
         ) \
         SELECT pg_notify('{CHANNEL}', seq::TEXT) FROM change"
    ))
    .bind(kind.as_str())
    .bind(object_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The page of changes and the pruning mark, from one snapshot.
pub(super) async fn after(pool: &PgPool, after: i64, limit: u32) -> StoreResult<ConfigChanges> {
    let mut tx = pool
        .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let found = sqlx::query(&format!(
        "SELECT {CONFIG_CHANGE_COLUMNS} FROM config_changes WHERE seq > $1 ORDER BY seq LIMIT $2"
    ))
    .bind(after)
    .bind(i64::from(limit.max(1)))
    .fetch_all(&mut *tx)
    .await?;
    let pruned_through: i64 =
        sqlx::query_scalar("SELECT through_seq FROM config_changes_pruned WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?;
    tx.commit().await?;
    Ok(ConfigChanges {
        changes: found
            .iter()
            .map(rows::config_change)
            .collect::<StoreResult<_>>()?,
        pruned_through,
    })
}

pub(super) async fn newest(pool: &PgPool) -> StoreResult<i64> {
    Ok(
        sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0)::BIGINT FROM config_changes")
            .fetch_one(pool)
            .await?,
    )
}

/// Deletes what is older than `keep` except the newest row, and moves the mark (one
/// transaction; the mark's row lock serializes two instances pruning at once).
pub(super) async fn prune(pool: &PgPool, keep: Duration) -> StoreResult<u64> {
    let keep_ms = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT through_seq FROM config_changes_pruned WHERE id = 1 FOR UPDATE")
        .execute(&mut *tx)
        .await?;
    let deleted: Vec<i64> = sqlx::query_scalar(&format!(
        "DELETE FROM config_changes WHERE changed_at < {NOW_MS} - $1 \
         AND seq < (SELECT MAX(seq) FROM config_changes) RETURNING seq"
    ))
    .bind(keep_ms)
    .fetch_all(&mut *tx)
    .await?;
    if let Some(through) = deleted.iter().max() {
        sqlx::query(
            "UPDATE config_changes_pruned SET through_seq = GREATEST(through_seq, $1) \
             WHERE id = 1",
        )
        .bind(through)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(deleted.len() as u64)
}

pub(super) async fn workspaces(pool: &PgPool, page: PageRequest) -> StoreResult<Page<Workspace>> {
    let (limit, after, fetch) = page_bounds(page);
    let mut query = QueryBuilder::new(format!(
        "SELECT seq, {WORKSPACE_COLUMNS} FROM workspaces WHERE seq > "
    ));
    query.push_bind(after);
    query.push(" ORDER BY seq LIMIT ").push_bind(fetch);
    fetch_page(&mut query, pool, limit, rows::sequenced_workspace).await
}

pub(super) async fn live_groups(pool: &PgPool, page: PageRequest) -> StoreResult<Page<Group>> {
    let (limit, after, fetch) = page_bounds(page);
    let mut query = QueryBuilder::new(format!(
        "SELECT {GROUP_COLUMNS} FROM groups g WHERE g.deleted_at IS NULL AND g.seq > "
    ));
    query.push_bind(after);
    query.push(" ORDER BY g.seq LIMIT ").push_bind(fetch);
    fetch_page(&mut query, pool, limit, rows::group).await
}

pub(super) async fn live_api_keys(pool: &PgPool, page: PageRequest) -> StoreResult<Page<ApiKey>> {
    let (limit, after, fetch) = page_bounds(page);
    let mut query = QueryBuilder::new(format!(
        "SELECT {API_KEY_COLUMNS} FROM api_keys \
         WHERE revoked_at IS NULL AND {GROUP_IS_LIVE} AND seq > "
    ));
    query.push_bind(after);
    query.push(" ORDER BY seq LIMIT ").push_bind(fetch);
    fetch_page(&mut query, pool, limit, rows::api_key).await
}

pub(super) async fn live_endpoints(
    pool: &PgPool,
    page: PageRequest,
) -> StoreResult<Page<Endpoint>> {
    let (limit, after, fetch) = page_bounds(page);
    let mut query = QueryBuilder::new(format!(
        "SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE deleted_at IS NULL AND seq > "
    ));
    query.push_bind(after);
    query.push(" ORDER BY seq LIMIT ").push_bind(fetch);
    fetch_page(&mut query, pool, limit, rows::endpoint).await
}

pub(super) async fn live_secrets(pool: &PgPool, page: PageRequest) -> StoreResult<Page<Secret>> {
    let (limit, after, fetch) = page_bounds(page);
    let mut query = QueryBuilder::new(format!(
        "SELECT {SECRET_COLUMNS} FROM secrets WHERE deleted_at IS NULL AND seq > "
    ));
    query.push_bind(after);
    query.push(" ORDER BY seq LIMIT ").push_bind(fetch);
    fetch_page(&mut query, pool, limit, rows::secret).await
}
