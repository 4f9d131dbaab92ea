//! Conformance cases for the configuration change log and the bulk loads a mirror
//! starts from: which writes append a change (exactly one, in the write's transaction,
//! nothing for a write that changed nothing), paging after a cursor, pruning, and the
//! paged loads of the live configuration. Run by `change_log_conformance_cases!(opener)`
//! like `conformance_cases!` (the runner includes `cases.rs` too).

use std::sync::Arc;
use std::time::Duration;

use tollgate_core::endpoint::{Provider, Region, Target};
use tollgate_core::{Group, LimitMode, Timestamp};
use tollgate_store::{
    ConfigChange, ConfigKind, GroupPatch, NewApiKey, NewEndpoint, NewGroup, NewManagementKey,
    NewSecret, PageRequest, Scope, Store, UsageEvent, UsageStatus,
};

macro_rules! change_log_conformance_cases {
    ($open:path) => {
        change_log_conformance_cases!(
            $open;
            every_config_write_appends_exactly_one_change,
            config_changes_page_after_a_cursor,
            pruning_keeps_the_newest_change_and_marks_how_far_it_went,
            bulk_loads_page_through_the_live_configuration,
        );
    };
    ($open:path; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some((guard, store)) = cases::Opened::into_store($open().await) else {
                    return;
                };
                changes::$case(store).await;
                drop(guard);
            }
        )+
    };
}

const T0: Timestamp = Timestamp(1_796_320_404_123);
/// 2020-09-13: any change written by a database clock is later than this.
const LONG_AGO_MS: i64 = 1_600_000_000_000;

fn prefix(n: u32) -> String {
    format!("tg_{n:013}")
}

fn group(workspace: &str, id: &str, parent: Option<&str>) -> NewGroup {
    NewGroup {
        id: id.into(),
        workspace_id: workspace.into(),
        name: None,
        external_entity_id: format!("ext-{id}"),
        models: vec![],
        mode: LimitMode::Independent,
        parent_id: parent.map(str::to_owned),
        created_at: T0,
    }
}

fn key(group: &str, n: u32) -> NewApiKey {
    NewApiKey {
        group_id: group.into(),
        prefix: prefix(n),
        hash: vec![7; 32],
        name: None,
        created_at: T0,
    }
}

