//! The group tree in SQLite: chains, subtrees and the write paths that must check the
//! pure rules of `tollgate_core::hierarchy` against a consistent view of the tree.
//!
//! Every function takes a connection so the caller decides the transaction: writes run
//! inside one `BEGIN IMMEDIATE` transaction on the single writer connection, so the tree
//! read for a check cannot change before the write that depends on it commits.

use sqlx::SqliteConnection;
use tollgate_core::hierarchy::{check_cascading, check_placement};
use tollgate_core::{Group, LimitMode, Timestamp};

use super::rows::{self, GROUP_COLUMNS};
use super::unique_violation;
use crate::{GroupPatch, GroupWriteError, NewGroup, StoreError, StoreResult};

/// Recursion guard: a tree is at most five levels deep; anything longer is corrupt.
const MAX_WALK: i64 = 8;

/// `[group, parent, ..., root]` of a live group; empty when it is absent or deleted.
pub(super) async fn chain(conn: &mut SqliteConnection, id: &str) -> StoreResult<Vec<Group>> {
    let sql = format!(
        "WITH RECURSIVE chain(id, parent_id, level) AS ( \
             SELECT id, parent_id, 0 FROM groups WHERE id = ?1 AND deleted_at IS NULL \
             UNION ALL \
             SELECT p.id, p.parent_id, c.level + 1 FROM groups p \
             JOIN chain c ON p.id = c.parent_id \
             WHERE p.deleted_at IS NULL AND c.level < ?2 \
         ) \
         SELECT {GROUP_COLUMNS} FROM chain JOIN groups g ON g.id = chain.id \
         ORDER BY chain.level"
    );
    let rows = sqlx::query(&sql)
        .bind(id)
        .bind(MAX_WALK)
        .fetch_all(&mut *conn)
        .await?;
    let chain = rows
        .iter()
        .map(|row| rows::group(row).map(|(_, group)| group))
        .collect::<StoreResult<Vec<_>>>()?;
    // A live group's ancestors are live (deleting a group deletes its subtree), so a chain
    // that stops short of a root means the file was edited by hand. Refuse it rather than
    // hand the data plane a chain missing an ancestor's limits.
    if let Some(top) = chain.last() {
        if top.parent_id.is_some() {
            return Err(StoreError::Corrupt(format!(
                "group {id}: ancestor chain does not reach a live root"
            )));
        }
    }
    Ok(chain)
}

/// Every live descendant of `id` (not itself), any depth, in creation order.
///
/// The walk carries `seq` and the final join is a `CROSS JOIN`, which SQLite never
/// reorders: left to choose, its planner scans all of `groups` and probes the walk's
/// result for each row, so a leaf's empty subtree cost a full table scan (350 µs with
/// 10,000 groups against 4 µs this way).
pub(super) async fn descendants(conn: &mut SqliteConnection, id: &str) -> StoreResult<Vec<Group>> {
    let sql = format!(
        "WITH RECURSIVE sub(id, seq, level) AS ( \
             SELECT id, seq, 1 FROM groups WHERE parent_id = ?1 AND deleted_at IS NULL \
             UNION ALL \
             SELECT g.id, g.seq, s.level + 1 FROM groups g JOIN sub s ON g.parent_id = s.id \
             WHERE g.deleted_at IS NULL AND s.level < ?2 \
         ) \
         SELECT {GROUP_COLUMNS} FROM sub CROSS JOIN groups g ON g.id = sub.id \
         ORDER BY sub.seq"
    );
    let rows = sqlx::query(&sql)
        .bind(id)
        .bind(MAX_WALK)
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|row| rows::group(row).map(|(_, group)| group))
        .collect()
}

/// Every descendant's id, deleted ones included (parents are immutable, so a deleted
/// subtree keeps its shape), in creation order. Read when a CASCADING pool's day
/// baseline is loaded, so once per leaf's first request: the walk alone answers it, with
/// no join back to `groups` (see [`descendants`] for what the join cost).
pub(super) async fn descendant_ids_with_deleted(
    conn: &mut SqliteConnection,
    id: &str,
) -> StoreResult<Vec<String>> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "WITH RECURSIVE sub(id, seq, level) AS ( \
             SELECT id, seq, 1 FROM groups WHERE parent_id = ?1 \
             UNION ALL \
             SELECT g.id, g.seq, s.level + 1 FROM groups g JOIN sub s ON g.parent_id = s.id \
             WHERE s.level < ?2 \
         ) \
         SELECT id FROM sub ORDER BY seq",
    )
    .bind(id)
    .bind(MAX_WALK)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

async fn external_id_taken(
    conn: &mut SqliteConnection,
    workspace_id: &str,
    external_entity_id: &str,
) -> StoreResult<bool> {
    let row = sqlx::query(
        "SELECT 1 FROM groups \
         WHERE workspace_id = ?1 AND external_entity_id = ?2 AND deleted_at IS NULL",
    )
    .bind(workspace_id)
    .bind(external_entity_id)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.is_some())
}

