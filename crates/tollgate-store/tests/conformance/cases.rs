//! The behaviour every `Store` implementation must have, written once against
//! `Arc<dyn Store>`. A runner (`tests/conformance.rs` for SQLite) gives each case a fresh,
//! empty store through `conformance_cases!`; a PostgreSQL runner reuses this file with
//! `#[path = "conformance/cases.rs"] #[macro_use] mod cases;` and its own opener.

use std::collections::HashSet;
use std::sync::Arc;

use tollgate_core::clock::DAY_MS;
use tollgate_core::endpoint::{Provider, Region, Target};
use tollgate_core::hierarchy::HierarchyError;
use tollgate_core::{
    Group, LimitMode, LimitType, LimitUnit, ModelAccess, RateLimit, Timestamp, UsageLimit,
};
use tollgate_store::{
    DayUsage, GroupFilter, GroupPatch, GroupWriteError, NewApiKey, NewEndpoint, NewGroup,
    NewManagementKey, NewSecret, PageRequest, Scope, Store, StoreError, UsageEvent, UsageFilter,
    UsageStatus,
};

/// Generates one `#[tokio::test]` per case; `$open` is an `async fn() -> (Guard,
/// Arc<dyn Store>)` returning a fresh, empty store and whatever must live as long as it,
/// or an `async fn() -> Option<(Guard, Arc<dyn Store>)>` whose `None` skips the case (the
/// opener says why: a server-backed store that is not configured on this machine).
macro_rules! conformance_cases {
    ($open:path) => {
        conformance_cases!(
            $open;
            workspace_names_are_unique,
            management_key_prefixes_are_unique_and_revocable,
            ensure_management_key_is_idempotent_and_takes_over_its_prefix,
            secrets_are_soft_deleted,
            endpoint_slugs_are_unique_among_live_endpoints,
            external_ids_are_unique_among_a_workspaces_live_groups,
            api_key_prefixes_are_unique_forever,
            create_group_checks_placement_depth_and_mode,
            cascading_child_above_an_ancestor_is_refused,
            patch_checks_cascading_against_ancestors_and_descendants,
            patch_of_name_and_models,
            delete_group_removes_the_subtree_and_revokes_its_keys,
            chain_and_resolve_api_key_run_from_the_group_to_the_root,
            keyset_paging_is_stable_while_rows_come_and_go,
            every_list_pages_in_creation_order,
            list_groups_filters,
            usage_events_are_listed_filtered_and_idempotent,
            usage_events_are_stored_in_batches_once_each,
            day_usage_sums_one_utc_day,
            pool_descendant_ids_cover_every_depth,
            concurrent_group_writes_succeed_or_fail_cleanly,
        );
    };
    ($open:path; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some((guard, store)) = cases::Opened::into_store($open().await) else {
                    return;
                };
                cases::$case(store).await;
                drop(guard);
            }
        )+
    };
}

/// What an opener returns: a fresh store with its guard, or `None` for a skipped case.
pub trait Opened {
    type Guard;
    fn into_store(self) -> Option<(Self::Guard, Arc<dyn Store>)>;
}

impl<G> Opened for (G, Arc<dyn Store>) {
    type Guard = G;
    fn into_store(self) -> Option<(G, Arc<dyn Store>)> {
        Some(self)
    }
}

impl<G> Opened for Option<(G, Arc<dyn Store>)> {
    type Guard = G;
    fn into_store(self) -> Option<(G, Arc<dyn Store>)> {
        self
    }
}

/// 2026-12-03T17:53:24.123Z.
pub const T0: Timestamp = Timestamp(1_796_320_404_123);
/// 2026-12-03T00:00:00Z.
pub const DAY: Timestamp = Timestamp(1_796_256_000_000);

const M: &str = "acme/m";

fn at(offset_ms: i64) -> Timestamp {
    Timestamp(T0.0 + offset_ms)
}

fn page(limit: u32, after: Option<i64>) -> PageRequest {
    PageRequest { limit, after }
}

const ALL: PageRequest = PageRequest {
    limit: 1000,
    after: None,
};

fn key_prefix(n: u32) -> String {
    format!("tg_{n:013}")
}

fn rate(slug: &str, kind: LimitType, unit: LimitUnit, threshold: u64) -> ModelAccess {
    ModelAccess {
        slug: slug.into(),
        rate_limits: vec![RateLimit {
            kind,
            unit,
            threshold,
        }],
        usage_limits: vec![],
    }
}

fn token_minute(threshold: u64) -> ModelAccess {
    rate(M, LimitType::Token, LimitUnit::Minute, threshold)
}

fn bare(slug: &str) -> ModelAccess {
    ModelAccess {
        slug: slug.into(),
        rate_limits: vec![],
        usage_limits: vec![],
    }
}

fn new_group(
    workspace: &str,
    id: &str,
    mode: LimitMode,
    parent: Option<&str>,
    models: Vec<ModelAccess>,
) -> NewGroup {
    NewGroup {
        id: id.into(),
        workspace_id: workspace.into(),
        name: None,
        external_entity_id: format!("ext-{id}"),
        models,
        mode,
        parent_id: parent.map(str::to_owned),
        created_at: T0,
    }
}

async fn add_group(
    store: &Arc<dyn Store>,
    workspace: &str,
    id: &str,
    mode: LimitMode,
    parent: Option<&str>,
    models: Vec<ModelAccess>,
) -> Group {
    store
        .create_group(new_group(workspace, id, mode, parent, models))
        .await
        .unwrap()
}

async fn add_workspace(store: &Arc<dyn Store>, name: &str) -> String {
    store.create_workspace(name, T0).await.unwrap().id
}

fn new_key(group: &str, n: u32) -> NewApiKey {
    NewApiKey {
        group_id: group.into(),
        prefix: key_prefix(n),
        hash: vec![u8::try_from(n % 256).unwrap(); 32],
        name: Some(format!("key {n}")),
        created_at: T0,
    }
}

fn new_management_key(workspace: &str, prefix: &str, hash: u8) -> NewManagementKey {
    NewManagementKey {
        workspace_id: workspace.into(),
        prefix: prefix.into(),
        hash: vec![hash; 32],
        name: Some("ops".into()),
        scope: Scope::Manage,
        created_at: T0,
    }
}

fn target(model: &str) -> Target {
    Target {
        provider: Provider::OpenaiCompatible,
        base_url: "https://models.example.com/v1".into(),
        target_model: model.into(),
        secret_id: None,
    }
}

fn new_endpoint(workspace: &str, id: &str, slug: &str) -> NewEndpoint {
    NewEndpoint {
        id: id.into(),
        workspace_id: workspace.into(),
        slug: slug.into(),
        region: Region::Unrestricted,
        targets: vec![target("m-1")],
        created_at: T0,
    }
}