fn endpoint(workspace: &str, id: &str, slug: &str) -> NewEndpoint {
    NewEndpoint {
        id: id.into(),
        workspace_id: workspace.into(),
        slug: slug.into(),
        region: Region::Unrestricted,
        targets: vec![target("m-1")],
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

fn secret(workspace: &str, id: &str) -> NewSecret {
    NewSecret {
        id: id.into(),
        workspace_id: workspace.into(),
        name: format!("name-{id}"),
        ciphertext: vec![1, 2, 3],
        created_at: T0,
    }
}

/// `(kind, object_id)` of every change after `after`.
async fn changed(store: &Arc<dyn Store>, after: i64) -> Vec<(ConfigKind, String)> {
    let page = store.config_changes_after(after, 1000).await.unwrap();
    page.changes
        .into_iter()
        .map(|c| (c.kind, c.object_id))
        .collect()
}

fn kinds(expected: &[(ConfigKind, &str)]) -> Vec<(ConfigKind, String)> {
    expected
        .iter()
        .map(|(kind, id)| (*kind, (*id).to_owned()))
        .collect()
}

pub async fn every_config_write_appends_exactly_one_change(store: Arc<dyn Store>) {
    use ConfigKind::{ApiKey, Endpoint, Group, Secret, Workspace};
    assert_eq!(store.newest_config_change().await.unwrap(), 0);
    let ws = store.create_workspace("acme", T0).await.unwrap().id;
    assert!(store.set_workspace_enabled("acme", false).await.unwrap());
    assert!(store.set_workspace_enabled("acme", true).await.unwrap());
    store.set_signing_key(&ws, &[4; 32]).await.unwrap();
    store.insert_secret(secret(&ws, "sec_1")).await.unwrap();
    store.delete_secret("sec_1", T0).await.unwrap().unwrap();
    store
        .insert_endpoint(endpoint(&ws, "ep_1", "acme/m"))
        .await
        .unwrap();
    store
        .update_endpoint_targets("ep_1", &[target("m-2")], T0)
        .await
        .unwrap()
        .unwrap();
    store.delete_endpoint("ep_1", T0).await.unwrap().unwrap();
    store.create_group(group(&ws, "grp_o", None)).await.unwrap();
    store
        .create_group(group(&ws, "grp_a", Some("grp_o")))
        .await
        .unwrap();
    store
        .create_group(group(&ws, "grp_b", Some("grp_a")))
        .await
        .unwrap();
    store
        .update_group(
            "grp_o",
            GroupPatch {
                name: Some(Some("O".into())),
                models: None,
            },
        )
        .await
        .unwrap();
    store.insert_api_key(key("grp_a", 1)).await.unwrap();
    store.insert_api_key(key("grp_b", 2)).await.unwrap();
    store.insert_api_key(key("grp_o", 3)).await.unwrap();
    store
        .revoke_api_key("grp_o", &prefix(3), T0)
        .await
        .unwrap()
        .unwrap();
    // One change for the deleted subtree's root, none per descendant or revoked key.
    store.delete_group("grp_a", T0).await.unwrap().unwrap();
    let expected = kinds(&[
        (Workspace, &ws),
        (Workspace, &ws),
        (Workspace, &ws),
        (Workspace, &ws),
        (Secret, "sec_1"),
        (Secret, "sec_1"),
        (Endpoint, "ep_1"),
        (Endpoint, "ep_1"),
        (Endpoint, "ep_1"),
        (Group, "grp_o"),
        (Group, "grp_a"),
        (Group, "grp_b"),
        (Group, "grp_o"),
        (ApiKey, &prefix(1)),
        (ApiKey, &prefix(2)),
        (ApiKey, &prefix(3)),
        (ApiKey, &prefix(3)),
        (Group, "grp_a"),
    ]);
    assert_eq!(changed(&store, 0).await, expected);
    let newest = store.newest_config_change().await.unwrap();

    // Writes that change nothing, fail, or touch what the data plane does not serve
    // from memory append nothing.
    assert!(!store.set_workspace_enabled("nobody", false).await.unwrap());
    assert!(store.create_workspace("acme", T0).await.is_err());
    assert!(store.delete_secret("sec_1", T0).await.unwrap().is_none());
    assert!(store
        .update_endpoint_targets("ep_1", &[target("m-3")], T0)
        .await
        .unwrap()
        .is_none());
    assert!(store
        .delete_endpoint("ep_missing", T0)
        .await
        .unwrap()
        .is_none());
    assert!(store
        .create_group(group(&ws, "grp_x", Some("grp_missing")))
        .await
        .is_err());
    assert!(store
        .update_group("grp_b", GroupPatch::default())
        .await
        .is_err());
    assert!(store.delete_group("grp_b", T0).await.unwrap().is_none());
    assert!(store.insert_api_key(key("grp_o", 1)).await.is_err());
    assert!(store
        .revoke_api_key("grp_o", &prefix(3), T0)
        .await
        .unwrap()
        .is_none());
    store
        .insert_management_key(NewManagementKey {
            workspace_id: ws.clone(),
            prefix: "tgm_000000000001".into(),
            hash: vec![1; 32],
            name: None,
            scope: Scope::Manage,
            created_at: T0,
        })
        .await
        .unwrap();
    store
        .insert_usage_event(&UsageEvent {
            idempotency_key: "idem-1".into(),
            timestamp: T0,
            request_id: "req-1".into(),
            request_metadata: None,
            model_slug: "acme/m".into(),
            external_entity_id: "ext-grp_o".into(),
            api_key_prefix: prefix(1),
            group_id: "grp_o".into(),
            workspace_id: ws.clone(),
            status: UsageStatus::Completed,
            input_tokens: 1,
            output_tokens: 1,
            cached_input_tokens: 0,
            is_estimated: false,
        })
        .await
        .unwrap();
    assert_eq!(store.newest_config_change().await.unwrap(), newest);
    assert_eq!(changed(&store, 0).await, expected);
}

pub async fn config_changes_page_after_a_cursor(store: Arc<dyn Store>) {
    let empty = store.config_changes_after(0, 10).await.unwrap();
    assert!(empty.changes.is_empty());
    assert_eq!(empty.pruned_through, 0);

    let ws = store.create_workspace("acme", T0).await.unwrap().id;
    store.create_group(group(&ws, "grp_o", None)).await.unwrap();
    for n in 1..=5 {
        store.insert_api_key(key("grp_o", n)).await.unwrap();
    }
    let everything = store.config_changes_after(0, 1000).await.unwrap();
    assert_eq!(everything.changes.len(), 7);
    assert_eq!(everything.pruned_through, 0);
    let seqs: Vec<i64> = everything.changes.iter().map(|c| c.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(store.newest_config_change().await.unwrap(), seqs[6]);
    for change in &everything.changes {
        assert!(change.changed_at.0 > LONG_AGO_MS, "{change:?}");
    }

    // Paging by cursor: pages of 3 from the start, then from the middle.
    let first = store.config_changes_after(0, 3).await.unwrap().changes;
    assert_eq!(first, everything.changes[..3]);
    let second = store
        .config_changes_after(seqs[2], 3)
        .await
        .unwrap()
        .changes;
    assert_eq!(second, everything.changes[3..6]);
    let last = store
        .config_changes_after(seqs[5], 3)
        .await
        .unwrap()
        .changes;
    assert_eq!(last, everything.changes[6..]);
    assert!(store
        .config_changes_after(seqs[6], 3)
        .await
        .unwrap()
        .changes
        .is_empty());
    // A limit of 0 is read as 1.
    assert_eq!(
        store.config_changes_after(0, 0).await.unwrap().changes,
        everything.changes[..1]
    );
    assert_eq!(
        store
            .config_changes_after(seqs[3], 1)
            .await
            .unwrap()
            .changes,
        vec![ConfigChange {
            seq: seqs[4],
            kind: ConfigKind::ApiKey,
            object_id: prefix(3),
            changed_at: everything.changes[4].changed_at,
        }]
    );
}

pub async fn pruning_keeps_the_newest_change_and_marks_how_far_it_went(store: Arc<dyn Store>) {
    // An empty log prunes nothing.
    assert_eq!(store.prune_config_changes(Duration::ZERO).await.unwrap(), 0);
    let ws = store.create_workspace("acme", T0).await.unwrap().id;
    for n in 1..=4 {
        store
            .create_group(group(&ws, &format!("grp_{n}"), None))
            .await
            .unwrap();
    }
    let before = store.config_changes_after(0, 100).await.unwrap().changes;
    assert_eq!(before.len(), 5);
    let newest = before[4].seq;

    // Nothing is a day old.
    assert_eq!(
        store
            .prune_config_changes(Duration::from_secs(86_400))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store.config_changes_after(0, 100).await.unwrap().changes,
        before
    );

    // Keeping nothing still keeps the newest change, so the newest cursor stays readable.
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(store.prune_config_changes(Duration::ZERO).await.unwrap(), 4);
    let after = store.config_changes_after(0, 100).await.unwrap();
    assert_eq!(after.changes, before[4..]);
    assert_eq!(after.pruned_through, before[3].seq);
    assert_eq!(store.newest_config_change().await.unwrap(), newest);
    // A reader already at the newest change missed nothing.
    let current = store.config_changes_after(newest, 100).await.unwrap();
    assert!(current.changes.is_empty());
    assert!(current.pruned_through < newest);

    // Numbers are never handed out again after pruning.
    store.create_group(group(&ws, "grp_5", None)).await.unwrap();
    let next = store
        .config_changes_after(newest, 100)
        .await
        .unwrap()
        .changes;
    assert_eq!(next.len(), 1);
    assert!(next[0].seq > newest);
    assert_eq!(store.prune_config_changes(Duration::ZERO).await.unwrap(), 1);
    assert_eq!(
        store
            .config_changes_after(0, 100)
            .await
            .unwrap()
            .pruned_through,
        newest
    );
}

/// Every page's items, following `next_after`, with pages of 2.
macro_rules! load_all {
    ($store:expr, $method:ident) => {{
        let mut items = Vec::new();
        let mut after = None;
        loop {
            let page = $store
                .$method(PageRequest { limit: 2, after })
                .await
                .unwrap();
            assert!(page.items.len() <= 2);
            items.extend(page.items);
            match page.next_after {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        items
    }};
}

pub async fn bulk_loads_page_through_the_live_configuration(store: Arc<dyn Store>) {
    let empty: Vec<Group> = load_all!(store, live_groups_page);
    assert!(empty.is_empty());
    let acme = store.create_workspace("acme", T0).await.unwrap();
    let beta = store.create_workspace("beta", T0).await.unwrap();
    let gamma = store.create_workspace("gamma", T0).await.unwrap();
    store.set_workspace_enabled("beta", false).await.unwrap();
    let beta = store.workspace(&beta.id).await.unwrap().unwrap();
    assert!(!beta.is_enabled);
    assert_eq!(
        load_all!(store, workspaces_page),
        vec![acme.clone(), beta.clone(), gamma.clone()]
    );

    let o = store
        .create_group(group(&acme.id, "grp_o", None))
        .await
        .unwrap();
    store
        .create_group(group(&acme.id, "grp_a", Some("grp_o")))
        .await
        .unwrap();
    store
        .create_group(group(&acme.id, "grp_b", Some("grp_a")))
        .await
        .unwrap();
    let s = store
        .create_group(group(&acme.id, "grp_s", Some("grp_o")))
        .await
        .unwrap();
    let t = store
        .create_group(group(&beta.id, "grp_t", None))
        .await
        .unwrap();
    let k1 = store.insert_api_key(key("grp_o", 1)).await.unwrap();
    store.insert_api_key(key("grp_a", 2)).await.unwrap();
    store.insert_api_key(key("grp_b", 3)).await.unwrap();
    store.insert_api_key(key("grp_s", 4)).await.unwrap();
    let k5 = store.insert_api_key(key("grp_s", 5)).await.unwrap();
    let k6 = store.insert_api_key(key("grp_t", 6)).await.unwrap();
    store
        .revoke_api_key("grp_s", &prefix(4), T0)
        .await
        .unwrap()
        .unwrap();
    store.delete_group("grp_a", T0).await.unwrap().unwrap();
    assert_eq!(load_all!(store, live_groups_page), vec![o, s, t]);
    assert_eq!(load_all!(store, live_api_keys_page), vec![k1, k5, k6]);

    let e1 = store
        .insert_endpoint(endpoint(&acme.id, "ep_1", "acme/one"))
        .await
        .unwrap();
    store
        .insert_endpoint(endpoint(&acme.id, "ep_2", "acme/two"))
        .await
        .unwrap();
    let e3 = store
        .insert_endpoint(endpoint(&beta.id, "ep_3", "beta/three"))
        .await
        .unwrap();
    store.delete_endpoint("ep_2", T0).await.unwrap().unwrap();
    let e3 = store
        .update_endpoint_targets(&e3.id, &[target("m-9")], Timestamp(T0.0 + 1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(load_all!(store, live_endpoints_page), vec![e1, e3]);

    let s1 = store
        .insert_secret(secret(&acme.id, "sec_1"))
        .await
        .unwrap();
    store
        .insert_secret(secret(&acme.id, "sec_2"))
        .await
        .unwrap();
    let s3 = store
        .insert_secret(secret(&gamma.id, "sec_3"))
        .await
        .unwrap();
    store.delete_secret("sec_2", T0).await.unwrap().unwrap();
    assert_eq!(load_all!(store, live_secrets_page), vec![s1, s3]);
}
