//! The group tree in PostgreSQL: chains, subtrees and the write paths that check the pure
//! rules of `tollgate_core::hierarchy`.
//!
//! Every tree write first takes a transaction-scoped advisory lock on its workspace
//! (`lock_workspace`), so tree writes of one workspace run one at a time across every
//! instance: the tree read for a check cannot change before the write that depends on it
//! commits. Under READ COMMITTED each statement after the lock sees every tree write that
//! committed before it. Pinned by `concurrent_tree_writes_across_two_stores_serialize`
//! in `tests/conformance_postgres.rs`.

use sqlx::PgConnection;
use tollgate_core::hierarchy::{check_cascading, check_placement};
use tollgate_core::{Group, LimitMode, Timestamp};

use super::rows;
use super::unique_violation;
use crate::sqlite::rows::{models_json, GROUP_COLUMNS};
use crate::{GroupPatch, GroupWriteError, NewGroup, StoreError, StoreResult};

/// Recursion guard: a tree is at most five levels deep; anything longer is corrupt.
const MAX_WALK: i32 = 8;

/// First key of the two-key advisory locks on a workspace's tree ("tree" in ASCII); the
/// second is a hash of the workspace id. Two-key locks never collide with the one-key
/// usage-event lock.
const TREE_LOCK_CLASS: i32 = 0x7472_6565;

