//! Row decoding for PostgreSQL: the same columns as the SQLite schema (the `*_COLUMNS`
//! lists and text codecs come from `sqlite::rows`), read from `PgRow`. A value the schema
//! should have made impossible is `StoreError::Corrupt`, never a panic.

use sqlx::postgres::PgRow;
use sqlx::Row;
use tollgate_core::{Group, LimitMode, Timestamp};

use crate::sqlite::rows::{region_from_str, scope_from_str, usage_status_from_str, Sequenced};
use crate::{
    ApiKey, Endpoint, ManagementKey, Secret, StoreError, StoreResult, UsageEvent, Workspace,
};

fn timestamp(row: &PgRow, column: &str) -> StoreResult<Timestamp> {
    Ok(Timestamp(row.try_get::<i64, _>(column)?))
}

fn count(row: &PgRow, column: &str) -> StoreResult<u64> {
    let value: i64 = row.try_get(column)?;
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("{column} is {value}")))
}

pub(super) fn workspace(row: &PgRow) -> StoreResult<Workspace> {
    workspace_named(row, "")
}

/// A workspace selected as `ws_id, ws_name, ...` (`JOINED_WORKSPACE_COLUMNS`).
pub(super) fn joined_workspace(row: &PgRow) -> StoreResult<Workspace> {
    workspace_named(row, "ws_")
}

fn workspace_named(row: &PgRow, prefix: &str) -> StoreResult<Workspace> {
    Ok(Workspace {
        id: row.try_get(format!("{prefix}id").as_str())?,
        name: row.try_get(format!("{prefix}name").as_str())?,
        is_enabled: row.try_get(format!("{prefix}is_enabled").as_str())?,
        signing_key: row.try_get(format!("{prefix}signing_key").as_str())?,
        created_at: timestamp(row, &format!("{prefix}created_at"))?,
    })
}

pub(super) fn management_key(row: &PgRow) -> StoreResult<Sequenced<ManagementKey>> {
    let scope: String = row.try_get("scope")?;
    Ok((
        row.try_get("seq")?,
        ManagementKey {
            workspace_id: row.try_get("workspace_id")?,
            prefix: row.try_get("prefix")?,
            hash: row.try_get("hash")?,
            name: row.try_get("name")?,
            scope: scope_from_str(&scope)?,
            created_at: timestamp(row, "created_at")?,
        },
    ))
}

pub(super) fn secret(row: &PgRow) -> StoreResult<Sequenced<Secret>> {
    Ok((
        row.try_get("seq")?,
        Secret {
            id: row.try_get("id")?,
            workspace_id: row.try_get("workspace_id")?,
            name: row.try_get("name")?,
            ciphertext: row.try_get("ciphertext")?,
            created_at: timestamp(row, "created_at")?,
        },
    ))
}

pub(super) fn endpoint(row: &PgRow) -> StoreResult<Sequenced<Endpoint>> {
    let region: String = row.try_get("region")?;
    let targets: String = row.try_get("targets")?;
    Ok((
        row.try_get("seq")?,
        Endpoint {
            id: row.try_get("id")?,
            workspace_id: row.try_get("workspace_id")?,
            slug: row.try_get("slug")?,
            region: region_from_str(&region)?,
            targets: serde_json::from_str(&targets)
                .map_err(|e| StoreError::Corrupt(format!("endpoint targets: {e}")))?,
            created_at: timestamp(row, "created_at")?,
            updated_at: timestamp(row, "updated_at")?,
        },
    ))
}

pub(super) fn group(row: &PgRow) -> StoreResult<Sequenced<Group>> {
    let models: String = row.try_get("models")?;
    let mode: String = row.try_get("mode")?;
    let depth: i64 = row.try_get("depth")?;
    Ok((
        row.try_get("seq")?,
        Group {
            id: row.try_get("id")?,
            workspace_id: row.try_get("workspace_id")?,
            name: row.try_get("name")?,
            external_entity_id: row.try_get("external_entity_id")?,
            models: serde_json::from_str(&models)
                .map_err(|e| StoreError::Corrupt(format!("group models: {e}")))?,
            mode: LimitMode::parse(&mode)
                .ok_or_else(|| StoreError::Corrupt(format!("unknown limit mode '{mode}'")))?,
            parent_id: row.try_get("parent_id")?,
            depth: u32::try_from(depth)
                .map_err(|_| StoreError::Corrupt(format!("group depth {depth}")))?,
            created_at: timestamp(row, "created_at")?,
        },
    ))
}

pub(super) fn api_key(row: &PgRow) -> StoreResult<Sequenced<ApiKey>> {
    Ok((
        row.try_get("seq")?,
        ApiKey {
            group_id: row.try_get("group_id")?,
            prefix: row.try_get("prefix")?,
            hash: row.try_get("hash")?,
            name: row.try_get("name")?,
            created_at: timestamp(row, "created_at")?,
        },
    ))
}

pub(super) fn usage_event(row: &PgRow) -> StoreResult<Sequenced<UsageEvent>> {
    let status: String = row.try_get("status")?;
    Ok((
        row.try_get("seq")?,
        UsageEvent {
            idempotency_key: row.try_get("idempotency_key")?,
            timestamp: timestamp(row, "timestamp")?,
            request_id: row.try_get("request_id")?,
            request_metadata: row.try_get("request_metadata")?,
            model_slug: row.try_get("model_slug")?,
            external_entity_id: row.try_get("external_entity_id")?,
            api_key_prefix: row.try_get("api_key_prefix")?,
            group_id: row.try_get("group_id")?,
            workspace_id: row.try_get("workspace_id")?,
            status: usage_status_from_str(&status)?,
            input_tokens: count(row, "input_tokens")?,
            output_tokens: count(row, "output_tokens")?,
            cached_input_tokens: count(row, "cached_input_tokens")?,
            is_estimated: row.try_get("is_estimated")?,
        },
    ))
}
