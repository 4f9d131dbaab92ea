//! `tollgate serve --demo`: a built-in mock model behind endpoint `demo/echo`, a group
//! `demo-customer` that may call it, a fresh key, and a curl command that works pasted.

use std::net::SocketAddr;

use anyhow::Context;
use tollgate_core::endpoint::{Provider, Region, Target};
use tollgate_core::ids::{new_id, IdKind};
use tollgate_core::keys::mint_api_key;
use tollgate_core::{Clock, LimitMode, ModelAccess};
use tollgate_store::{GroupFilter, NewApiKey, NewEndpoint, NewGroup, PageRequest, Store};
use tollgate_testkit::MockUpstream;

use crate::bootstrap::{announce, DEFAULT_WORKSPACE};

pub const DEMO_SLUG: &str = "demo/echo";
pub const DEMO_CUSTOMER: &str = "demo-customer";

/// Starts the mock model and registers the demo objects; returns the running mock.
pub async fn setup(
    store: &dyn Store,
    clock: &dyn Clock,
    gateway: SocketAddr,
) -> anyhow::Result<MockUpstream> {
    let mock = MockUpstream::start()
        .await
        .context("starting the demo model")?;
    let workspace = store
        .workspace_by_name(DEFAULT_WORKSPACE)
        .await?
        .context("workspace 'default' is missing")?;
    let target = Target {
        provider: Provider::OpenaiCompatible,
        base_url: mock.base_url(),
        target_model: "echo".to_owned(),
        secret_id: None,
    };
    match store.endpoint_by_slug(DEMO_SLUG).await? {
        Some(existing) => {
            store
                .update_endpoint_targets(&existing.id, std::slice::from_ref(&target), clock.now())
                .await?;
        }
        None => {
            store
                .insert_endpoint(NewEndpoint {
                    id: new_id(IdKind::Endpoint),
                    workspace_id: workspace.id.clone(),
                    slug: DEMO_SLUG.to_owned(),
                    region: Region::Unrestricted,
                    targets: vec![target],
                    created_at: clock.now(),
                })
                .await?;
        }
    }
    let filter = GroupFilter {
        external_entity_id: Some(DEMO_CUSTOMER.to_owned()),
        parent_group_id: None,
    };
    let existing = store
        .list_groups(
            &workspace.id,
            &filter,
            PageRequest {
                limit: 1,
                after: None,
            },
        )
        .await?;
    let group = match existing.items.into_iter().next() {
        Some(group) => group,
        None => store
            .create_group(NewGroup {
                id: new_id(IdKind::Group),
                workspace_id: workspace.id.clone(),
                name: Some("Demo customer".to_owned()),
                external_entity_id: DEMO_CUSTOMER.to_owned(),
                models: vec![ModelAccess {
                    slug: DEMO_SLUG.to_owned(),
                    rate_limits: vec![],
                    usage_limits: vec![],
                }],
                mode: LimitMode::Independent,
                parent_id: None,
                created_at: clock.now(),
            })
            .await
            .map_err(|e| anyhow::anyhow!("creating the demo group: {e}"))?,
    };
    let key = mint_api_key();
    store
        .insert_api_key(NewApiKey {
            group_id: group.id.clone(),
            prefix: key.prefix.clone(),
            hash: key.hash.to_vec(),
            name: Some("demo key".to_owned()),
            created_at: clock.now(),
        })
        .await?;
    let host = if gateway.ip().is_unspecified() {
        SocketAddr::new([127, 0, 0, 1].into(), gateway.port())
    } else {
        gateway
    };
    announce(&format!(
        "Demo ready: endpoint '{DEMO_SLUG}' (mock model at {}), group '{DEMO_CUSTOMER}', key {}\n\
         Try:\n\
         curl http://{host}/v1/chat/completions -H 'Authorization: Bearer {}' -H 'Content-Type: application/json' -d '{{\"model\": \"{DEMO_SLUG}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello, Tollgate!\"}}]}}'\n",
        mock.base_url(),
        key.prefix,
        key.full,
    ));
    Ok(mock)
}
