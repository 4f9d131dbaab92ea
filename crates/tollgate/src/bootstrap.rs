//! First start and workspace administration: the `default` workspace, its first
//! `manage` key (printed once on stdout, never logged), `TOLLGATE_ADMIN_KEY`, and the
//! `tollgate workspace` commands.

use std::io::Write as _;

use anyhow::{bail, Context};
use tollgate_core::keys::{hash_key, lookup_prefix, mint_management_key};
use tollgate_core::Clock;
use tollgate_store::{NewManagementKey, PageRequest, Scope, Store, StoreError, Workspace};

pub const DEFAULT_WORKSPACE: &str = "default";

/// The name of the management key `TOLLGATE_ADMIN_KEY` installs.
pub const ADMIN_KEY_NAME: &str = "TOLLGATE_ADMIN_KEY";

/// Creates workspace `default` on an empty store (printing its first `manage` key unless
/// an admin key is configured) and makes `admin_key`, when set, a `manage` key of it.
pub async fn default_workspace(
    store: &dyn Store,
    clock: &dyn Clock,
    admin_key: Option<&str>,
) -> anyhow::Result<Workspace> {
    let workspace = match store.workspace_by_name(DEFAULT_WORKSPACE).await? {
        Some(existing) => existing,
        None => {
            let created = store
                .create_workspace(DEFAULT_WORKSPACE, clock.now())
                .await?;
            if admin_key.is_none() {
                let key = mint_first_key(store, clock, &created).await?;
                announce(&format!(
                    "Created workspace '{DEFAULT_WORKSPACE}'. Its management key (shown once, keep it safe):\n{key}\n"
                ));
            }
            created
        }
    };
    if let Some(key) = admin_key {
        let Some(prefix) = lookup_prefix(key) else {
            bail!("TOLLGATE_ADMIN_KEY is too short");
        };
        store
            .ensure_management_key(NewManagementKey {
                workspace_id: workspace.id.clone(),
                prefix: prefix.to_owned(),
                hash: hash_key(key).to_vec(),
                name: Some(ADMIN_KEY_NAME.to_owned()),
                scope: Scope::Manage,
                created_at: clock.now(),
            })
            .await?;
        revoke_replaced_admin_keys(store, clock, &workspace.id, prefix).await?;
    }
    Ok(workspace)
}

/// A changed `TOLLGATE_ADMIN_KEY` is a rotation: the values it replaces (the live keys of
/// the workspace named [`ADMIN_KEY_NAME`] with another prefix) stop working, as an
/// operator expects. Keys minted through the API are untouched.
async fn revoke_replaced_admin_keys(
    store: &dyn Store,
    clock: &dyn Clock,
    workspace_id: &str,
    current_prefix: &str,
) -> anyhow::Result<()> {
    let mut replaced = Vec::new();
    let mut page = PageRequest {
        limit: 1000,
        after: None,
    };
    loop {
        let found = store.list_management_keys(workspace_id, page).await?;
        replaced.extend(
            found
                .items
                .into_iter()
                .filter(|k| k.name.as_deref() == Some(ADMIN_KEY_NAME) && k.prefix != current_prefix)
                .map(|k| k.prefix),
        );
        match found.next_after {
            Some(after) => page.after = Some(after),
            None => break,
        }
    }
    for prefix in &replaced {
        store
            .revoke_management_key(workspace_id, prefix, clock.now())
            .await?;
    }
    if !replaced.is_empty() {
        tracing::info!(
            revoked = replaced.len(),
            "TOLLGATE_ADMIN_KEY changed: the previous value no longer works"
        );
    }
    Ok(())
}

async fn mint_first_key(
    store: &dyn Store,
    clock: &dyn Clock,
    workspace: &Workspace,
) -> anyhow::Result<String> {
    let minted = mint_management_key();
    store
        .insert_management_key(NewManagementKey {
            workspace_id: workspace.id.clone(),
            prefix: minted.prefix.clone(),
            hash: minted.hash.to_vec(),
            name: Some("first manage key".to_owned()),
            scope: Scope::Manage,
            created_at: clock.now(),
        })
        .await?;
    Ok(minted.full)
}

/// `tollgate workspace create NAME`: returns the new workspace's first `manage` key.
pub async fn create_workspace(
    store: &dyn Store,
    clock: &dyn Clock,
    name: &str,
) -> anyhow::Result<String> {
    if name.is_empty() || name.len() > 255 || name.chars().any(char::is_control) {
        bail!("workspace name must be 1..=255 characters without control characters");
    }
    let workspace = match store.create_workspace(name, clock.now()).await {
        Ok(workspace) => workspace,
        Err(StoreError::Duplicate(_)) => bail!("workspace '{name}' already exists"),
        Err(e) => return Err(e).context("creating workspace"),
    };
    mint_first_key(store, clock, &workspace).await
}

/// `tollgate workspace disable|enable NAME`.
pub async fn set_enabled(store: &dyn Store, name: &str, enabled: bool) -> anyhow::Result<()> {
    if !store.set_workspace_enabled(name, enabled).await? {
        bail!("no workspace named '{name}'");
    }
    Ok(())
}

/// Writes to stdout directly: key material goes to the operator, never into logs.
pub fn announce(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}
