//! Persistence behind one [`Store`] trait.
//!
//! Every implementation (SQLite, PostgreSQL) passes the same conformance suite
//! (`tests/conformance.rs`). Write paths that depend on the tree (group create / patch /
//! delete) run the pure rules of `tollgate_core::hierarchy` inside one transaction, so two
//! concurrent writes can never leave the tree in a state the rules forbid.

mod availability;
mod mirror;
mod model;
mod postgres;
mod sqlite;

use async_trait::async_trait;
use tollgate_core::Timestamp;

pub use mirror::{MirrorOptions, MirrorStats, MirroredStore, Refresher};
pub use model::*;
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A uniqueness rule was broken; the string names what clashed (e.g. `slug`).
    #[error("duplicate {0}")]
    Duplicate(&'static str),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration error: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

/// Why a group create or PATCH was refused.
#[derive(Debug, thiserror::Error)]
pub enum GroupWriteError {
    #[error(transparent)]
    Hierarchy(#[from] tollgate_core::hierarchy::HierarchyError),
    /// The parent does not exist, is deleted, or belongs to another workspace.
    #[error("parent group not found")]
    ParentNotFound,
    /// Another live group of the workspace has this external_entity_id.
    #[error("duplicate external_entity_id")]
    DuplicateExternalId,
    /// The group to patch does not exist or is deleted.
    #[error("group not found")]
    NotFound,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for GroupWriteError {
    fn from(e: sqlx::Error) -> Self {
        GroupWriteError::Store(StoreError::Database(e))
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// All of Tollgate's state. Reads of a single object return it whatever its workspace
/// (callers answer 403 for another workspace's object); deleted or revoked objects are
/// `None`. Lists return live rows of one workspace in creation order, keyset-paged
/// (a `limit` of 0 is read as 1).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    // --- workspaces -------------------------------------------------------------------
    /// `Err(Duplicate("workspace"))` when the name is taken.
    async fn create_workspace(&self, name: &str, now: Timestamp) -> StoreResult<Workspace>;
    async fn workspace_by_name(&self, name: &str) -> StoreResult<Option<Workspace>>;
    async fn workspace(&self, id: &str) -> StoreResult<Option<Workspace>>;
    /// Returns false when no workspace has that name.
    async fn set_workspace_enabled(&self, name: &str, enabled: bool) -> StoreResult<bool>;
    /// Sets the workspace's Ed25519 public key for key registration.
    async fn set_signing_key(&self, workspace_id: &str, public_key: &[u8]) -> StoreResult<()>;

    // --- management keys --------------------------------------------------------------
    /// `Err(Duplicate("prefix"))` when the prefix is taken by any management key.
    async fn insert_management_key(&self, key: NewManagementKey) -> StoreResult<ManagementKey>;
    /// Inserts the key unless a live key with the same hash exists (TOLLGATE_ADMIN_KEY on
    /// every start). When another row — a revoked copy of this key or a different key —
    /// holds the prefix, that row is replaced by this key, live.
    async fn ensure_management_key(&self, key: NewManagementKey) -> StoreResult<()>;
    /// A live management key by prefix, with its workspace.
    async fn management_key_by_prefix(
        &self,
        prefix: &str,
    ) -> StoreResult<Option<(ManagementKey, Workspace)>>;
    async fn list_management_keys(
        &self,
        workspace_id: &str,
        page: PageRequest,
    ) -> StoreResult<Page<ManagementKey>>;
    async fn revoke_management_key(
        &self,
        workspace_id: &str,
        prefix: &str,
        now: Timestamp,
    ) -> StoreResult<Option<ManagementKey>>;

    // --- secrets ----------------------------------------------------------------------
    /// `Err(Duplicate("name"))` when a live secret of the workspace has the name.
    async fn insert_secret(&self, secret: NewSecret) -> StoreResult<Secret>;
    async fn secret(&self, id: &str) -> StoreResult<Option<Secret>>;
    async fn list_secrets(
        &self,
        workspace_id: &str,
        page: PageRequest,
    ) -> StoreResult<Page<Secret>>;
    async fn delete_secret(&self, id: &str, now: Timestamp) -> StoreResult<Option<Secret>>;

    // --- endpoints --------------------------------------------------------------------
    /// `Err(Duplicate("slug"))` when a live endpoint anywhere has the slug.
    async fn insert_endpoint(&self, endpoint: NewEndpoint) -> StoreResult<Endpoint>;
    async fn endpoint(&self, id: &str) -> StoreResult<Option<Endpoint>>;
    async fn endpoint_by_slug(&self, slug: &str) -> StoreResult<Option<Endpoint>>;
    async fn list_endpoints(
        &self,
        workspace_id: &str,
        page: PageRequest,
    ) -> StoreResult<Page<Endpoint>>;
    async fn update_endpoint_targets(
        &self,
        id: &str,
        targets: &[tollgate_core::endpoint::Target],
        now: Timestamp,
    ) -> StoreResult<Option<Endpoint>>;
    async fn delete_endpoint(&self, id: &str, now: Timestamp) -> StoreResult<Option<Endpoint>>;

    // --- groups -----------------------------------------------------------------------
    /// Checks placement (mode, depth), CASCADING thresholds against ancestors and the
    /// external id's uniqueness, then inserts — all in one transaction.
    async fn create_group(&self, group: NewGroup) -> Result<tollgate_core::Group, GroupWriteError>;
    async fn group(&self, id: &str) -> StoreResult<Option<tollgate_core::Group>>;
    /// `[group, parent, ..., root]`; empty when the group is absent or deleted.
    async fn group_chain(&self, id: &str) -> StoreResult<Vec<tollgate_core::Group>>;
    async fn list_groups(
        &self,
        workspace_id: &str,
        filter: &GroupFilter,
        page: PageRequest,
    ) -> StoreResult<Page<tollgate_core::Group>>;
    /// Applies a PATCH, checking CASCADING thresholds against ancestors and descendants
    /// in the same transaction.
    async fn update_group(
        &self,
        id: &str,
        patch: GroupPatch,
    ) -> Result<tollgate_core::Group, GroupWriteError>;
    /// Deletes the group's whole subtree and revokes every key in it, atomically.
    async fn delete_group(
        &self,
        id: &str,
        now: Timestamp,
    ) -> StoreResult<Option<(tollgate_core::Group, Timestamp)>>;

    // --- API keys ---------------------------------------------------------------------
    /// `Err(Duplicate("prefix"))` when any key, live or revoked, has the prefix.
    async fn insert_api_key(&self, key: NewApiKey) -> StoreResult<ApiKey>;
    async fn api_key(&self, group_id: &str, prefix: &str) -> StoreResult<Option<ApiKey>>;
    async fn list_api_keys(&self, group_id: &str, page: PageRequest) -> StoreResult<Page<ApiKey>>;
    async fn revoke_api_key(
        &self,
        group_id: &str,
        prefix: &str,
        now: Timestamp,
    ) -> StoreResult<Option<ApiKey>>;
    /// True when any API key, live or revoked, has this prefix.
    async fn api_key_prefix_exists(&self, prefix: &str) -> StoreResult<bool>;
    /// Everything the data plane needs about a live key: its hash, its group chain, its
    /// workspace. `None` for unknown or revoked keys and for keys of deleted groups.
    async fn resolve_api_key(&self, prefix: &str) -> StoreResult<Option<KeyGrant>>;

    // --- configuration change log (what `MirroredStore` follows) ----------------------
    /// At most `limit` (0 is read as 1) changes with a sequence number above `after`,
    /// oldest first, and how far the log has been pruned.
    ///
    /// Every write of workspaces, secrets, endpoints, groups and API keys appends its
    /// change in the same transaction as the write. Like usage events, sequence numbers
    /// must become visible in increasing order: a mirror moves its cursor past what it
    /// saw, so a change numbered below one already seen would never be applied.
    async fn config_changes_after(&self, after: i64, limit: u32) -> StoreResult<ConfigChanges>;
    /// The newest change's sequence number; 0 when no change was ever written.
    async fn newest_config_change(&self) -> StoreResult<i64>;
    /// Deletes the changes written more than `keep` ago (by the database's clock), never
    /// the newest one, and raises `pruned_through` to the largest number deleted.
    /// Returns how many were deleted.
    async fn prune_config_changes(&self, keep: std::time::Duration) -> StoreResult<u64>;

    // --- bulk loads of the data plane's configuration ----------------------------------
    // Keyset-paged like the lists, over every workspace, so no load holds more than one
    // page of rows at a time.
    /// Every workspace, enabled or not.
    async fn workspaces_page(&self, page: PageRequest) -> StoreResult<Page<Workspace>>;
    async fn live_groups_page(&self, page: PageRequest) -> StoreResult<Page<tollgate_core::Group>>;
    /// Live keys of live groups.
    async fn live_api_keys_page(&self, page: PageRequest) -> StoreResult<Page<ApiKey>>;
    async fn live_endpoints_page(&self, page: PageRequest) -> StoreResult<Page<Endpoint>>;
    async fn live_secrets_page(&self, page: PageRequest) -> StoreResult<Page<Secret>>;

    // --- usage ------------------------------------------------------------------------
    /// Idempotent on `idempotency_key`: storing an event again (a spool replayed after a
    /// crash) keeps the first copy and is not an error.
    async fn insert_usage_event(&self, event: &UsageEvent) -> StoreResult<()>;
    /// Stores every event in one transaction (the data plane's group commit): all are
    /// stored or, on error, none. Idempotent per `idempotency_key` like
    /// [`Store::insert_usage_event`], including a key repeated within `events`. Events
    /// get their sequence numbers in slice order. An empty slice writes nothing.
    async fn insert_usage_events(&self, events: &[UsageEvent]) -> StoreResult<()>;
    async fn list_usage_events(
        &self,
        filter: &UsageFilter,
        page: PageRequest,
    ) -> StoreResult<Page<UsageEvent>>;
    /// Requests and tokens of the day starting at `day_start` on `slug`, summed over the
    /// events of `group_ids`. `None` when there was no event.
    async fn day_usage(
        &self,
        group_ids: &[String],
        slug: &str,
        day_start: Timestamp,
    ) -> StoreResult<Option<DayUsage>>;
    /// Ids of every descendant of the group (not including itself), any depth, deleted
    /// ones included: a CASCADING pool keeps counting what a since-deleted child spent
    /// today, so deleting children can never refill an ancestor's daily pool.
    async fn pool_descendant_ids(&self, id: &str) -> StoreResult<Vec<String>>;

    // --- billing webhooks -------------------------------------------------------------
    /// Inserts the endpoint and its first signing secret in one transaction. Its cursor
    /// starts at the newest usage event's sequence number, so events stored before it
    /// existed are never sent to it.
    async fn insert_webhook_endpoint(
        &self,
        endpoint: NewWebhookEndpoint,
    ) -> StoreResult<WebhookEndpoint>;
    /// A live endpoint, whatever its workspace.
    async fn webhook_endpoint(&self, id: &str) -> StoreResult<Option<WebhookEndpoint>>;
    async fn list_webhook_endpoints(
        &self,
        workspace_id: &str,
        page: PageRequest,
    ) -> StoreResult<Page<WebhookEndpoint>>;
    /// Every live endpoint of every workspace (the delivery worker's round), in creation
    /// order.
    async fn all_webhook_endpoints(&self) -> StoreResult<Vec<WebhookEndpoint>>;
    /// Soft-deletes the endpoint; its pending deliveries are no longer sent.
    async fn delete_webhook_endpoint(
        &self,
        id: &str,
        now: Timestamp,
    ) -> StoreResult<Option<WebhookEndpoint>>;
    /// Makes `ciphertext` the endpoint's current secret and sets `expires_at =
    /// retire_at` on every secret still live after `retire_at` — one transaction.
    /// Returns the new secret; `None` when the endpoint is absent or deleted.
    async fn rotate_webhook_secret(
        &self,
        webhook_id: &str,
        ciphertext: Vec<u8>,
        now: Timestamp,
        retire_at: Timestamp,
    ) -> StoreResult<Option<WebhookSecret>>;
    /// The secrets that sign at `now` (no `expires_at`, or one after `now`), newest first.
    async fn webhook_secrets(
        &self,
        webhook_id: &str,
        now: Timestamp,
    ) -> StoreResult<Vec<WebhookSecret>>;
    /// At most `limit` usage events of the workspace stored after sequence number
    /// `after`, in storage order, with their sequence numbers.
    ///
    /// Every backend must make sequence numbers visible in increasing order: once a
    /// reader has seen sequence number N, no event with a smaller number may appear
    /// later. Webhook cursors and event-list cursors move past what they have seen, so
    /// a number assigned before a slower commit (a PostgreSQL sequence shared by
    /// concurrent transactions) would be skipped — an event never delivered. SQLite's
    /// single writer gives this for free; another backend must serialize usage inserts
    /// or only hand out events below its oldest in-flight sequence number.
    async fn usage_events_after(
        &self,
        workspace_id: &str,
        after: i64,
        limit: u32,
    ) -> StoreResult<Vec<SequencedUsageEvent>>;
    /// Cuts a batch: inserts the delivery and moves the endpoint's cursor from
    /// `expected_cursor` to `delivery.last_event_seq`, in one transaction. Returns false
    /// (and writes nothing) when the cursor was no longer `expected_cursor` — another
    /// instance cut the batch first — or the endpoint is deleted.
    async fn cut_webhook_batch(
        &self,
        delivery: NewWebhookDelivery,
        expected_cursor: i64,
    ) -> StoreResult<bool>;
    /// Claims up to `limit` pending deliveries of live endpoints that are due at `now`
    /// and not leased by anyone (or whose lease ran out): each gets `lease_until` set, so
    /// another instance does not send it at the same time. Oldest first.
    async fn claim_due_webhook_deliveries(
        &self,
        now: Timestamp,
        lease_until: Timestamp,
        limit: u32,
    ) -> StoreResult<Vec<WebhookDelivery>>;
    /// Drops the lease without recording an attempt (an attempt abandoned on shutdown).
    async fn release_webhook_delivery(&self, id: &str) -> StoreResult<()>;
    /// Records one attempt: `attempts + 1`, the outcome, the new status and next time;
    /// `retry_step + 1` when it stays pending; clears the lease. `None` when absent.
    async fn record_webhook_attempt(
        &self,
        id: &str,
        attempt: WebhookAttempt,
    ) -> StoreResult<Option<WebhookDelivery>>;
    async fn webhook_delivery(&self, id: &str) -> StoreResult<Option<WebhookDelivery>>;
    /// The endpoint's deliveries in the order they were cut, keyset-paged.
    async fn list_webhook_deliveries(
        &self,
        webhook_id: &str,
        page: PageRequest,
    ) -> StoreResult<Page<WebhookDelivery>>;
    /// Manual retry: the delivery (any status) becomes pending, due at `now`, with its
    /// retry schedule started over; body and id are kept. `None` when absent.
    async fn retry_webhook_delivery(
        &self,
        id: &str,
        now: Timestamp,
    ) -> StoreResult<Option<WebhookDelivery>>;
}
