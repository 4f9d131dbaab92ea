//! Billing: usage events leave Tollgate as signed webhook batches (SPEC §3).
//!
//! The flow is an outbox. Usage events are already durable in the store; for each
//! webhook endpoint the [`worker`] cuts the events after the endpoint's cursor into a
//! delivery (at most [`MAX_BATCH_EVENTS`] events, or whatever waited one batch interval),
//! storing the exact body bytes and advancing the cursor in one transaction. Deliveries
//! are then sent, signed by [`signer`], and retried on the schedule until the receiver
//! answers 2xx, a terminal 4xx, or the schedule runs out (dead letter). A delivery's id,
//! headers' identity and body bytes never change, across retries and restarts alike.

mod endpoints;
mod event;
pub mod schedule;
pub mod signer;
pub mod worker;

pub use endpoints::{
    create_webhook_endpoint, new_signing_secret, open_secret, rotate_webhook_secret, signing_keys,
    CreatedWebhookEndpoint, SECRET_ROTATION_GRACE_MS,
};
pub use event::{batch_body, event_json, EventJson, BATCH_TYPE};
pub use schedule::RetrySchedule;
pub use worker::{DeliveryWorker, WorkerConfig};

/// At most this many events travel in one delivery.
pub const MAX_BATCH_EVENTS: u32 = 100;

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error(transparent)]
    Store(#[from] tollgate_store::StoreError),
    #[error("sealing a webhook secret: {0}")]
    Seal(#[from] tollgate_core::secretbox::SecretBoxError),
    #[error("stored webhook secret is not a whsec_ secret")]
    SecretFormat,
    #[error("serializing a batch: {0}")]
    Serialize(#[from] serde_json::Error),
}
