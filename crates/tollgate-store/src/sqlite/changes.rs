//! The configuration change log in SQLite and the bulk loads a mirror starts from.
//!
//! `record` runs inside the writing transaction, on the single writer connection, so
//! change numbers are handed out and committed in the same order: a reader never sees
//! number N+1 before N. Another process writing the same file (`tollgate workspace
//! disable`) takes the file's write lock for its whole transaction (`BEGIN IMMEDIATE`),
//! which keeps that order across processes too.

use std::time::Duration;

use sqlx::{QueryBuilder, SqliteConnection, SqlitePool};

use super::rows::{
    self, API_KEY_COLUMNS, CONFIG_CHANGE_COLUMNS, ENDPOINT_COLUMNS, GROUP_COLUMNS, SECRET_COLUMNS,
    WORKSPACE_COLUMNS,
};
use super::{fetch_page, page_bounds, GROUP_IS_LIVE};
use crate::{
    ApiKey, ConfigChanges, ConfigKind, Endpoint, Page, PageRequest, Secret, StoreResult, Workspace,
};
use tollgate_core::Group;

/// The database's clock in milliseconds since the epoch.
const NOW_MS: &str = "CAST(unixepoch('subsec') * 1000 AS INTEGER)";

/// Appends one change; call it inside the transaction of the write it describes.
pub(super) async fn record(
    conn: &mut SqliteConnection,
    kind: ConfigKind,
    object_id: &str,
) -> StoreResult<()> {
    sqlx::query(&format!(
        "INSERT INTO config_changes (kind, object_id, changed_at) VALUES (?1, ?2, {NOW_MS})"
    ))
    .bind(kind.as_str())
    .bind(object_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The page of changes and the pruning mark, from one read transaction (one snapshot).
pub(super) async fn after(pool: &SqlitePool, after: i64, limit: u32) -> StoreResult<ConfigChanges> {
    let mut tx = pool.begin().await?;
    let found = sqlx::query(&format!(
        "SELECT {CONFIG_CHANGE_COLUMNS} FROM config_changes WHERE seq > ?1 ORDER BY seq LIMIT ?2"
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

pub(super) async fn newest(pool: &SqlitePool) -> StoreResult<i64> {
    Ok(
        sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM config_changes")
            .fetch_one(pool)
            .await?,
    )
}

/// Deletes what is older than `keep` except the newest row, and moves the mark.
pub(super) async fn prune(conn: &mut SqliteConnection, keep: Duration) -> StoreResult<u64> {
    let keep_ms = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
    let deleted: Vec<i64> = sqlx::query_scalar(&format!(
        "DELETE FROM config_changes WHERE changed_at < {NOW_MS} - ?1 \
         AND seq < (SELECT MAX(seq) FROM config_changes) RETURNING seq"
    ))
    .bind(keep_ms)
    .fetch_all(&mut *conn)
    .await?;
    if let Some(through) = deleted.iter().max() {
        sqlx::query(
            "UPDATE config_changes_pruned SET through_seq = MAX(through_seq, ?1) WHERE id = 1",
        )
        .bind(through)
        .execute(&mut *conn)
        .await?;
    }
    Ok(deleted.len() as u64)
}

pub(super) async fn workspaces(
    pool: &SqlitePool,
    page: PageRequest,
) -> StoreResult<Page<Workspace>> {
    let (limit, after, fetch) = page_bounds(page);
    let mut query = QueryBuilder::new(format!(
        "SELECT seq, {WORKSPACE_COLUMNS} FROM workspaces WHERE seq > "
    ));
    query.push_bind(after);
    query.push(" ORDER BY seq LIMIT ").push_bind(fetch);
    fetch_page(&mut query, pool, limit, rows::sequenced_workspace).await
}

pub(super) async fn live_groups(pool: &SqlitePool, page: PageRequest) -> StoreResult<Page<Group>> {
    let (limit, after, fetch) = page_bounds(page);
    let mut query = QueryBuilder::new(format!(
        "SELECT {GROUP_COLUMNS} FROM groups g WHERE g.deleted_at IS NULL AND g.seq > "
    ));
    query.push_bind(after);
    query.push(" ORDER BY g.seq LIMIT ").push_bind(fetch);
    fetch_page(&mut query, pool, limit, rows::group).await
}

pub(super) async fn live_api_keys(
    pool: &SqlitePool,
    page: PageRequest,
) -> StoreResult<Page<ApiKey>> {
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
    pool: &SqlitePool,
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

pub(super) async fn live_secrets(
    pool: &SqlitePool,
    page: PageRequest,
) -> StoreResult<Page<Secret>> {
    let (limit, after, fetch) = page_bounds(page);
    let mut query = QueryBuilder::new(format!(
        "SELECT {SECRET_COLUMNS} FROM secrets WHERE deleted_at IS NULL AND seq > "
    ));
    query.push_bind(after);
    query.push(" ORDER BY seq LIMIT ").push_bind(fetch);
    fetch_page(&mut query, pool, limit, rows::secret).await
}