fn event(n: u32, workspace: &str, group: &str, slug: &str, time: Timestamp) -> UsageEvent {
    UsageEvent {
        idempotency_key: format!("idem-{n}"),
        timestamp: time,
        request_id: format!("req-{n}"),
        request_metadata: Some(r#"{"team":"Équipe 🚀"}"#.into()),
        model_slug: slug.into(),
        external_entity_id: format!("ext-{group}"),
        api_key_prefix: key_prefix(1),
        group_id: group.into(),
        workspace_id: workspace.into(),
        status: UsageStatus::Completed,
        input_tokens: 10,
        output_tokens: 20,
        cached_input_tokens: 4,
        is_estimated: false,
    }
}

fn ids(groups: &[Group]) -> Vec<&str> {
    groups.iter().map(|g| g.id.as_str()).collect()
}

fn is_duplicate(result: &Result<impl std::fmt::Debug, StoreError>, what: &str) -> bool {
    matches!(result, Err(StoreError::Duplicate(w)) if *w == what)
}

// --- workspaces and management keys ------------------------------------------------------

pub async fn workspace_names_are_unique(store: Arc<dyn Store>) {
    let acme = store.create_workspace("acme", T0).await.unwrap();
    assert_eq!(acme.name, "acme");
    assert!(acme.is_enabled);
    assert_eq!(acme.signing_key, None);
    assert_eq!(acme.created_at, T0);
    let again = store.create_workspace("acme", at(1)).await;
    assert!(is_duplicate(&again, "workspace"), "{again:?}");

    assert_eq!(
        store.workspace_by_name("acme").await.unwrap(),
        Some(acme.clone())
    );
    assert_eq!(store.workspace(&acme.id).await.unwrap(), Some(acme.clone()));
    assert_eq!(store.workspace_by_name("nobody").await.unwrap(), None);
    assert_eq!(store.workspace("ws_missing").await.unwrap(), None);

    assert!(store.set_workspace_enabled("acme", false).await.unwrap());
    assert!(!store.workspace(&acme.id).await.unwrap().unwrap().is_enabled);
    assert!(store.set_workspace_enabled("acme", true).await.unwrap());
    assert!(store.workspace(&acme.id).await.unwrap().unwrap().is_enabled);
    assert!(!store.set_workspace_enabled("nobody", false).await.unwrap());

    store.set_signing_key(&acme.id, &[7u8; 32]).await.unwrap();
    assert_eq!(
        store
            .workspace(&acme.id)
            .await
            .unwrap()
            .unwrap()
            .signing_key,
        Some(vec![7u8; 32])
    );
}

pub async fn management_key_prefixes_are_unique_and_revocable(store: Arc<dyn Store>) {
    let ws = add_workspace(&store, "acme").await;
    let other = add_workspace(&store, "other").await;
    let key = store
        .insert_management_key(new_management_key(&ws, "tgm_000000000001", 1))
        .await
        .unwrap();
    assert_eq!(key.prefix, "tgm_000000000001");
    assert_eq!(key.scope, Scope::Manage);

    let clash = store
        .insert_management_key(new_management_key(&other, "tgm_000000000001", 2))
        .await;
    assert!(is_duplicate(&clash, "prefix"), "{clash:?}");

    let (found, workspace) = store
        .management_key_by_prefix("tgm_000000000001")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found, key);
    assert_eq!(workspace.id, ws);
    assert_eq!(workspace.name, "acme");

    let mut view = new_management_key(&ws, "tgm_000000000002", 3);
    view.scope = Scope::View;
    view.name = None;
    store.insert_management_key(view).await.unwrap();
    let listed = store.list_management_keys(&ws, ALL).await.unwrap();
    let prefixes: Vec<_> = listed.items.iter().map(|k| k.prefix.as_str()).collect();
    assert_eq!(prefixes, ["tgm_000000000001", "tgm_000000000002"]);
    assert_eq!(listed.items[1].scope, Scope::View);
    assert_eq!(listed.items[1].name, None);
    assert_eq!(listed.next_after, None);

    // Another workspace cannot revoke it.
    assert_eq!(
        store
            .revoke_management_key(&other, "tgm_000000000001", at(5))
            .await
            .unwrap(),
        None
    );
    let revoked = store
        .revoke_management_key(&ws, "tgm_000000000001", at(5))
        .await
        .unwrap();
    assert_eq!(revoked, Some(key));
    assert!(store
        .management_key_by_prefix("tgm_000000000001")
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        store
            .revoke_management_key(&ws, "tgm_000000000001", at(6))
            .await
            .unwrap(),
        None
    );
    let listed = store.list_management_keys(&ws, ALL).await.unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].prefix, "tgm_000000000002");

    // A revoked key's prefix stays taken.
    let reuse = store
        .insert_management_key(new_management_key(&ws, "tgm_000000000001", 9))
        .await;
    assert!(is_duplicate(&reuse, "prefix"), "{reuse:?}");
}

pub async fn ensure_management_key_is_idempotent_and_takes_over_its_prefix(store: Arc<dyn Store>) {
    let ws = add_workspace(&store, "default").await;
    let admin = new_management_key(&ws, "tgm_admin0000001", 1);
    store.ensure_management_key(admin.clone()).await.unwrap();
    let mut renamed = admin.clone();
    renamed.name = Some("renamed".into());
    renamed.created_at = at(1000);
    store.ensure_management_key(renamed).await.unwrap();
    let listed = store.list_management_keys(&ws, ALL).await.unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].name, Some("ops".into()));
    assert_eq!(listed.items[0].created_at, T0);

    // Revoked through the API, the configured key is live again on the next start.
    store
        .revoke_management_key(&ws, "tgm_admin0000001", at(2000))
        .await
        .unwrap()
        .unwrap();
    store.ensure_management_key(admin.clone()).await.unwrap();
    let (key, _) = store
        .management_key_by_prefix("tgm_admin0000001")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(key.hash, vec![1u8; 32]);

    // A different key with the same prefix replaces the row.
    let replacement = new_management_key(&ws, "tgm_admin0000001", 2);
    store.ensure_management_key(replacement).await.unwrap();
    let (key, _) = store
        .management_key_by_prefix("tgm_admin0000001")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(key.hash, vec![2u8; 32]);
    assert_eq!(
        store
            .list_management_keys(&ws, ALL)
            .await
            .unwrap()
            .items
            .len(),
        1
    );
}

// --- secrets and endpoints ---------------------------------------------------------------

pub async fn secrets_are_soft_deleted(store: Arc<dyn Store>) {
    let ws = add_workspace(&store, "acme").await;
    let new = NewSecret {
        id: "sec_1".into(),
        workspace_id: ws.clone(),
        name: "upstream".into(),
        ciphertext: vec![1, 2, 3],
        created_at: T0,
    };
    let secret = store.insert_secret(new.clone()).await.unwrap();
    assert_eq!(secret.ciphertext, vec![1, 2, 3]);
    let same_id = store
        .insert_secret(NewSecret {
            name: "other".into(),
            ..new.clone()
        })
        .await;
    assert!(is_duplicate(&same_id, "id"), "{same_id:?}");
    let same_name = store
        .insert_secret(NewSecret {
            id: "sec_2".into(),
            ..new.clone()
        })
        .await;
    assert!(is_duplicate(&same_name, "name"), "{same_name:?}");

    assert_eq!(store.secret("sec_1").await.unwrap(), Some(secret.clone()));
    assert_eq!(
        store.list_secrets(&ws, ALL).await.unwrap().items,
        vec![secret.clone()]
    );
    assert_eq!(
        store.delete_secret("sec_1", at(1)).await.unwrap(),
        Some(secret)
    );
    assert_eq!(store.secret("sec_1").await.unwrap(), None);
    assert!(store.list_secrets(&ws, ALL).await.unwrap().items.is_empty());
    assert_eq!(store.delete_secret("sec_1", at(2)).await.unwrap(), None);
    assert_eq!(
        store.delete_secret("sec_missing", at(2)).await.unwrap(),
        None
    );
    // A deleted secret's name can be used again.
    let reused = store
        .insert_secret(NewSecret {
            id: "sec_3".into(),
            ..new
        })
        .await
        .unwrap();
    assert_eq!(reused.name, "upstream");
}