/// Placement, CASCADING thresholds and external id uniqueness, then the insert.
pub(super) async fn create(
    conn: &mut SqliteConnection,
    new: NewGroup,
) -> Result<Group, GroupWriteError> {
    let ancestors = match &new.parent_id {
        None => Vec::new(),
        Some(parent_id) => {
            let ancestors = chain(conn, parent_id).await?;
            match ancestors.first() {
                Some(parent) if parent.workspace_id == new.workspace_id => ancestors,
                _ => return Err(GroupWriteError::ParentNotFound),
            }
        }
    };
    let depth = check_placement(new.mode, &ancestors)?;
    if new.mode == LimitMode::Cascading {
        check_cascading(&new.models, &ancestors, &[])?;
    }
    if external_id_taken(conn, &new.workspace_id, &new.external_entity_id).await? {
        return Err(GroupWriteError::DuplicateExternalId);
    }

    let inserted = sqlx::query(
        "INSERT INTO groups \
         (id, workspace_id, name, external_entity_id, models, mode, parent_id, depth, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )
    .bind(&new.id)
    .bind(&new.workspace_id)
    .bind(&new.name)
    .bind(&new.external_entity_id)
    .bind(rows::models_json(&new.models)?)
    .bind(new.mode.as_str())
    .bind(&new.parent_id)
    .bind(i64::from(depth))
    .bind(new.created_at.0)
    .execute(&mut *conn)
    .await;
    match inserted {
        Ok(_) => {}
        Err(e) => {
            return Err(match unique_violation(&e) {
                Some(message) if message.contains("external_entity_id") => {
                    GroupWriteError::DuplicateExternalId
                }
                Some(_) => GroupWriteError::Store(StoreError::Duplicate("id")),
                None => GroupWriteError::from(e),
            })
        }
    }

    Ok(Group {
        id: new.id,
        workspace_id: new.workspace_id,
        name: new.name,
        external_entity_id: new.external_entity_id,
        models: new.models,
        mode: new.mode,
        parent_id: new.parent_id,
        depth,
        created_at: new.created_at,
    })
}

/// A PATCH. New CASCADING thresholds are checked against the ancestors and every live
/// descendant, so a parent can never be lowered below what a child declares.
pub(super) async fn update(
    conn: &mut SqliteConnection,
    id: &str,
    patch: GroupPatch,
) -> Result<Group, GroupWriteError> {
    let mut own_chain = chain(conn, id).await?;
    if own_chain.is_empty() {
        return Err(GroupWriteError::NotFound);
    }
    let mut group = own_chain.remove(0);
    let ancestors = own_chain;

    if let Some(models) = patch.models {
        if group.mode == LimitMode::Cascading {
            let below = descendants(conn, id).await?;
            check_cascading(&models, &ancestors, &below)?;
        }
        group.models = models;
    }
    if let Some(name) = patch.name {
        group.name = name;
    }

    sqlx::query("UPDATE groups SET name = ?1, models = ?2 WHERE id = ?3")
        .bind(&group.name)
        .bind(rows::models_json(&group.models)?)
        .bind(id)
        .execute(&mut *conn)
        .await?;
    Ok(group)
}

/// Marks the live subtree of `id` deleted and revokes every live key in it, all with the
/// same time. Returns the group as it was, or `None` when it is absent or deleted.
pub(super) async fn delete(
    conn: &mut SqliteConnection,
    id: &str,
    now: Timestamp,
) -> StoreResult<Option<Group>> {
    let Some(group) = chain(conn, id).await?.into_iter().next() else {
        return Ok(None);
    };
    // Keys first: once the groups are marked deleted the subtree walk finds nothing.
    const SUBTREE: &str = "WITH RECURSIVE subtree(id) AS ( \
             SELECT id FROM groups WHERE id = ?1 AND deleted_at IS NULL \
             UNION \
             SELECT g.id FROM groups g JOIN subtree s ON g.parent_id = s.id \
             WHERE g.deleted_at IS NULL \
         ) ";
    sqlx::query(&format!(
        "{SUBTREE} UPDATE api_keys SET revoked_at = ?2 \
         WHERE revoked_at IS NULL AND group_id IN (SELECT id FROM subtree)"
    ))
    .bind(id)
    .bind(now.0)
    .execute(&mut *conn)
    .await?;
    sqlx::query(&format!(
        "{SUBTREE} UPDATE groups SET deleted_at = ?2 WHERE id IN (SELECT id FROM subtree)"
    ))
    .bind(id)
    .bind(now.0)
    .execute(&mut *conn)
    .await?;
    Ok(Some(group))
}
