//! Rows as the rest of the system sees them.

use serde::{Deserialize, Serialize};
use tollgate_core::endpoint::{Region, Target};
use tollgate_core::{LimitMode, ModelAccess, Timestamp};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workspace {
    pub id: String,
    pub name: String,
    pub is_enabled: bool,
    /// Ed25519 public key (32 bytes) for key registration, when configured.
    pub signing_key: Option<Vec<u8>>,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Manage,
    View,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Manage => "manage",
            Scope::View => "view",
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewManagementKey {
    pub workspace_id: String,
    pub prefix: String,
    pub hash: Vec<u8>,
    pub name: Option<String>,
    pub scope: Scope,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagementKey {
    pub workspace_id: String,
    pub prefix: String,
    pub hash: Vec<u8>,
    pub name: Option<String>,
    pub scope: Scope,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone)]
pub struct NewSecret {
    pub id: String,
    pub workspace_id: String,
    pub name: String,
    /// Sealed with the installation's master key; the store never sees the plaintext.
    pub ciphertext: Vec<u8>,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secret {
    pub id: String,
    pub workspace_id: String,
    pub name: String,
    pub ciphertext: Vec<u8>,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone)]
pub struct NewEndpoint {
    pub id: String,
    pub workspace_id: String,
    pub slug: String,
    pub region: Region,
    pub targets: Vec<Target>,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub id: String,
    pub workspace_id: String,
    pub slug: String,
    pub region: Region,
    pub targets: Vec<Target>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

#[derive(Debug, Clone)]
pub struct NewGroup {
    pub id: String,
    pub workspace_id: String,
    pub name: Option<String>,
    pub external_entity_id: String,
    pub models: Vec<ModelAccess>,
    pub mode: LimitMode,
    pub parent_id: Option<String>,
    pub created_at: Timestamp,
}

/// A PATCH: `None` leaves a field as it is; `models` replaces the whole list.
#[derive(Debug, Clone, Default)]
pub struct GroupPatch {
    /// `Some(None)` clears the name.
    pub name: Option<Option<String>>,
    pub models: Option<Vec<ModelAccess>>,
}

#[derive(Debug, Clone, Default)]
pub struct GroupFilter {
    pub external_entity_id: Option<String>,
    pub parent_group_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct NewApiKey {
    pub group_id: String,
    pub prefix: String,
    pub hash: Vec<u8>,
    pub name: Option<String>,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub group_id: String,
    pub prefix: String,
    pub hash: Vec<u8>,
    pub name: Option<String>,
    pub created_at: Timestamp,
}

/// What the data plane learns from a key prefix.
#[derive(Debug, Clone)]
pub struct KeyGrant {
    pub key: ApiKey,
    /// `[group, parent, ..., root]`.
    pub chain: Vec<tollgate_core::Group>,
    pub workspace: Workspace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageStatus {
    Completed,
    ClientCancelled,
    UpstreamErrorMidStream,
}

impl UsageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageStatus::Completed => "completed",
            UsageStatus::ClientCancelled => "client_cancelled",
            UsageStatus::UpstreamErrorMidStream => "upstream_error_mid_stream",
        }
    }
}

/// One served request, as billed (SPEC §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageEvent {
    pub idempotency_key: String,
    pub timestamp: Timestamp,
    pub request_id: String,
    /// The `X-Request-Metadata` object as sent, JSON text.
    pub request_metadata: Option<String>,
    pub model_slug: String,
    pub external_entity_id: String,
    pub api_key_prefix: String,
    pub group_id: String,
    pub workspace_id: String,
    pub status: UsageStatus,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
    /// True when the upstream reported no usage and the counts are estimates.
    pub is_estimated: bool,
}

/// Every field that is set must match; events come in the order they were stored.
#[derive(Debug, Clone, Default)]
pub struct UsageFilter {
    pub workspace_id: Option<String>,
    pub group_id: Option<String>,
    pub request_id: Option<String>,
    pub external_entity_id: Option<String>,
    pub api_key_prefix: Option<String>,
    /// Events at or after this time.
    pub start_time: Option<Timestamp>,
    /// Events before this time.
    pub end_time: Option<Timestamp>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DayUsage {
    pub requests: u64,
    pub tokens: u64,
}

/// Keyset paging: rows strictly after `after` (an internal sequence number), at most
/// `limit` of them.
#[derive(Debug, Clone, Copy)]
pub struct PageRequest {
    pub limit: u32,
    pub after: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// The sequence number to continue after, when there are more rows.
    pub next_after: Option<i64>,
}

// --- billing webhooks -------------------------------------------------------------------

/// A webhook endpoint to create, with its first signing secret.
#[derive(Debug, Clone)]
pub struct NewWebhookEndpoint {
    /// `wh_...`
    pub id: String,
    pub workspace_id: String,
    pub url: String,
    pub description: Option<String>,
    /// The `whsec_...` text sealed with the master key.
    pub secret_ciphertext: Vec<u8>,
    pub created_at: Timestamp,
}

/// A live webhook endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookEndpoint {
    pub id: String,
    pub workspace_id: String,
    pub url: String,
    pub description: Option<String>,
    /// The usage-event sequence number up to which batches were cut for this endpoint.
    /// Starts at the newest event's number when the endpoint is created, so earlier
    /// events are never sent to it.
    pub cursor: i64,
    pub created_at: Timestamp,
}