pub async fn endpoint_slugs_are_unique_among_live_endpoints(store: Arc<dyn Store>) {
    let ws = add_workspace(&store, "acme").await;
    let other = add_workspace(&store, "other").await;
    let first = store
        .insert_endpoint(new_endpoint(&ws, "ep_1", M))
        .await
        .unwrap();
    assert_eq!(first.updated_at, T0);
    assert_eq!(first.targets, vec![target("m-1")]);

    // Slugs are unique across the installation, not per workspace.
    let clash = store.insert_endpoint(new_endpoint(&other, "ep_2", M)).await;
    assert!(is_duplicate(&clash, "slug"), "{clash:?}");
    let same_id = store
        .insert_endpoint(new_endpoint(&ws, "ep_1", "acme/x"))
        .await;
    assert!(is_duplicate(&same_id, "id"), "{same_id:?}");

    assert_eq!(store.endpoint("ep_1").await.unwrap(), Some(first.clone()));
    assert_eq!(
        store.endpoint_by_slug(M).await.unwrap(),
        Some(first.clone())
    );

    let targets = vec![target("m-2"), target("m-3")];
    let updated = store
        .update_endpoint_targets("ep_1", &targets, at(10))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(updated.targets, targets);
    assert_eq!(updated.created_at, T0);
    assert_eq!(updated.updated_at, at(10));
    assert_eq!(store.endpoint("ep_1").await.unwrap(), Some(updated.clone()));

    assert_eq!(
        store.delete_endpoint("ep_1", at(20)).await.unwrap(),
        Some(updated)
    );
    assert_eq!(store.endpoint("ep_1").await.unwrap(), None);
    assert_eq!(store.endpoint_by_slug(M).await.unwrap(), None);
    assert_eq!(store.delete_endpoint("ep_1", at(21)).await.unwrap(), None);
    assert_eq!(
        store
            .update_endpoint_targets("ep_1", &targets, at(22))
            .await
            .unwrap(),
        None
    );

    // The deleted endpoint's slug can be taken again, by any workspace.
    let reborn = store
        .insert_endpoint(new_endpoint(&other, "ep_3", M))
        .await
        .unwrap();
    assert_eq!(
        store.endpoint_by_slug(M).await.unwrap(),
        Some(reborn.clone())
    );
    assert!(store
        .list_endpoints(&ws, ALL)
        .await
        .unwrap()
        .items
        .is_empty());
    assert_eq!(
        store.list_endpoints(&other, ALL).await.unwrap().items,
        vec![reborn]
    );
    let twice = store.insert_endpoint(new_endpoint(&ws, "ep_4", M)).await;
    assert!(is_duplicate(&twice, "slug"), "{twice:?}");
}

// --- groups ------------------------------------------------------------------------------

pub async fn external_ids_are_unique_among_a_workspaces_live_groups(store: Arc<dyn Store>) {
    let ws = add_workspace(&store, "acme").await;
    let other = add_workspace(&store, "other").await;
    let mut first = new_group(&ws, "grp_1", LimitMode::Independent, None, vec![bare(M)]);
    first.external_entity_id = "cust-1".into();
    store.create_group(first.clone()).await.unwrap();

    let mut clash = first.clone();
    clash.id = "grp_2".into();
    let refused = store.create_group(clash.clone()).await;
    assert!(
        matches!(refused, Err(GroupWriteError::DuplicateExternalId)),
        "{refused:?}"
    );
    // A child with the same external id is refused too.
    clash.parent_id = Some("grp_1".into());
    let refused = store.create_group(clash).await;
    assert!(
        matches!(refused, Err(GroupWriteError::DuplicateExternalId)),
        "{refused:?}"
    );

    let mut elsewhere = first.clone();
    elsewhere.id = "grp_3".into();
    elsewhere.workspace_id = other;
    store.create_group(elsewhere).await.unwrap();

    store.delete_group("grp_1", at(1)).await.unwrap().unwrap();
    let mut reuse = first;
    reuse.id = "grp_4".into();
    let reused = store.create_group(reuse).await.unwrap();
    assert_eq!(reused.external_entity_id, "cust-1");
    let found = store
        .list_groups(
            &ws,
            &GroupFilter {
                external_entity_id: Some("cust-1".into()),
                parent_group_id: None,
            },
            ALL,
        )
        .await
        .unwrap();
    assert_eq!(ids(&found.items), ["grp_4"]);
}

pub async fn api_key_prefixes_are_unique_forever(store: Arc<dyn Store>) {
    let ws = add_workspace(&store, "acme").await;
    add_group(
        &store,
        &ws,
        "grp_a",
        LimitMode::Independent,
        None,
        vec![bare(M)],
    )
    .await;
    add_group(
        &store,
        &ws,
        "grp_b",
        LimitMode::Independent,
        None,
        vec![bare(M)],
    )
    .await;

    let key = store.insert_api_key(new_key("grp_a", 1)).await.unwrap();
    assert_eq!(key.prefix, key_prefix(1));
    assert_eq!(key.name, Some("key 1".into()));
    let clash = store.insert_api_key(new_key("grp_b", 1)).await;
    assert!(is_duplicate(&clash, "prefix"), "{clash:?}");

    assert_eq!(
        store.api_key("grp_a", &key_prefix(1)).await.unwrap(),
        Some(key.clone())
    );
    // A prefix under another group answers nothing.
    assert_eq!(store.api_key("grp_b", &key_prefix(1)).await.unwrap(), None);
    assert_eq!(
        store
            .revoke_api_key("grp_b", &key_prefix(1), at(1))
            .await
            .unwrap(),
        None
    );

    assert_eq!(
        store
            .revoke_api_key("grp_a", &key_prefix(1), at(1))
            .await
            .unwrap(),
        Some(key)
    );
    assert_eq!(store.api_key("grp_a", &key_prefix(1)).await.unwrap(), None);
    assert!(store
        .resolve_api_key(&key_prefix(1))
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        store
            .revoke_api_key("grp_a", &key_prefix(1), at(2))
            .await
            .unwrap(),
        None
    );

    // Revoked, the prefix stays taken.
    assert!(store.api_key_prefix_exists(&key_prefix(1)).await.unwrap());
    assert!(!store.api_key_prefix_exists(&key_prefix(2)).await.unwrap());
    let reuse = store.insert_api_key(new_key("grp_a", 1)).await;
    assert!(is_duplicate(&reuse, "prefix"), "{reuse:?}");

    store.insert_api_key(new_key("grp_a", 2)).await.unwrap();
    let listed = store.list_api_keys("grp_a", ALL).await.unwrap();
    let prefixes: Vec<_> = listed.items.iter().map(|k| k.prefix.clone()).collect();
    assert_eq!(prefixes, [key_prefix(2)]);
}