/// Serializes this transaction's tree writes with every other one on the workspace,
/// released at commit or rollback.
pub(super) async fn lock_workspace(conn: &mut PgConnection, workspace_id: &str) -> StoreResult<()> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        .bind(TREE_LOCK_CLASS)
        .bind(workspace_id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The workspace of a group, deleted or not (a group never changes workspace).
pub(super) async fn workspace_of(conn: &mut PgConnection, id: &str) -> StoreResult<Option<String>> {
    Ok(
        sqlx::query_scalar("SELECT workspace_id FROM groups WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?,
    )
}

/// `[group, parent, ..., root]` of a live group; empty when it is absent or deleted.
pub(super) async fn chain(conn: &mut PgConnection, id: &str) -> StoreResult<Vec<Group>> {
    let sql = format!(
        "WITH RECURSIVE chain(id, parent_id, level) AS ( \
             SELECT id, parent_id, 0 FROM groups WHERE id = $1 AND deleted_at IS NULL \
             UNION ALL \
             SELECT p.id, p.parent_id, c.level + 1 FROM groups p \
             JOIN chain c ON p.id = c.parent_id \
             WHERE p.deleted_at IS NULL AND c.level < $2 \
         ) \
         SELECT {GROUP_COLUMNS} FROM chain JOIN groups g ON g.id = chain.id \
         ORDER BY chain.level"
    );
    let found = sqlx::query(&sql)
        .bind(id)
        .bind(MAX_WALK)
        .fetch_all(&mut *conn)
        .await?;
    let chain = found
        .iter()
        .map(|row| rows::group(row).map(|(_, group)| group))
        .collect::<StoreResult<Vec<_>>>()?;
    // A live group's ancestors are live, so a chain that stops short of a root means the
    // data was edited by hand; refuse it rather than drop an ancestor's limits.
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
async fn descendants(conn: &mut PgConnection, id: &str) -> StoreResult<Vec<Group>> {
    let sql = format!(
        "WITH RECURSIVE sub(id, level) AS ( \
             SELECT id, 1 FROM groups WHERE parent_id = $1 AND deleted_at IS NULL \
             UNION \
             SELECT g.id, s.level + 1 FROM groups g JOIN sub s ON g.parent_id = s.id \
             WHERE g.deleted_at IS NULL AND s.level < $2 \
         ) \
         SELECT {GROUP_COLUMNS} FROM sub JOIN groups g ON g.id = sub.id \
         ORDER BY g.seq"
    );
    let found = sqlx::query(&sql)
        .bind(id)
        .bind(MAX_WALK)
        .fetch_all(&mut *conn)
        .await?;
    found
        .iter()
        .map(|row| rows::group(row).map(|(_, group)| group))
        .collect()
}

/// Every descendant's id, deleted ones included, in creation order.
pub(super) async fn descendant_ids_with_deleted(
    conn: &mut PgConnection,
    id: &str,
) -> StoreResult<Vec<String>> {
    Ok(sqlx::query_scalar(
        "WITH RECURSIVE sub(id, level) AS ( \
             SELECT id, 1 FROM groups WHERE parent_id = $1 \
             UNION \
             SELECT g.id, s.level + 1 FROM groups g JOIN sub s ON g.parent_id = s.id \
             WHERE s.level < $2 \
         ) \
         SELECT g.id FROM groups g WHERE g.id IN (SELECT id FROM sub) ORDER BY g.seq",
    )
    .bind(id)
    .bind(MAX_WALK)
    .fetch_all(&mut *conn)
    .await?)
}

async fn external_id_taken(
    conn: &mut PgConnection,
    workspace_id: &str,
    external_entity_id: &str,
) -> StoreResult<bool> {
    let row = sqlx::query(
        "SELECT 1 FROM groups \
         WHERE workspace_id = $1 AND external_entity_id = $2 AND deleted_at IS NULL",
    )
    .bind(workspace_id)
    .bind(external_entity_id)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.is_some())
}

/// Placement, CASCADING thresholds and external id uniqueness, then the insert.
pub(super) async fn create(
    conn: &mut PgConnection,
    new: NewGroup,
) -> Result<Group, GroupWriteError> {
    lock_workspace(conn, &new.workspace_id).await?;
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
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(&new.id)
    .bind(&new.workspace_id)
    .bind(&new.name)
    .bind(&new.external_entity_id)
    .bind(models_json(&new.models)?)
    .bind(new.mode.as_str())
    .bind(&new.parent_id)
    .bind(i64::from(depth))
    .bind(new.created_at.0)
    .execute(&mut *conn)
    .await;
    if let Err(e) = inserted {
        return Err(match unique_violation(&e) {
            Some("groups_live_external_id") => GroupWriteError::DuplicateExternalId,
            Some(_) => GroupWriteError::Store(StoreError::Duplicate("id")),
            None => GroupWriteError::from(e),
        });
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
    conn: &mut PgConnection,
    id: &str,
    patch: GroupPatch,
) -> Result<Group, GroupWriteError> {
    let Some(workspace_id) = workspace_of(conn, id).await? else {
        return Err(GroupWriteError::NotFound);
    };
    lock_workspace(conn, &workspace_id).await?;
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

    sqlx::query("UPDATE groups SET name = $1, models = $2 WHERE id = $3")
        .bind(&group.name)
        .bind(models_json(&group.models)?)
        .bind(id)
        .execute(&mut *conn)
        .await?;
    Ok(group)
}

/// Marks the live subtree of `id` deleted and revokes every live key in it, all with the
/// same time. Returns the group as it was, or `None` when it is absent or deleted.
pub(super) async fn delete(
    conn: &mut PgConnection,
    id: &str,
    now: Timestamp,
) -> StoreResult<Option<Group>> {
    let Some(workspace_id) = workspace_of(conn, id).await? else {
        return Ok(None);
    };
    lock_workspace(conn, &workspace_id).await?;
    let Some(group) = chain(conn, id).await?.into_iter().next() else {
        return Ok(None);
    };
    // Keys first: once the groups are marked deleted the subtree walk finds nothing.
    const SUBTREE: &str = "WITH RECURSIVE subtree(id) AS ( \
             SELECT id FROM groups WHERE id = $1 AND deleted_at IS NULL \
             UNION \
             SELECT g.id FROM groups g JOIN subtree s ON g.parent_id = s.id \
             WHERE g.deleted_at IS NULL \
         ) ";
    sqlx::query(&format!(
        "{SUBTREE} UPDATE api_keys SET revoked_at = $2 \
         WHERE revoked_at IS NULL AND group_id IN (SELECT id FROM subtree)"
    ))
    .bind(id)
    .bind(now.0)
    .execute(&mut *conn)
    .await?;
    sqlx::query(&format!(
        "{SUBTREE} UPDATE groups SET deleted_at = $2 WHERE id IN (SELECT id FROM subtree)"
    ))
    .bind(id)
    .bind(now.0)
    .execute(&mut *conn)
    .await?;
    Ok(Some(group))
}
