//! Billing webhooks on PostgreSQL. Cutting a batch moves the endpoint's cursor by
//! compare-and-set (`UPDATE ... WHERE cursor = $expected`: a second cutter waits for the
//! first's row lock, then finds the cursor moved and writes nothing). Due deliveries are
//! claimed with `FOR UPDATE SKIP LOCKED`, so instances claiming at once take disjoint sets.

use sqlx::postgres::{PgPool, PgRow};
use sqlx::{PgConnection, QueryBuilder, Row};
use tollgate_core::Timestamp;

use super::rows;
use super::{duplicate_on, fetch_page, lock_usage_inserts, page_bounds};
use crate::sqlite::rows::{Sequenced, USAGE_EVENT_COLUMNS};
use crate::{
    DeliveryStatus, NewWebhookDelivery, NewWebhookEndpoint, Page, PageRequest, SequencedUsageEvent,
    StoreError, StoreResult, WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookSecret,
};

const ENDPOINT_COLUMNS: &str = "seq, id, workspace_id, url, description, cursor, created_at";

const SECRET_COLUMNS: &str = "webhook_id, ciphertext, created_at, expires_at";

const DELIVERY_COLUMNS: &str = "seq, id, webhook_id, body, event_count, first_event_seq, \
     last_event_seq, status, attempts, retry_step, next_attempt_at, last_attempt_at, \
     last_http_status, last_error, lease_until, created_at";

fn optional_timestamp(row: &PgRow, column: &str) -> StoreResult<Option<Timestamp>> {
    Ok(row.try_get::<Option<i64>, _>(column)?.map(Timestamp))
}

fn small_count(row: &PgRow, column: &str) -> StoreResult<u32> {
    let value: i64 = row.try_get(column)?;
    u32::try_from(value).map_err(|_| StoreError::Corrupt(format!("{column} is {value}")))
}

fn endpoint(row: &PgRow) -> StoreResult<Sequenced<WebhookEndpoint>> {
    Ok((
        row.try_get("seq")?,
        WebhookEndpoint {
            id: row.try_get("id")?,
            workspace_id: row.try_get("workspace_id")?,
            url: row.try_get("url")?,
            description: row.try_get("description")?,
            cursor: row.try_get("cursor")?,
            created_at: Timestamp(row.try_get("created_at")?),
        },
    ))
}

fn secret(row: &PgRow) -> StoreResult<WebhookSecret> {
    Ok(WebhookSecret {
        webhook_id: row.try_get("webhook_id")?,
        ciphertext: row.try_get("ciphertext")?,
        created_at: Timestamp(row.try_get("created_at")?),
        expires_at: optional_timestamp(row, "expires_at")?,
    })
}

fn delivery(row: &PgRow) -> StoreResult<Sequenced<WebhookDelivery>> {
    let status: String = row.try_get("status")?;
    let http_status = row
        .try_get::<Option<i64>, _>("last_http_status")?
        .map(|code| {
            u16::try_from(code)
                .map_err(|_| StoreError::Corrupt(format!("last_http_status is {code}")))
        })
        .transpose()?;
    Ok((
        row.try_get("seq")?,
        WebhookDelivery {
            id: row.try_get("id")?,
            webhook_id: row.try_get("webhook_id")?,
            body: row.try_get("body")?,
            event_count: small_count(row, "event_count")?,
            first_event_seq: row.try_get("first_event_seq")?,
            last_event_seq: row.try_get("last_event_seq")?,
            status: DeliveryStatus::parse(&status).ok_or_else(|| {
                StoreError::Corrupt(format!("unknown delivery status '{status}'"))
            })?,
            attempts: small_count(row, "attempts")?,
            retry_step: small_count(row, "retry_step")?,
            next_attempt_at: optional_timestamp(row, "next_attempt_at")?,
            last_attempt_at: optional_timestamp(row, "last_attempt_at")?,
            last_http_status: http_status,
            last_error: row.try_get("last_error")?,
            lease_until: optional_timestamp(row, "lease_until")?,
            created_at: Timestamp(row.try_get("created_at")?),
        },
    ))
}

fn without_seq<T>(decoded: Option<Sequenced<T>>) -> Option<T> {
    decoded.map(|(_, item)| item)
}