pub async fn create_group_checks_placement_depth_and_mode(store: Arc<dyn Store>) {
    let ws = add_workspace(&store, "acme").await;
    let other = add_workspace(&store, "other").await;
    let c = LimitMode::Cascading;
    let mut parent: Option<String> = None;
    for level in 1..=5u32 {
        let id = format!("grp_l{level}");
        let group = add_group(&store, &ws, &id, c, parent.as_deref(), vec![bare(M)]).await;
        assert_eq!(group.depth, level);
        assert_eq!(group.parent_id, parent);
        assert_eq!(store.group(&id).await.unwrap().unwrap().depth, level);
        parent = Some(id);
    }

    let too_deep = store
        .create_group(new_group(&ws, "grp_l6", c, Some("grp_l5"), vec![bare(M)]))
        .await;
    assert!(
        matches!(
            too_deep,
            Err(GroupWriteError::Hierarchy(HierarchyError::TooDeep))
        ),
        "{too_deep:?}"
    );
    assert_eq!(store.group("grp_l6").await.unwrap(), None);

    let mismatch = store
        .create_group(new_group(
            &ws,
            "grp_x",
            LimitMode::Independent,
            Some("grp_l1"),
            vec![bare(M)],
        ))
        .await;
    match mismatch {
        Err(GroupWriteError::Hierarchy(e)) => {
            assert_eq!(
                e,
                HierarchyError::ModeMismatch {
                    parent: "CASCADING"
                }
            )
        }
        other => panic!("expected a mode mismatch, got {other:?}"),
    }

    let absent = store
        .create_group(new_group(&ws, "grp_x", c, Some("grp_nope"), vec![bare(M)]))
        .await;
    assert!(
        matches!(absent, Err(GroupWriteError::ParentNotFound)),
        "{absent:?}"
    );

    let foreign = store
        .create_group(new_group(&other, "grp_x", c, Some("grp_l1"), vec![bare(M)]))
        .await;
    assert!(
        matches!(foreign, Err(GroupWriteError::ParentNotFound)),
        "{foreign:?}"
    );

    store.delete_group("grp_l4", at(1)).await.unwrap().unwrap();
    let deleted = store
        .create_group(new_group(&ws, "grp_x", c, Some("grp_l4"), vec![bare(M)]))
        .await;
    assert!(
        matches!(deleted, Err(GroupWriteError::ParentNotFound)),
        "{deleted:?}"
    );
    // Level 4 is free again under level 3.
    let relevel = add_group(&store, &ws, "grp_x", c, Some("grp_l3"), vec![bare(M)]).await;
    assert_eq!(relevel.depth, 4);
}

pub async fn cascading_child_above_an_ancestor_is_refused(store: Arc<dyn Store>) {
    let ws = add_workspace(&store, "acme").await;
    let c = LimitMode::Cascading;
    let per_minute = |n| rate(M, LimitType::Request, LimitUnit::Minute, n);
    add_group(&store, &ws, "grp_a", c, None, vec![per_minute(60)]).await;
    add_group(&store, &ws, "grp_mid", c, Some("grp_a"), vec![bare(M)]).await;

    for parent in ["grp_a", "grp_mid"] {
        let refused = store
            .create_group(new_group(
                &ws,
                "grp_b",
                c,
                Some(parent),
                vec![per_minute(600)],
            ))
            .await;
        match refused {
            Err(GroupWriteError::Hierarchy(e)) => {
                assert_eq!(e.to_string(), "Child group exceeds parent group limit.")
            }
            other => panic!("expected ExceedsParent under {parent}, got {other:?}"),
        }
    }
    assert_eq!(store.group("grp_b").await.unwrap(), None);

    // Equal is allowed; other (type, unit) pairs are not compared.
    add_group(
        &store,
        &ws,
        "grp_b",
        c,
        Some("grp_mid"),
        vec![per_minute(60)],
    )
    .await;
    let day = ModelAccess {
        slug: M.into(),
        rate_limits: vec![],
        usage_limits: vec![UsageLimit {
            kind: LimitType::Request,
            unit: LimitUnit::Day,
            threshold: 100_000,
        }],
    };
    add_group(&store, &ws, "grp_c", c, Some("grp_a"), vec![day]).await;

    // The same numbers are free in an INDEPENDENT tree.
    let i = LimitMode::Independent;
    add_group(&store, &ws, "grp_ia", i, None, vec![per_minute(60)]).await;
    let child = add_group(
        &store,
        &ws,
        "grp_ib",
        i,
        Some("grp_ia"),
        vec![per_minute(600)],
    )
    .await;
    assert_eq!(child.models, vec![per_minute(600)]);
    assert_eq!(
        store.group("grp_ib").await.unwrap().unwrap().models,
        vec![per_minute(600)]
    );
}

pub async fn patch_checks_cascading_against_ancestors_and_descendants(store: Arc<dyn Store>) {
    let ws = add_workspace(&store, "acme").await;
    let c = LimitMode::Cascading;
    add_group(&store, &ws, "grp_root", c, None, vec![token_minute(100)]).await;
    add_group(&store, &ws, "grp_mid", c, Some("grp_root"), vec![bare(M)]).await;
    add_group(
        &store,
        &ws,
        "grp_leaf",
        c,
        Some("grp_mid"),
        vec![token_minute(70)],
    )
    .await;
    add_group(
        &store,
        &ws,
        "grp_side",
        c,
        Some("grp_root"),
        vec![token_minute(50)],
    )
    .await;

    let models = |m: ModelAccess| GroupPatch {
        name: None,
        models: Some(vec![m]),
    };
    let refused = |r: Result<Group, GroupWriteError>| {
        matches!(
            r,
            Err(GroupWriteError::Hierarchy(HierarchyError::ExceedsParent))
        )
    };

    // Lowering the root below a grandchild's declaration (through a silent middle).
    assert!(refused(
        store
            .update_group("grp_root", models(token_minute(69)))
            .await
    ));
    assert_eq!(
        store.group("grp_root").await.unwrap().unwrap().models,
        vec![token_minute(100)]
    );
    // Declaring on the middle group below its child, or above its parent.
    assert!(refused(
        store
            .update_group("grp_mid", models(token_minute(60)))
            .await
    ));
    assert!(refused(
        store
            .update_group("grp_mid", models(token_minute(101)))
            .await
    ));
    // A leaf above an ancestor.
    assert!(refused(
        store
            .update_group("grp_leaf", models(token_minute(101)))
            .await
    ));

    // Down to the largest descendant's value is fine, and raising is fine.
    let root = store
        .update_group("grp_root", models(token_minute(70)))
        .await
        .unwrap();
    assert_eq!(root.models, vec![token_minute(70)]);
    store
        .update_group("grp_root", models(token_minute(500)))
        .await
        .unwrap();
    let leaf = store
        .update_group("grp_leaf", models(token_minute(500)))
        .await
        .unwrap();
    assert_eq!(leaf.models, vec![token_minute(500)]);
    store
        .update_group("grp_mid", models(token_minute(500)))
        .await
        .unwrap();
    // Removing the root's limit (unlimited) is always allowed.
    store
        .update_group("grp_root", models(bare(M)))
        .await
        .unwrap();
    store
        .update_group("grp_leaf", models(token_minute(900)))
        .await
        .unwrap_err();
    store
        .update_group("grp_mid", models(token_minute(900)))
        .await
        .unwrap();

    // A deleted descendant no longer bounds its ancestors.
    store
        .delete_group("grp_leaf", at(1))
        .await
        .unwrap()
        .unwrap();
    store
        .update_group("grp_mid", models(token_minute(1)))
        .await
        .unwrap();

    // INDEPENDENT trees are never bounded.
    let i = LimitMode::Independent;
    add_group(&store, &ws, "grp_ir", i, None, vec![token_minute(100)]).await;
    add_group(
        &store,
        &ws,
        "grp_ic",
        i,
        Some("grp_ir"),
        vec![token_minute(700)],
    )
    .await;
    store
        .update_group("grp_ir", models(token_minute(1)))
        .await
        .unwrap();
    store
        .update_group("grp_ic", models(token_minute(9000)))
        .await
        .unwrap();
}