/// One signing secret of an endpoint, sealed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookSecret {
    pub webhook_id: String,
    /// The `whsec_...` text sealed with the master key.
    pub ciphertext: Vec<u8>,
    pub created_at: Timestamp,
    /// `None` for the current secret; a rotation sets it on the ones it replaces.
    pub expires_at: Option<Timestamp>,
}

/// A usage event with its sequence number (the order events were stored in).
pub type SequencedUsageEvent = (i64, UsageEvent);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// Not yet accepted by the receiver; sent when `next_attempt_at` comes.
    Pending,
    /// The receiver answered 2xx.
    Delivered,
    /// Dead letter: a terminal 4xx, or every step of the retry schedule failed.
    Failed,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<DeliveryStatus> {
        match text {
            "pending" => Some(DeliveryStatus::Pending),
            "delivered" => Some(DeliveryStatus::Delivered),
            "failed" => Some(DeliveryStatus::Failed),
            _ => None,
        }
    }
}

/// A batch cut for an endpoint: the events `first_event_seq..=last_event_seq` of its
/// workspace, serialized once into `body`.
#[derive(Debug, Clone)]
pub struct NewWebhookDelivery {
    /// `dlv_...`; also the `webhook-id` and `X-Baseten-Request-ID` of every attempt.
    pub id: String,
    pub webhook_id: String,
    /// The exact bytes every attempt sends.
    pub body: Vec<u8>,
    pub event_count: u32,
    pub first_event_seq: i64,
    pub last_event_seq: i64,
    pub created_at: Timestamp,
    /// When the first attempt is due (normally `created_at`).
    pub next_attempt_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookDelivery {
    /// `dlv_...`; also the `webhook-id` and `X-Baseten-Request-ID` of every attempt.
    pub id: String,
    pub webhook_id: String,
    /// The exact bytes every attempt sends.
    pub body: Vec<u8>,
    pub event_count: u32,
    pub first_event_seq: i64,
    pub last_event_seq: i64,
    pub status: DeliveryStatus,
    /// Attempts made so far, manual retries included.
    pub attempts: u32,
    /// Failed attempts since the delivery was cut or last reset by a manual retry: the
    /// next failure waits for step `retry_step` of the schedule.
    pub retry_step: u32,
    /// When the next attempt is due; `None` once delivered or failed.
    pub next_attempt_at: Option<Timestamp>,
    pub last_attempt_at: Option<Timestamp>,
    /// The HTTP status of the last attempt, when the receiver answered.
    pub last_http_status: Option<u16>,
    /// Why the last attempt failed (network error, timeout, status), when it did.
    pub last_error: Option<String>,
    /// Held by an instance sending it until this time.
    pub lease_until: Option<Timestamp>,
    pub created_at: Timestamp,
}

/// What one attempt to send a delivery came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookAttempt {
    pub at: Timestamp,
    pub http_status: Option<u16>,
    pub error: Option<String>,
    /// The delivery's status after this attempt.
    pub status: DeliveryStatus,
    /// When a `Pending` delivery is tried again; ignored otherwise.
    pub next_attempt_at: Option<Timestamp>,
}

// --- configuration change log -----------------------------------------------------------

/// What kind of object a configuration change touched: the configuration the data plane
/// serves from memory (`MirroredStore`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConfigKind {
    /// `object_id` is the workspace id (created, enabled, disabled, signing key set).
    Workspace,
    /// `object_id` is the secret id (inserted, deleted).
    Secret,
    /// `object_id` is the endpoint id (inserted, targets updated, deleted).
    Endpoint,
    /// `object_id` is the group id (created, patched); for a delete, the id of the deleted
    /// subtree's root.
    Group,
    /// `object_id` is the key prefix (inserted, revoked).
    ApiKey,
}

impl ConfigKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ConfigKind::Workspace => "workspace",
            ConfigKind::Secret => "secret",
            ConfigKind::Endpoint => "endpoint",
            ConfigKind::Group => "group",
            ConfigKind::ApiKey => "api_key",
        }
    }

    pub fn parse(text: &str) -> Option<ConfigKind> {
        match text {
            "workspace" => Some(ConfigKind::Workspace),
            "secret" => Some(ConfigKind::Secret),
            "endpoint" => Some(ConfigKind::Endpoint),
            "group" => Some(ConfigKind::Group),
            "api_key" => Some(ConfigKind::ApiKey),
            _ => None,
        }
    }
}

/// One row of the change log: "this object changed; read it again".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigChange {
    /// Increasing, and visible in increasing order (see `Store::config_changes_after`).
    pub seq: i64,
    pub kind: ConfigKind,
    pub object_id: String,
    /// The database's clock when the change was written (pruning reads it).
    pub changed_at: Timestamp,
}

/// A page of the change log after a cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigChanges {
    /// Changes after the cursor, oldest first.
    pub changes: Vec<ConfigChange>,
    /// The largest sequence number pruned so far (0 when nothing was). A reader whose
    /// cursor is below it has missed changes and must load everything again.
    pub pruned_through: i64,
}
