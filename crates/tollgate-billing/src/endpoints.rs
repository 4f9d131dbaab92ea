//! Creating webhook endpoints and rotating their secrets: the secret is generated here,
//! shown to the caller once, and stored only sealed with the master key.

use base64::Engine as _;
use tollgate_core::ids::{new_id, IdKind};
use tollgate_core::secretbox::SecretBox;
use tollgate_core::Timestamp;
use tollgate_store::{NewWebhookEndpoint, Store, WebhookEndpoint, WebhookSecret};

use crate::signer::{SigningKey, SECRET_PREFIX};
use crate::BillingError;

/// After a rotation the replaced secret keeps signing for 24 hours.
pub const SECRET_ROTATION_GRACE_MS: i64 = 24 * 60 * 60 * 1000;

/// `whsec_<base64 of 32 random bytes>` from the OS CSPRNG.
pub fn new_signing_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    format!(
        "{SECRET_PREFIX}{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// A new endpoint and its secret, which is shown only in the create answer.
#[derive(Debug, Clone)]
pub struct CreatedWebhookEndpoint {
    pub endpoint: WebhookEndpoint,
    pub secret: String,
}

/// Creates an endpoint with a fresh secret. The URL must already be validated (shape and
/// address) by the caller.
pub async fn create_webhook_endpoint(
    store: &dyn Store,
    sealer: &SecretBox,
    workspace_id: &str,
    url: &str,
    description: Option<String>,
    now: Timestamp,
) -> Result<CreatedWebhookEndpoint, BillingError> {
    let secret = new_signing_secret();
    let endpoint = store
        .insert_webhook_endpoint(NewWebhookEndpoint {
            id: new_id(IdKind::Webhook),
            workspace_id: workspace_id.to_owned(),
            url: url.to_owned(),
            description,
            secret_ciphertext: sealer.seal(secret.as_bytes())?,
            created_at: now,
        })
        .await?;
    Ok(CreatedWebhookEndpoint { endpoint, secret })
}

/// Gives the endpoint a new secret and returns it; the secrets it replaces keep signing
/// until `now + 24 h`. `None` when the endpoint is absent or deleted.
pub async fn rotate_webhook_secret(
    store: &dyn Store,
    sealer: &SecretBox,
    webhook_id: &str,
    now: Timestamp,
) -> Result<Option<String>, BillingError> {
    let secret = new_signing_secret();
    let rotated = store
        .rotate_webhook_secret(
            webhook_id,
            sealer.seal(secret.as_bytes())?,
            now,
            Timestamp(now.0.saturating_add(SECRET_ROTATION_GRACE_MS)),
        )
        .await?;
    Ok(rotated.map(|_| secret))
}

/// The `whsec_` text of a stored secret.
pub fn open_secret(sealer: &SecretBox, secret: &WebhookSecret) -> Result<String, BillingError> {
    let plain = sealer.open(&secret.ciphertext)?;
    String::from_utf8(plain).map_err(|_| BillingError::SecretFormat)
}

/// The signing keys of the endpoint's live secrets at `now`, newest first.
pub async fn signing_keys(
    store: &dyn Store,
    sealer: &SecretBox,
    webhook_id: &str,
    now: Timestamp,
) -> Result<Vec<SigningKey>, BillingError> {
    let secrets = store.webhook_secrets(webhook_id, now).await?;
    secrets
        .iter()
        .map(|secret| {
            SigningKey::from_secret(&open_secret(sealer, secret)?).ok_or(BillingError::SecretFormat)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_whsec_and_32_random_bytes() {
        let a = new_signing_secret();
        let b = new_signing_secret();
        assert_ne!(a, b);
        assert!(a.starts_with("whsec_"));
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(&a["whsec_".len()..])
            .unwrap();
        assert_eq!(decoded.len(), 32);
        assert!(SigningKey::from_secret(&a).is_some());
    }
}