/// The cursor starts at the newest stored event. The usage-insert lock is taken first, so
/// no event numbered below that cursor can still be in flight and commit afterwards.
pub(super) async fn insert_endpoint(
    conn: &mut PgConnection,
    new: NewWebhookEndpoint,
) -> StoreResult<WebhookEndpoint> {
    lock_usage_inserts(conn).await?;
    let cursor: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM usage_events")
        .fetch_one(&mut *conn)
        .await?;
    sqlx::query(
        "INSERT INTO webhook_endpoints (id, workspace_id, url, description, cursor, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&new.id)
    .bind(&new.workspace_id)
    .bind(&new.url)
    .bind(&new.description)
    .bind(cursor)
    .bind(new.created_at.0)
    .execute(&mut *conn)
    .await
    .map_err(|e| duplicate_on(e, "webhook_endpoints_id_key", "id"))?;
    sqlx::query(
        "INSERT INTO webhook_secrets (webhook_id, ciphertext, created_at) VALUES ($1, $2, $3)",
    )
    .bind(&new.id)
    .bind(&new.secret_ciphertext)
    .bind(new.created_at.0)
    .execute(&mut *conn)
    .await?;
    Ok(WebhookEndpoint {
        id: new.id,
        workspace_id: new.workspace_id,
        url: new.url,
        description: new.description,
        cursor,
        created_at: new.created_at,
    })
}

pub(super) async fn endpoint_by_id(
    pool: &PgPool,
    id: &str,
) -> StoreResult<Option<WebhookEndpoint>> {
    let row = sqlx::query(&format!(
        "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE id = $1 AND deleted_at IS NULL"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(without_seq(row.as_ref().map(endpoint).transpose()?))
}

pub(super) async fn list_endpoints(
    pool: &PgPool,
    workspace_id: &str,
    page: PageRequest,
) -> StoreResult<Page<WebhookEndpoint>> {
    let (limit, after, fetch) = page_bounds(page);
    let mut query = QueryBuilder::new(format!(
        "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE deleted_at IS NULL"
    ));
    query
        .push(" AND workspace_id = ")
        .push_bind(workspace_id.to_owned());
    query.push(" AND seq > ").push_bind(after);
    query.push(" ORDER BY seq LIMIT ").push_bind(fetch);
    fetch_page(&mut query, pool, limit, endpoint).await
}

pub(super) async fn all_endpoints(pool: &PgPool) -> StoreResult<Vec<WebhookEndpoint>> {
    let found = sqlx::query(&format!(
        "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE deleted_at IS NULL ORDER BY seq"
    ))
    .fetch_all(pool)
    .await?;
    found
        .iter()
        .map(|row| endpoint(row).map(|(_, e)| e))
        .collect()
}

pub(super) async fn delete_endpoint(
    pool: &PgPool,
    id: &str,
    now: Timestamp,
) -> StoreResult<Option<WebhookEndpoint>> {
    let row = sqlx::query(&format!(
        "UPDATE webhook_endpoints SET deleted_at = $1 WHERE id = $2 AND deleted_at IS NULL \
         RETURNING {ENDPOINT_COLUMNS}"
    ))
    .bind(now.0)
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(without_seq(row.as_ref().map(endpoint).transpose()?))
}

/// Locks the endpoint row first, so two rotations of one endpoint run one after the other.
pub(super) async fn rotate_secret(
    conn: &mut PgConnection,
    webhook_id: &str,
    ciphertext: Vec<u8>,
    now: Timestamp,
    retire_at: Timestamp,
) -> StoreResult<Option<WebhookSecret>> {
    let live = sqlx::query(
        "SELECT 1 FROM webhook_endpoints WHERE id = $1 AND deleted_at IS NULL FOR UPDATE",
    )
    .bind(webhook_id)
    .fetch_optional(&mut *conn)
    .await?;
    if live.is_none() {
        return Ok(None);
    }
    sqlx::query(
        "UPDATE webhook_secrets SET expires_at = $1 \
         WHERE webhook_id = $2 AND (expires_at IS NULL OR expires_at > $1)",
    )
    .bind(retire_at.0)
    .bind(webhook_id)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO webhook_secrets (webhook_id, ciphertext, created_at) VALUES ($1, $2, $3)",
    )
    .bind(webhook_id)
    .bind(&ciphertext)
    .bind(now.0)
    .execute(&mut *conn)
    .await?;
    Ok(Some(WebhookSecret {
        webhook_id: webhook_id.to_owned(),
        ciphertext,
        created_at: now,
        expires_at: None,
    }))
}

pub(super) async fn live_secrets(
    pool: &PgPool,
    webhook_id: &str,
    now: Timestamp,
) -> StoreResult<Vec<WebhookSecret>> {
    let found = sqlx::query(&format!(
        "SELECT {SECRET_COLUMNS} FROM webhook_secrets \
         WHERE webhook_id = $1 AND (expires_at IS NULL OR expires_at > $2) ORDER BY seq DESC"
    ))
    .bind(webhook_id)
    .bind(now.0)
    .fetch_all(pool)
    .await?;
    found.iter().map(secret).collect()
}

pub(super) async fn events_after(
    pool: &PgPool,
    workspace_id: &str,
    after: i64,
    limit: u32,
) -> StoreResult<Vec<SequencedUsageEvent>> {
    let found = sqlx::query(&format!(
        "SELECT {USAGE_EVENT_COLUMNS} FROM usage_events \
         WHERE workspace_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
    ))
    .bind(workspace_id)
    .bind(after)
    .bind(i64::from(limit))
    .fetch_all(pool)
    .await?;
    found.iter().map(rows::usage_event).collect()
}

pub(super) async fn cut_batch(
    conn: &mut PgConnection,
    new: NewWebhookDelivery,
    expected_cursor: i64,
) -> StoreResult<bool> {
    let moved = sqlx::query(
        "UPDATE webhook_endpoints SET cursor = $1 \
         WHERE id = $2 AND cursor = $3 AND deleted_at IS NULL",
    )
    .bind(new.last_event_seq)
    .bind(&new.webhook_id)
    .bind(expected_cursor)
    .execute(&mut *conn)
    .await?;
    if moved.rows_affected() == 0 {
        return Ok(false);
    }
    sqlx::query(
        "INSERT INTO webhook_deliveries (id, webhook_id, body, event_count, first_event_seq, \
         last_event_seq, status, next_attempt_at, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $8)",
    )
    .bind(&new.id)
    .bind(&new.webhook_id)
    .bind(&new.body)
    .bind(i64::from(new.event_count))
    .bind(new.first_event_seq)
    .bind(new.last_event_seq)
    .bind(new.next_attempt_at.0)
    .bind(new.created_at.0)
    .execute(&mut *conn)
    .await
    .map_err(|e| duplicate_on(e, "webhook_deliveries_id_key", "id"))?;
    Ok(true)
}

/// One statement: the due rows are locked with `SKIP LOCKED` (rows another instance is
/// claiming right now are left to it) and re-checked against the lease condition once
/// locked, then leased.
pub(super) async fn claim_due(
    pool: &PgPool,
    now: Timestamp,
    lease_until: Timestamp,
    limit: u32,
) -> StoreResult<Vec<WebhookDelivery>> {
    let found = sqlx::query(&format!(
        "UPDATE webhook_deliveries SET lease_until = $1 WHERE seq IN ( \
             SELECT d.seq FROM webhook_deliveries d \
             JOIN webhook_endpoints e ON e.id = d.webhook_id \
             WHERE d.status = 'pending' AND d.next_attempt_at <= $2 \
             AND (d.lease_until IS NULL OR d.lease_until <= $2) AND e.deleted_at IS NULL \
             ORDER BY d.next_attempt_at, d.seq LIMIT $3 \
             FOR UPDATE OF d SKIP LOCKED) \
         RETURNING {DELIVERY_COLUMNS}"
    ))
    .bind(lease_until.0)
    .bind(now.0)
    .bind(i64::from(limit))
    .fetch_all(pool)
    .await?;
    let mut claimed = found
        .iter()
        .map(delivery)
        .collect::<StoreResult<Vec<_>>>()?;
    claimed.sort_by_key(|(seq, d)| (d.next_attempt_at, *seq));
    Ok(claimed.into_iter().map(|(_, d)| d).collect())
}

pub(super) async fn release(pool: &PgPool, id: &str) -> StoreResult<()> {
    sqlx::query("UPDATE webhook_deliveries SET lease_until = NULL WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

pub(super) async fn record_attempt(
    pool: &PgPool,
    id: &str,
    attempt: WebhookAttempt,
) -> StoreResult<Option<WebhookDelivery>> {
    let next = match attempt.status {
        DeliveryStatus::Pending => attempt.next_attempt_at.map(|t| t.0),
        DeliveryStatus::Delivered | DeliveryStatus::Failed => None,
    };
    let row = sqlx::query(&format!(
        "UPDATE webhook_deliveries SET attempts = attempts + 1, \
         retry_step = CASE WHEN $1 = 'pending' THEN retry_step + 1 ELSE retry_step END, \
         status = $1, next_attempt_at = $2, last_attempt_at = $3, last_http_status = $4, \
         last_error = $5, lease_until = NULL \
         WHERE id = $6 RETURNING {DELIVERY_COLUMNS}"
    ))
    .bind(attempt.status.as_str())
    .bind(next)
    .bind(attempt.at.0)
    .bind(attempt.http_status.map(i64::from))
    .bind(&attempt.error)
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(without_seq(row.as_ref().map(delivery).transpose()?))
}

pub(super) async fn delivery_by_id(
    pool: &PgPool,
    id: &str,
) -> StoreResult<Option<WebhookDelivery>> {
    let row = sqlx::query(&format!(
        "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(without_seq(row.as_ref().map(delivery).transpose()?))
}

pub(super) async fn list_deliveries(
    pool: &PgPool,
    webhook_id: &str,
    page: PageRequest,
) -> StoreResult<Page<WebhookDelivery>> {
    let (limit, after, fetch) = page_bounds(page);
    let mut query = QueryBuilder::new(format!(
        "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE webhook_id = "
    ));
    query.push_bind(webhook_id.to_owned());
    query.push(" AND seq > ").push_bind(after);
    query.push(" ORDER BY seq LIMIT ").push_bind(fetch);
    fetch_page(&mut query, pool, limit, delivery).await
}

pub(super) async fn reset_for_retry(
    pool: &PgPool,
    id: &str,
    now: Timestamp,
) -> StoreResult<Option<WebhookDelivery>> {
    let row = sqlx::query(&format!(
        "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = $1, \
         retry_step = 0 WHERE id = $2 RETURNING {DELIVERY_COLUMNS}"
    ))
    .bind(now.0)
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(without_seq(row.as_ref().map(delivery).transpose()?))
}
