//! `/v1/gateway/signing_key`: the workspace's Ed25519 public key, which signs the bodies
//! of `api_keys/register` calls. An addition of Tollgate's (the reference API sets it out
//! of band).

use axum::extract::State;
use axum::routing::put;
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ed25519_dalek::VerifyingKey;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::json::StrictJson;
use crate::pagination::NoQuery;
use crate::AdminState;

pub fn router() -> Router<AdminState> {
    Router::new().route("/v1/gateway/signing_key", put(set).get(read))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetSigningKey {
    public_key: String,
}

/// Decodes a base64 raw 32-byte Ed25519 public key, refusing bytes that are not a point
/// on the curve and small-order points, under which `verify_strict` (what registration
/// uses) accepts no signature at all.
fn decode_public_key(text: &str) -> Result<[u8; 32], ApiError> {
    let invalid = |why: &str| ApiError::invalid_field("public_key", why);
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|_| invalid("must be standard base64"))?;
    let raw: [u8; 32] = bytes
        .try_into()
        .map_err(|_| invalid("must be a raw 32-byte Ed25519 public key"))?;
    let key =
        VerifyingKey::from_bytes(&raw).map_err(|_| invalid("is not a valid Ed25519 public key"))?;
    if key.is_weak() {
        return Err(invalid(
            "is a weak (small-order) Ed25519 key under which no signature verifies",
        ));
    }
    Ok(raw)
}

async fn set(
    State(state): State<AdminState>,
    caller: Caller,
    _: NoQuery,
    StrictJson(body): StrictJson<SetSigningKey>,
) -> ApiResult<Json<Value>> {
    let raw = decode_public_key(&body.public_key)?;
    state
        .store
        .set_signing_key(&caller.workspace_id, &raw)
        .await?;
    Ok(Json(json!({ "ok": true })))
}

async fn read(
    State(state): State<AdminState>,
    caller: Caller,
    _: NoQuery,
) -> ApiResult<Json<Value>> {
    let workspace = state
        .store
        .workspace(&caller.workspace_id)
        .await?
        .ok_or_else(|| ApiError::internal("caller's workspace vanished"))?;
    Ok(Json(json!({
        "public_key": workspace.signing_key.map(|k| STANDARD.encode(k)),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_keys_must_be_32_raw_bytes_in_base64() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]).verifying_key();
        let encoded = STANDARD.encode(key.as_bytes());
        assert_eq!(decode_public_key(&encoded).unwrap(), *key.as_bytes());
        let e = decode_public_key(&STANDARD.encode([1_u8; 31])).unwrap_err();
        assert_eq!(
            e.message(),
            "public_key: must be a raw 32-byte Ed25519 public key"
        );
        let e = decode_public_key(&STANDARD.encode([0_u8; 32])).unwrap_err();
        assert_eq!(
            e.message(),
            "public_key: is a weak (small-order) Ed25519 key under which no signature verifies"
        );
        let e = decode_public_key("not base64!").unwrap_err();
        assert_eq!(e.message(), "public_key: must be standard base64");
        assert_eq!(e.code(), "invalid_payload");
    }
}
