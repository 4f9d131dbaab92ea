//! Row decoding: one function per table, each reading the columns its `*_COLUMNS` constant
//! selects. A value the schema should have made impossible (unknown mode, bad JSON) is
//! `StoreError::Corrupt`, never a panic. The column lists and the text codecs (JSON,
//! enums, paging) are shared with the PostgreSQL store, which has the same columns.

use tollgate_core::endpoint::{Region, Target};
use tollgate_core::ModelAccess;

use crate::{Page, Scope, StoreError, StoreResult, UsageStatus};

pub(crate) const WORKSPACE_COLUMNS: &str = "id, name, is_enabled, signing_key, created_at";

pub(crate) const MANAGEMENT_KEY_COLUMNS: &str =
    "seq, workspace_id, prefix, hash, name, scope, created_at";

pub(crate) const SECRET_COLUMNS: &str = "seq, id, workspace_id, name, ciphertext, created_at";

pub(crate) const ENDPOINT_COLUMNS: &str =
    "seq, id, workspace_id, slug, region, targets, created_at, updated_at";

pub(crate) const GROUP_COLUMNS: &str = "g.seq, g.id, g.workspace_id, g.name, \
     g.external_entity_id, g.models, g.mode, g.parent_id, g.depth, g.created_at";

pub(crate) const API_KEY_COLUMNS: &str = "seq, group_id, prefix, hash, name, created_at";

pub(crate) const CONFIG_CHANGE_COLUMNS: &str = "seq, kind, object_id, changed_at";

pub(crate) const USAGE_EVENT_COLUMNS: &str = "seq, idempotency_key, timestamp, \
     request_id, request_metadata, model_slug, external_entity_id, api_key_prefix, \
     group_id, workspace_id, status, input_tokens, output_tokens, \
     cached_input_tokens, is_estimated";

/// A decoded row with its `seq`, the keyset of paging.
pub(crate) type Sequenced<T> = (i64, T);

/// Turns `limit + 1` fetched rows into a page: the extra row only says there is more.
pub(crate) fn into_page<T>(mut rows: Vec<Sequenced<T>>, limit: usize) -> Page<T> {
    let has_more = rows.len() > limit;
    rows.truncate(limit);
    let next_after = if has_more {
        rows.last().map(|(seq, _)| *seq)
    } else {
        None
    };
    Page {
        items: rows.into_iter().map(|(_, item)| item).collect(),
        next_after,
    }
}

/// A workspace selected next to another table's columns as `ws_id, ws_name, ...`.
pub(crate) const JOINED_WORKSPACE_COLUMNS: &str = "w.id AS ws_id, w.name AS ws_name, \
     w.is_enabled AS ws_is_enabled, w.signing_key AS ws_signing_key, \
     w.created_at AS ws_created_at";

pub(crate) fn scope_from_str(text: &str) -> StoreResult<Scope> {
    match text {
        "manage" => Ok(Scope::Manage),
        "view" => Ok(Scope::View),
        other => Err(StoreError::Corrupt(format!("unknown scope '{other}'"))),
    }
}

pub(crate) fn region_str(region: Region) -> &'static str {
    match region {
        Region::Unrestricted => "UNRESTRICTED",
        Region::Eu => "EU",
    }
}

pub(crate) fn region_from_str(text: &str) -> StoreResult<Region> {
    match text {
        "UNRESTRICTED" => Ok(Region::Unrestricted),
        "EU" => Ok(Region::Eu),
        other => Err(StoreError::Corrupt(format!("unknown region '{other}'"))),
    }
}

pub(crate) fn targets_json(targets: &[Target]) -> StoreResult<String> {
    serde_json::to_string(targets).map_err(|e| StoreError::Corrupt(format!("targets: {e}")))
}

pub(crate) fn models_json(models: &[ModelAccess]) -> StoreResult<String> {
    serde_json::to_string(models).map_err(|e| StoreError::Corrupt(format!("models: {e}")))
}

pub(crate) fn usage_status_from_str(text: &str) -> StoreResult<UsageStatus> {
    match text {
        "completed" => Ok(UsageStatus::Completed),
        "client_cancelled" => Ok(UsageStatus::ClientCancelled),
        "upstream_error_mid_stream" => Ok(UsageStatus::UpstreamErrorMidStream),
        other => Err(StoreError::Corrupt(format!(
            "unknown usage status '{other}'"
        ))),
    }
}