pub async fn patch_of_name_and_models(store: Arc<dyn Store>) {
    let ws = add_workspace(&store, "acme").await;
    let mut new = new_group(&ws, "grp_1", LimitMode::Independent, None, vec![bare(M)]);
    new.name = Some("Acme".into());
    store.create_group(new).await.unwrap();

    let renamed = store
        .update_group(
            "grp_1",
            GroupPatch {
                name: Some(Some("Acme Ltd".into())),
                models: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(renamed.name, Some("Acme Ltd".into()));
    assert_eq!(renamed.models, vec![bare(M)]);

    // `models` replaces the whole list; `[]` removes all access.
    let replaced = store
        .update_group(
            "grp_1",
            GroupPatch {
                name: None,
                models: Some(vec![bare("acme/x"), token_minute(5)]),
            },
        )
        .await
        .unwrap();
    assert_eq!(replaced.name, Some("Acme Ltd".into()));
    assert_eq!(replaced.models, vec![bare("acme/x"), token_minute(5)]);
    let emptied = store
        .update_group(
            "grp_1",
            GroupPatch {
                name: Some(None),
                models: Some(vec![]),
            },
        )
        .await
        .unwrap();
    assert_eq!(emptied.name, None);
    assert_eq!(emptied.models, vec![]);
    assert_eq!(store.group("grp_1").await.unwrap(), Some(emptied));

    let missing = store.update_group("grp_nope", GroupPatch::default()).await;
    assert!(
        matches!(missing, Err(GroupWriteError::NotFound)),
        "{missing:?}"
    );
    store.delete_group("grp_1", at(1)).await.unwrap().unwrap();
    let deleted = store
        .update_group(
            "grp_1",
            GroupPatch {
                name: Some(Some("ghost".into())),
                models: None,
            },
        )
        .await;
    assert!(
        matches!(deleted, Err(GroupWriteError::NotFound)),
        "{deleted:?}"
    );
}

pub async fn delete_group_removes_the_subtree_and_revokes_its_keys(store: Arc<dyn Store>) {
    let ws = add_workspace(&store, "acme").await;
    let c = LimitMode::Cascading;
    add_group(&store, &ws, "grp_r", c, None, vec![bare(M)]).await;
    let a = add_group(&store, &ws, "grp_a", c, Some("grp_r"), vec![bare(M)]).await;
    add_group(&store, &ws, "grp_b", c, Some("grp_a"), vec![bare(M)]).await;
    add_group(&store, &ws, "grp_c", c, Some("grp_b"), vec![bare(M)]).await;
    add_group(&store, &ws, "grp_s", c, Some("grp_r"), vec![bare(M)]).await;
    for (n, group) in [
        (1, "grp_r"),
        (2, "grp_a"),
        (3, "grp_b"),
        (4, "grp_c"),
        (5, "grp_s"),
    ] {
        store.insert_api_key(new_key(group, n)).await.unwrap();
    }
    // Two keys in A, one already revoked: its revocation time must not change.
    store.insert_api_key(new_key("grp_a", 6)).await.unwrap();
    store
        .revoke_api_key("grp_a", &key_prefix(6), at(1))
        .await
        .unwrap()
        .unwrap();

    let (deleted, when) = store.delete_group("grp_a", at(50)).await.unwrap().unwrap();
    assert_eq!(deleted, a);
    assert_eq!(when, at(50));

    for gone in ["grp_a", "grp_b", "grp_c"] {
        assert_eq!(store.group(gone).await.unwrap(), None, "{gone}");
        assert!(store.group_chain(gone).await.unwrap().is_empty(), "{gone}");
    }
    for n in [2, 3, 4, 6] {
        assert!(
            store
                .resolve_api_key(&key_prefix(n))
                .await
                .unwrap()
                .is_none(),
            "key {n}"
        );
    }
    assert!(store
        .api_key("grp_a", &key_prefix(2))
        .await
        .unwrap()
        .is_none());
    assert!(store
        .list_api_keys("grp_b", ALL)
        .await
        .unwrap()
        .items
        .is_empty());

    // The parent and the sibling are untouched.
    for (n, group) in [(1, "grp_r"), (5, "grp_s")] {
        let grant = store
            .resolve_api_key(&key_prefix(n))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(grant.chain[0].id, group);
    }
    let listed = store
        .list_groups(&ws, &GroupFilter::default(), ALL)
        .await
        .unwrap();
    assert_eq!(ids(&listed.items), ["grp_r", "grp_s"]);
    // The deleted child still belongs to the root's pool: its spend today keeps counting.
    assert_eq!(
        store.pool_descendant_ids("grp_r").await.unwrap(),
        ["grp_a", "grp_b", "grp_c", "grp_s"]
    );

    // A key inserted after its group was deleted (a request racing the delete) is
    // invisible.
    store.insert_api_key(new_key("grp_b", 7)).await.unwrap();
    assert!(store
        .api_key("grp_b", &key_prefix(7))
        .await
        .unwrap()
        .is_none());
    assert!(store
        .list_api_keys("grp_b", ALL)
        .await
        .unwrap()
        .items
        .is_empty());
    assert!(store
        .resolve_api_key(&key_prefix(7))
        .await
        .unwrap()
        .is_none());

    assert!(store.delete_group("grp_a", at(60)).await.unwrap().is_none());
    assert!(store.delete_group("grp_b", at(60)).await.unwrap().is_none());
    assert!(store
        .delete_group("grp_nope", at(60))
        .await
        .unwrap()
        .is_none());
}

pub async fn chain_and_resolve_api_key_run_from_the_group_to_the_root(store: Arc<dyn Store>) {
    let ws = add_workspace(&store, "acme").await;
    let i = LimitMode::Independent;
    add_group(&store, &ws, "grp_r", i, None, vec![token_minute(100)]).await;
    add_group(&store, &ws, "grp_a", i, Some("grp_r"), vec![bare(M)]).await;
    let b = add_group(
        &store,
        &ws,
        "grp_b",
        i,
        Some("grp_a"),
        vec![token_minute(7)],
    )
    .await;

    let chain = store.group_chain("grp_b").await.unwrap();
    assert_eq!(ids(&chain), ["grp_b", "grp_a", "grp_r"]);
    assert_eq!(chain[0], b);
    assert_eq!(ids(&store.group_chain("grp_r").await.unwrap()), ["grp_r"]);
    assert!(store.group_chain("grp_nope").await.unwrap().is_empty());

    let key = store.insert_api_key(new_key("grp_b", 1)).await.unwrap();
    let grant = store
        .resolve_api_key(&key_prefix(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(grant.key, key);
    assert_eq!(ids(&grant.chain), ["grp_b", "grp_a", "grp_r"]);
    assert_eq!(grant.chain[2].models, vec![token_minute(100)]);
    assert_eq!(grant.workspace.id, ws);
    assert!(grant.workspace.is_enabled);
    assert!(store
        .resolve_api_key(&key_prefix(2))
        .await
        .unwrap()
        .is_none());

    // A PATCH is visible on the next resolve.
    store
        .update_group(
            "grp_r",
            GroupPatch {
                name: None,
                models: Some(vec![token_minute(3)]),
            },
        )
        .await
        .unwrap();
    let grant = store
        .resolve_api_key(&key_prefix(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(grant.chain[2].models, vec![token_minute(3)]);

    // A disabled workspace still resolves; the caller answers 401 from `is_enabled`.
    store.set_workspace_enabled("acme", false).await.unwrap();
    let grant = store
        .resolve_api_key(&key_prefix(1))
        .await
        .unwrap()
        .unwrap();
    assert!(!grant.workspace.is_enabled);
}

// --- paging and filters ------------------------------------------------------------------

pub async fn keyset_paging_is_stable_while_rows_come_and_go(store: Arc<dyn Store>) {
    let ws = add_workspace(&store, "acme").await;
    let i = LimitMode::Independent;
    for n in 0..10 {
        add_group(&store, &ws, &format!("grp_{n:02}"), i, None, vec![bare(M)]).await;
    }
    let everything = GroupFilter::default();

    let first = store
        .list_groups(&ws, &everything, page(3, None))
        .await
        .unwrap();
    assert_eq!(ids(&first.items), ["grp_00", "grp_01", "grp_02"]);
    let mut seen: Vec<String> = first.items.iter().map(|g| g.id.clone()).collect();
    let mut cursor = first.next_after;
    assert!(cursor.is_some());

    // During the walk: delete one row already seen and one not reached yet, insert new
    // rows, and delete the row the cursor points at.
    store.delete_group("grp_01", at(1)).await.unwrap().unwrap();
    store.delete_group("grp_05", at(1)).await.unwrap().unwrap();
    store.delete_group("grp_02", at(1)).await.unwrap().unwrap();
    let mut extra = 0;
    let mut pages = 1;
    while let Some(after) = cursor {
        let next = store
            .list_groups(&ws, &everything, page(3, Some(after)))
            .await
            .unwrap();
        seen.extend(next.items.iter().map(|g| g.id.clone()));
        cursor = next.next_after;
        pages += 1;
        if extra < 2 {
            add_group(
                &store,
                &ws,
                &format!("grp_new{extra}"),
                i,
                None,
                vec![bare(M)],
            )
            .await;
            extra += 1;
        }
        assert!(pages < 20, "paging does not terminate");
    }

    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "duplicates in {seen:?}");
    assert_eq!(
        seen,
        [
            "grp_00", "grp_01", "grp_02", "grp_03", "grp_04", "grp_06", "grp_07", "grp_08",
            "grp_09", "grp_new0", "grp_new1"
        ]
    );

    // A page that ends exactly at the last row says there is no more.
    let all = store
        .list_groups(&ws, &everything, page(10, None))
        .await
        .unwrap();
    assert_eq!(all.items.len(), 9);
    assert_eq!(all.next_after, None);
    let exact = store
        .list_groups(&ws, &everything, page(9, None))
        .await
        .unwrap();
    assert_eq!(exact.items.len(), 9);
    assert_eq!(exact.next_after, None);
    let short = store
        .list_groups(&ws, &everything, page(8, None))
        .await
        .unwrap();
    assert_eq!(short.items.len(), 8);
    let tail = store
        .list_groups(&ws, &everything, page(8, short.next_after))
        .await
        .unwrap();
    assert_eq!(ids(&tail.items), ["grp_new1"]);
    assert_eq!(tail.next_after, None);
}

pub async fn every_list_pages_in_creation_order(store: Arc<dyn Store>) {
    let ws = add_workspace(&store, "acme").await;
    add_group(
        &store,
        &ws,
        "grp_1",
        LimitMode::Independent,
        None,
        vec![bare(M)],
    )
    .await;
    for n in 1..=3u8 {
        store
            .insert_management_key(new_management_key(&ws, &format!("tgm_00000000000{n}"), n))
            .await
            .unwrap();
        store
            .insert_secret(NewSecret {
                id: format!("sec_{n}"),
                workspace_id: ws.clone(),
                name: format!("s{n}"),
                ciphertext: vec![n],
                created_at: T0,
            })
            .await
            .unwrap();
        store
            .insert_endpoint(new_endpoint(&ws, &format!("ep_{n}"), &format!("acme/m{n}")))
            .await
            .unwrap();
        store
            .insert_api_key(new_key("grp_1", u32::from(n)))
            .await
            .unwrap();
        store
            .insert_usage_event(&event(u32::from(n), &ws, "grp_1", M, T0))
            .await
            .unwrap();
    }

    let first = store
        .list_management_keys(&ws, page(2, None))
        .await
        .unwrap();
    let rest = store
        .list_management_keys(&ws, page(2, first.next_after))
        .await
        .unwrap();
    let names: Vec<_> = first
        .items
        .iter()
        .chain(&rest.items)
        .map(|k| k.prefix.clone())
        .collect();
    assert_eq!(
        names,
        ["tgm_000000000001", "tgm_000000000002", "tgm_000000000003"]
    );
    assert_eq!((first.items.len(), rest.next_after), (2, None));

    let first = store.list_secrets(&ws, page(2, None)).await.unwrap();
    let rest = store
        .list_secrets(&ws, page(2, first.next_after))
        .await
        .unwrap();
    let names: Vec<_> = first
        .items
        .iter()
        .chain(&rest.items)
        .map(|s| s.id.clone())
        .collect();
    assert_eq!(names, ["sec_1", "sec_2", "sec_3"]);
    assert_eq!((first.items.len(), rest.next_after), (2, None));

    let first = store.list_endpoints(&ws, page(2, None)).await.unwrap();
    let rest = store
        .list_endpoints(&ws, page(2, first.next_after))
        .await
        .unwrap();
    let names: Vec<_> = first
        .items
        .iter()
        .chain(&rest.items)
        .map(|e| e.id.clone())
        .collect();
    assert_eq!(names, ["ep_1", "ep_2", "ep_3"]);
    assert_eq!((first.items.len(), rest.next_after), (2, None));

    let first = store.list_api_keys("grp_1", page(2, None)).await.unwrap();
    let rest = store
        .list_api_keys("grp_1", page(2, first.next_after))
        .await
        .unwrap();
    let names: Vec<_> = first
        .items
        .iter()
        .chain(&rest.items)
        .map(|k| k.prefix.clone())
        .collect();
    assert_eq!(names, [key_prefix(1), key_prefix(2), key_prefix(3)]);
    assert_eq!((first.items.len(), rest.next_after), (2, None));

    let by_workspace = UsageFilter {
        workspace_id: Some(ws.clone()),
        ..UsageFilter::default()
    };
    let first = store
        .list_usage_events(&by_workspace, page(2, None))
        .await
        .unwrap();
    let rest = store
        .list_usage_events(&by_workspace, page(2, first.next_after))
        .await
        .unwrap();
    let names: Vec<_> = first
        .items
        .iter()
        .chain(&rest.items)
        .map(|e| e.request_id.clone())
        .collect();
    assert_eq!(names, ["req-1", "req-2", "req-3"]);
    assert_eq!((first.items.len(), rest.next_after), (2, None));
}

pub async fn list_groups_filters(store: Arc<dyn Store>) {
    let ws = add_workspace(&store, "acme").await;
    let other = add_workspace(&store, "other").await;
    let i = LimitMode::Independent;
    add_group(&store, &ws, "grp_r1", i, None, vec![bare(M)]).await;
    add_group(&store, &ws, "grp_c1", i, Some("grp_r1"), vec![bare(M)]).await;
    add_group(&store, &ws, "grp_g1", i, Some("grp_c1"), vec![bare(M)]).await;
    add_group(&store, &ws, "grp_r2", i, None, vec![bare(M)]).await;
    add_group(&store, &ws, "grp_c2", i, Some("grp_r1"), vec![bare(M)]).await;
    add_group(&store, &ws, "grp_c3", i, Some("grp_r2"), vec![bare(M)]).await;
    add_group(&store, &other, "grp_o1", i, None, vec![bare(M)]).await;

    let list = |external: Option<&str>, parent: Option<&str>| {
        let store = store.clone();
        let ws = ws.clone();
        let filter = GroupFilter {
            external_entity_id: external.map(str::to_owned),
            parent_group_id: parent.map(str::to_owned),
        };
        async move {
            let page = store.list_groups(&ws, &filter, ALL).await.unwrap();
            page.items.into_iter().map(|g| g.id).collect::<Vec<_>>()
        }
    };
    assert_eq!(
        list(None, None).await,
        ["grp_r1", "grp_c1", "grp_g1", "grp_r2", "grp_c2", "grp_c3"]
    );
    assert_eq!(list(Some("ext-grp_c2"), None).await, ["grp_c2"]);
    assert_eq!(list(Some("ext-grp_o1"), None).await, Vec::<String>::new());
    assert_eq!(list(None, Some("grp_r1")).await, ["grp_c1", "grp_c2"]);
    assert_eq!(list(None, Some("grp_c1")).await, ["grp_g1"]);
    assert_eq!(list(Some("ext-grp_c2"), Some("grp_r1")).await, ["grp_c2"]);
    assert_eq!(
        list(Some("ext-grp_c2"), Some("grp_r2")).await,
        Vec::<String>::new()
    );
    assert_eq!(list(None, Some("grp_o1")).await, Vec::<String>::new());

    store.delete_group("grp_c1", at(1)).await.unwrap().unwrap();
    assert_eq!(list(None, Some("grp_r1")).await, ["grp_c2"]);
    assert_eq!(list(None, Some("grp_c1")).await, Vec::<String>::new());
}

// --- usage -------------------------------------------------------------------------------

pub async fn usage_events_are_listed_filtered_and_idempotent(store: Arc<dyn Store>) {
    let e1 = event(1, "ws_a", "grp_1", M, T0);
    let mut e2 = event(2, "ws_a", "grp_2", M, at(1));
    e2.status = UsageStatus::ClientCancelled;
    e2.request_metadata = None;
    e2.is_estimated = true;
    e2.output_tokens = 5;
    let mut e3 = event(3, "ws_b", "grp_3", "acme/x", at(2));
    e3.status = UsageStatus::UpstreamErrorMidStream;
    e3.input_tokens = 9_007_199_254_740_993; // above 2^53: stored exactly
    e3.api_key_prefix = key_prefix(7);
    for e in [&e1, &e2, &e3] {
        store.insert_usage_event(e).await.unwrap();
    }
    // The same event again (a spool replayed after a crash) is stored once.
    let mut replay = e1.clone();
    replay.output_tokens = 999;
    store.insert_usage_event(&replay).await.unwrap();

    let list = |filter: UsageFilter| {
        let store = store.clone();
        async move { store.list_usage_events(&filter, ALL).await.unwrap().items }
    };
    assert_eq!(
        list(UsageFilter::default()).await,
        vec![e1.clone(), e2.clone(), e3.clone()]
    );
    assert_eq!(
        list(UsageFilter {
            workspace_id: Some("ws_a".into()),
            ..UsageFilter::default()
        })
        .await,
        vec![e1.clone(), e2.clone()]
    );
    assert_eq!(
        list(UsageFilter {
            group_id: Some("grp_2".into()),
            ..UsageFilter::default()
        })
        .await,
        vec![e2.clone()]
    );
    assert_eq!(
        list(UsageFilter {
            request_id: Some("req-3".into()),
            ..UsageFilter::default()
        })
        .await,
        vec![e3.clone()]
    );
    assert_eq!(
        list(UsageFilter {
            workspace_id: Some("ws_b".into()),
            group_id: Some("grp_1".into()),
            ..UsageFilter::default()
        })
        .await,
        vec![]
    );
    assert_eq!(
        list(UsageFilter {
            external_entity_id: Some("ext-grp_2".into()),
            ..UsageFilter::default()
        })
        .await,
        vec![e2.clone()]
    );
    assert_eq!(
        list(UsageFilter {
            api_key_prefix: Some(key_prefix(7)),
            ..UsageFilter::default()
        })
        .await,
        vec![e3.clone()]
    );
    // start inclusive, end exclusive.
    assert_eq!(
        list(UsageFilter {
            start_time: Some(at(1)),
            end_time: Some(at(2)),
            ..UsageFilter::default()
        })
        .await,
        vec![e2.clone()]
    );
    assert_eq!(
        list(UsageFilter {
            start_time: Some(at(1)),
            ..UsageFilter::default()
        })
        .await,
        vec![e2, e3]
    );
}

/// The group commit's write: a batch larger than one INSERT statement, a key repeated
/// inside the batch and a key stored before are each stored once, first copy kept, in
/// the order given.
pub async fn usage_events_are_stored_in_batches_once_each(store: Arc<dyn Store>) {
    store.insert_usage_events(&[]).await.unwrap();
    let earlier = event(0, "ws_a", "grp_1", M, T0);
    store.insert_usage_event(&earlier).await.unwrap();

    let mut batch: Vec<UsageEvent> = (1..=300)
        .map(|n| event(n, "ws_a", "grp_1", M, at(i64::from(n))))
        .collect();
    batch[7].status = UsageStatus::ClientCancelled;
    batch[7].request_metadata = None;
    batch[7].is_estimated = true;
    batch[200].input_tokens = 9_007_199_254_740_993; // above 2^53: stored exactly
    let mut repeated = batch[5].clone();
    repeated.output_tokens = 999;
    let mut replayed = earlier.clone();
    replayed.output_tokens = 999;
    batch.insert(150, repeated);
    batch.insert(0, replayed);
    store.insert_usage_events(&batch).await.unwrap();
    // The whole batch again: nothing new.
    store.insert_usage_events(&batch).await.unwrap();
    // A small batch (one INSERT statement) repeating a key inside it.
    let small = event(301, "ws_a", "grp_1", M, at(301));
    let mut repeated_small = small.clone();
    repeated_small.output_tokens = 7;
    store
        .insert_usage_events(&[small.clone(), repeated_small])
        .await
        .unwrap();

    let stored = store
        .list_usage_events(&UsageFilter::default(), ALL)
        .await
        .unwrap()
        .items;
    let mut expected = vec![earlier];
    expected.extend((1..=300).map(|n| {
        let mut e = event(n, "ws_a", "grp_1", M, at(i64::from(n)));
        if n == 8 {
            e.status = UsageStatus::ClientCancelled;
            e.request_metadata = None;
            e.is_estimated = true;
        }
        if n == 201 {
            e.input_tokens = 9_007_199_254_740_993;
        }
        e
    }));
    expected.push(small);
    assert_eq!(stored.len(), 302);
    assert_eq!(stored, expected);
}

pub async fn day_usage_sums_one_utc_day(store: Arc<dyn Store>) {
    let end = DAY.0 + DAY_MS;
    let mut n = 0;
    let mut add = |group: &str, slug: &str, time: i64, input: u64, output: u64| {
        n += 1;
        let mut e = event(n, "ws_a", group, slug, Timestamp(time));
        e.input_tokens = input;
        e.output_tokens = output;
        e.cached_input_tokens = input / 2;
        e
    };
    let events = [
        add("grp_1", M, DAY.0, 10, 20),   // first millisecond of the day
        add("grp_1", M, end - 1, 5, 5),   // last millisecond of the day
        add("grp_1", M, end, 100, 100),   // next day
        add("grp_1", M, DAY.0 - 1, 7, 7), // previous day
        add("grp_2", M, DAY.0 + 3_600_000, 1, 2), // a sibling
        add("grp_1", "acme/x", DAY.0 + 1, 3, 3), // another slug
    ];
    for e in &events {
        store.insert_usage_event(e).await.unwrap();
    }
    let usage = |groups: &[&str], slug: &str, day: Timestamp| {
        let store = store.clone();
        let groups: Vec<String> = groups.iter().map(|g| (*g).to_owned()).collect();
        let slug = slug.to_owned();
        async move { store.day_usage(&groups, &slug, day).await.unwrap() }
    };
    let day_usage = |requests, tokens| Some(DayUsage { requests, tokens });

    assert_eq!(usage(&["grp_1"], M, DAY).await, day_usage(2, 40));
    assert_eq!(usage(&["grp_1", "grp_2"], M, DAY).await, day_usage(3, 43));
    assert_eq!(usage(&["grp_2"], M, DAY).await, day_usage(1, 3));
    assert_eq!(usage(&["grp_1"], "acme/x", DAY).await, day_usage(1, 6));
    assert_eq!(
        usage(&["grp_1"], M, Timestamp(end)).await,
        day_usage(1, 200)
    );
    assert_eq!(
        usage(&["grp_1"], M, Timestamp(DAY.0 - DAY_MS)).await,
        day_usage(1, 14)
    );
    assert_eq!(usage(&["grp_3"], M, DAY).await, None);
    assert_eq!(usage(&["grp_1"], "acme/none", DAY).await, None);
    assert_eq!(usage(&[], M, DAY).await, None);
    // A listed id twice counts once, as in any IN list.
    assert_eq!(usage(&["grp_2", "grp_2"], M, DAY).await, day_usage(1, 3));

    // A CASCADING root's pool can hold more groups than SQLite takes parameters
    // (32,766): 40,000 ids, the two with usage at the far ends of the list.
    let mut many: Vec<String> = vec!["grp_1".into()];
    many.extend((0..39_998).map(|n| format!("grp_x{n}")));
    many.push("grp_2".into());
    assert_eq!(
        store.day_usage(&many, M, DAY).await.unwrap(),
        day_usage(3, 43)
    );
}

pub async fn pool_descendant_ids_cover_every_depth(store: Arc<dyn Store>) {
    let ws = add_workspace(&store, "acme").await;
    let c = LimitMode::Cascading;
    add_group(&store, &ws, "grp_r", c, None, vec![bare(M)]).await;
    add_group(&store, &ws, "grp_a", c, Some("grp_r"), vec![bare(M)]).await;
    add_group(&store, &ws, "grp_b", c, Some("grp_a"), vec![bare(M)]).await;
    add_group(&store, &ws, "grp_s", c, Some("grp_r"), vec![bare(M)]).await;
    add_group(&store, &ws, "grp_c", c, Some("grp_b"), vec![bare(M)]).await;
    add_group(&store, &ws, "grp_d", c, Some("grp_c"), vec![bare(M)]).await;

    assert_eq!(
        store.pool_descendant_ids("grp_r").await.unwrap(),
        ["grp_a", "grp_b", "grp_s", "grp_c", "grp_d"]
    );
    assert_eq!(
        store.pool_descendant_ids("grp_a").await.unwrap(),
        ["grp_b", "grp_c", "grp_d"]
    );
    assert!(store.pool_descendant_ids("grp_d").await.unwrap().is_empty());
    assert!(store
        .pool_descendant_ids("grp_nope")
        .await
        .unwrap()
        .is_empty());

    // Deleted descendants stay in the pool: what they spent today still counts.
    store.delete_group("grp_c", at(1)).await.unwrap().unwrap();
    assert_eq!(
        store.pool_descendant_ids("grp_r").await.unwrap(),
        ["grp_a", "grp_b", "grp_s", "grp_c", "grp_d"]
    );
}

// --- concurrency -------------------------------------------------------------------------

/// 20 group writes at once: every one either succeeds or fails with the rule it broke,
/// never with a database error (SQLITE_BUSY and the like).
pub async fn concurrent_group_writes_succeed_or_fail_cleanly(store: Arc<dyn Store>) {
    let ws = add_workspace(&store, "acme").await;
    let c = LimitMode::Cascading;
    add_group(&store, &ws, "grp_root", c, None, vec![token_minute(100)]).await;

    let mut tasks = Vec::new();
    for n in 0..20 {
        let store = store.clone();
        let ws = ws.clone();
        tasks.push(tokio::spawn(async move {
            let new = match n % 4 {
                // Distinct children.
                0 | 1 => new_group(
                    &ws,
                    &format!("grp_{n}"),
                    c,
                    Some("grp_root"),
                    vec![token_minute(50)],
                ),
                // All racing for one external id.
                2 => {
                    let mut g =
                        new_group(&ws, &format!("grp_{n}"), c, Some("grp_root"), vec![bare(M)]);
                    g.external_entity_id = "cust-shared".into();
                    g
                }
                // Above the root's limit.
                _ => new_group(
                    &ws,
                    &format!("grp_{n}"),
                    c,
                    Some("grp_root"),
                    vec![token_minute(101)],
                ),
            };
            let created = store.create_group(new).await;
            // Reads and other writes interleave with the creates.
            store.group_chain("grp_root").await.unwrap();
            store
                .insert_usage_event(&event(n, &ws, "grp_root", M, T0))
                .await
                .unwrap();
            (n, created)
        }));
    }

    let mut created = 0;
    let mut shared_winners = 0;
    for task in tasks {
        let (n, result) = task.await.unwrap();
        match (n % 4, result) {
            (0 | 1, Ok(_)) => created += 1,
            (2, Ok(_)) => shared_winners += 1,
            (2, Err(GroupWriteError::DuplicateExternalId)) => {}
            (3, Err(GroupWriteError::Hierarchy(HierarchyError::ExceedsParent))) => {}
            (n, other) => panic!("task {n}: unexpected {other:?}"),
        }
    }
    assert_eq!(created, 10);
    assert_eq!(shared_winners, 1);
    assert_eq!(
        store.pool_descendant_ids("grp_root").await.unwrap().len(),
        11
    );
    let events = store
        .list_usage_events(&UsageFilter::default(), ALL)
        .await
        .unwrap();
    assert_eq!(events.items.len(), 20);
    assert_eq!(
        store
            .day_usage(&["grp_root".into()], M, T0.utc_day_start())
            .await
            .unwrap(),
        Some(DayUsage {
            requests: 20,
            tokens: 600
        })
    );
}