/// The decoders, one per table, for a backend's row type: SQLite and PostgreSQL read the
/// same columns the same way, so both stores expand this once (`row_decoders!(SqliteRow)`,
/// `row_decoders!(PgRow)`) instead of keeping two copies in step.
macro_rules! row_decoders {
    ($row:ty) => {
        use ::sqlx::Row as _;
        use ::tollgate_core::{Group, LimitMode, Timestamp};
        use $crate::sqlite::rows::{
            region_from_str, scope_from_str, usage_status_from_str, Sequenced,
        };
        use $crate::{
            ApiKey, ConfigChange, ConfigKind, Endpoint, ManagementKey, Secret, StoreError,
            StoreResult, UsageEvent, Workspace,
        };

        pub(crate) fn timestamp(row: &$row, column: &str) -> StoreResult<Timestamp> {
            Ok(Timestamp(row.try_get::<i64, _>(column)?))
        }

        pub(crate) fn count(row: &$row, column: &str) -> StoreResult<u64> {
            let value: i64 = row.try_get(column)?;
            u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("{column} is {value}")))
        }

        pub(crate) fn workspace(row: &$row) -> StoreResult<Workspace> {
            workspace_named(row, "")
        }

        pub(crate) fn joined_workspace(row: &$row) -> StoreResult<Workspace> {
            workspace_named(row, "ws_")
        }

        pub(crate) fn workspace_named(row: &$row, prefix: &str) -> StoreResult<Workspace> {
            Ok(Workspace {
                id: row.try_get(format!("{prefix}id").as_str())?,
                name: row.try_get(format!("{prefix}name").as_str())?,
                is_enabled: row.try_get(format!("{prefix}is_enabled").as_str())?,
                signing_key: row.try_get(format!("{prefix}signing_key").as_str())?,
                created_at: timestamp(row, &format!("{prefix}created_at"))?,
            })
        }

        /// A workspace selected with its `seq` (the bulk load's keyset).
        pub(crate) fn sequenced_workspace(row: &$row) -> StoreResult<Sequenced<Workspace>> {
            Ok((row.try_get("seq")?, workspace(row)?))
        }

        pub(crate) fn config_change(row: &$row) -> StoreResult<ConfigChange> {
            let kind: String = row.try_get("kind")?;
            Ok(ConfigChange {
                seq: row.try_get("seq")?,
                kind: ConfigKind::parse(&kind).ok_or_else(|| {
                    StoreError::Corrupt(format!("unknown configuration change kind '{kind}'"))
                })?,
                object_id: row.try_get("object_id")?,
                changed_at: timestamp(row, "changed_at")?,
            })
        }

        pub(crate) fn management_key(row: &$row) -> StoreResult<Sequenced<ManagementKey>> {
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

        pub(crate) fn secret(row: &$row) -> StoreResult<Sequenced<Secret>> {
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

        pub(crate) fn endpoint(row: &$row) -> StoreResult<Sequenced<Endpoint>> {
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

        pub(crate) fn group(row: &$row) -> StoreResult<Sequenced<Group>> {
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
                    mode: LimitMode::parse(&mode).ok_or_else(|| {
                        StoreError::Corrupt(format!("unknown limit mode '{mode}'"))
                    })?,
                    parent_id: row.try_get("parent_id")?,
                    depth: u32::try_from(depth)
                        .map_err(|_| StoreError::Corrupt(format!("group depth {depth}")))?,
                    created_at: timestamp(row, "created_at")?,
                },
            ))
        }

        pub(crate) fn api_key(row: &$row) -> StoreResult<Sequenced<ApiKey>> {
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

        pub(crate) fn usage_event(row: &$row) -> StoreResult<Sequenced<UsageEvent>> {
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
    };
}
pub(crate) use row_decoders;

/// The SQLite decoders.
mod sqlite_decoders {
    use sqlx::sqlite::SqliteRow;
    super::row_decoders!(SqliteRow);
}
pub(crate) use sqlite_decoders::*;

/// Token counts are `u64` in the model and `INTEGER` (i64) in SQLite; no real count
/// comes near the boundary, so clamp rather than fail a billing write.
pub(crate) fn token_count(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_keeps_limit_and_points_after_the_last_item() {
        let page = into_page(vec![(3, 'a'), (7, 'b'), (9, 'c')], 2);
        assert_eq!(page.items, vec!['a', 'b']);
        assert_eq!(page.next_after, Some(7));

        let last = into_page(vec![(3, 'a'), (7, 'b')], 2);
        assert_eq!(last.items, vec!['a', 'b']);
        assert_eq!(last.next_after, None);
    }

    #[test]
    fn token_counts_clamp_instead_of_wrapping() {
        assert_eq!(token_count(60), 60);
        assert_eq!(token_count(u64::MAX), i64::MAX);
    }
}
