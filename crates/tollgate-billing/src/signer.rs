//! Webhook signatures over the exact bytes sent (SPEC §3, CASES C18).
//!
//! Two schemes, one HMAC-SHA256 key per secret — the bytes the base64 after `whsec_`
//! decodes to:
//! - Standard Webhooks: `webhook-signature: v1,<base64 HMAC(key, "{id}.{timestamp}.{body}")>`,
//!   one space-separated entry per live secret during a rotation.
//! - The reference API's `X-Baseten-Signature: v1=<hex HMAC(key, body)>`; during a
//!   rotation, comma-separated `v1=<hex>` entries, newest secret first.
//!
//! Pinned by the Standard Webhooks specification's published test vector below.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Every signing secret starts with this.
pub const SECRET_PREFIX: &str = "whsec_";

/// An HMAC key taken from a `whsec_` secret. Debug output never shows it.
#[derive(Clone)]
pub struct SigningKey {
    key: Vec<u8>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(..)")
    }
}

impl SigningKey {
    /// The key of a `whsec_<base64>` secret; `None` when it is not one.
    pub fn from_secret(secret: &str) -> Option<SigningKey> {
        let encoded = secret.strip_prefix(SECRET_PREFIX)?;
        let key = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .ok()?;
        (!key.is_empty()).then_some(SigningKey { key })
    }

    fn mac(&self, parts: &[&[u8]]) -> Vec<u8> {
        // HMAC accepts keys of any length, so `new_from_slice` cannot fail here.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.key) else {
            return Vec::new();
        };
        for part in parts {
            mac.update(part);
        }
        mac.finalize().into_bytes().to_vec()
    }

    /// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
    pub fn standard_signature(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let timestamp = timestamp.to_string();
        let mac = self.mac(&[id.as_bytes(), b".", timestamp.as_bytes(), b".", body]);
        format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac)
        )
    }

    /// `v1=<hex HMAC-SHA256 of the body>`.
    pub fn baseten_signature(&self, body: &[u8]) -> String {
        format!("v1={}", hex::encode(self.mac(&[body])))
    }
}

/// The headers of one attempt that identify and sign it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHeaders {
    /// The delivery id: the same on every attempt.
    pub webhook_id: String,
    /// Seconds since the epoch at the attempt.
    pub webhook_timestamp: String,
    pub webhook_signature: String,
    pub baseten_signature: String,
    /// The delivery id again, for receivers written for the reference API.
    pub baseten_request_id: String,
}

impl SignedHeaders {
    /// `(name, value)` pairs, ready to put on a request.
    pub fn pairs(&self) -> [(&'static str, &str); 5] {
        [
            ("webhook-id", &self.webhook_id),
            ("webhook-timestamp", &self.webhook_timestamp),
            ("webhook-signature", &self.webhook_signature),
            ("x-baseten-signature", &self.baseten_signature),
            ("x-baseten-request-id", &self.baseten_request_id),
        ]
    }
}

/// Signs one attempt with every key given, newest first.
pub fn sign(id: &str, timestamp: i64, body: &[u8], keys: &[SigningKey]) -> SignedHeaders {
    let standard: Vec<String> = keys
        .iter()
        .map(|key| key.standard_signature(id, timestamp, body))
        .collect();
    let baseten: Vec<String> = keys.iter().map(|key| key.baseten_signature(body)).collect();
    SignedHeaders {
        webhook_id: id.to_owned(),
        webhook_timestamp: timestamp.to_string(),
        webhook_signature: standard.join(" "),
        baseten_signature: baseten.join(","),
        baseten_request_id: id.to_owned(),
    }
}

/// True when one entry of a `webhook-signature` header is `secret`'s signature.
pub fn verify_standard(secret: &str, id: &str, timestamp: &str, body: &[u8], header: &str) -> bool {
    let (Some(key), Ok(timestamp)) = (SigningKey::from_secret(secret), timestamp.parse::<i64>())
    else {
        return false;
    };
    let expected = key.standard_signature(id, timestamp, body);
    header
        .split(' ')
        .any(|entry| constant_time_eq(entry.as_bytes(), expected.as_bytes()))
}

/// True when one entry of an `X-Baseten-Signature` header is `secret`'s signature.
pub fn verify_baseten(secret: &str, body: &[u8], header: &str) -> bool {
    let Some(key) = SigningKey::from_secret(secret) else {
        return false;
    };
    let expected = key.baseten_signature(body);
    header
        .split(',')
        .any(|entry| constant_time_eq(entry.trim().as_bytes(), expected.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(secret: &str) -> SigningKey {
        SigningKey::from_secret(secret).unwrap()
    }

    /// The Standard Webhooks specification's published vector (its libraries' sign
    /// tests, e.g. `libraries/php/tests/WebhookTest.php`, `testSignFunctionWorks`).
    #[test]
    fn the_published_standard_webhooks_vector_reproduces_exactly() {
        let signature = key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").standard_signature(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    /// The second vector of the specification's libraries (`libraries/rust`, `test_sign`).
    #[test]
    fn the_rust_library_vector_reproduces_exactly() {
        let signature = key("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").standard_signature(
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1_649_367_553,
            br#"{"email":"test@example.com","username":"test_user"}"#,
        );
        assert_eq!(signature, "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=");
    }

    #[test]
    fn baseten_signature_is_hex_hmac_of_the_body_alone() {
        // HMAC-SHA256(key = base64-decoded "MfKQ...", body), computed independently with
        // `openssl dgst -sha256 -mac HMAC -macopt hexkey:<key>`.
        let signature = key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .baseten_signature(br#"{"test": 2432232314}"#);
        assert_eq!(signature, BASETEN_VECTOR);
        assert!(signature.starts_with("v1="));
        assert_eq!(signature.len(), 3 + 64);
    }

    const BASETEN_VECTOR: &str =
        "v1=e2cb4f5251572539d458bfb8a7adb533b08801e6a794467e06f771debbb0818b";

    #[test]
    fn rotation_signs_with_every_key_newest_first() {
        let new = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let old = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
        let body = br#"{"type":"API_BILLING_USAGE"}"#;
        let headers = sign("dlv_1", 1_700_000_000, body, &[key(new), key(old)]);
        assert_eq!(headers.webhook_id, "dlv_1");
        assert_eq!(headers.baseten_request_id, "dlv_1");
        assert_eq!(headers.webhook_timestamp, "1700000000");
        let standard: Vec<&str> = headers.webhook_signature.split(' ').collect();
        assert_eq!(
            standard,
            [
                key(new).standard_signature("dlv_1", 1_700_000_000, body),
                key(old).standard_signature("dlv_1", 1_700_000_000, body)
            ]
        );
        let baseten: Vec<&str> = headers.baseten_signature.split(',').collect();
        assert_eq!(
            baseten,
            [
                key(new).baseten_signature(body),
                key(old).baseten_signature(body)
            ]
        );
        for secret in [new, old] {
            assert!(verify_standard(
                secret,
                "dlv_1",
                "1700000000",
                body,
                &headers.webhook_signature
            ));
            assert!(verify_baseten(secret, body, &headers.baseten_signature));
        }
        let other = "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        assert!(!verify_standard(
            other,
            "dlv_1",
            "1700000000",
            body,
            &headers.webhook_signature
        ));
        assert!(!verify_baseten(other, body, &headers.baseten_signature));
        // One changed byte, id or timestamp fails.
        assert!(!verify_standard(
            new,
            "dlv_1",
            "1700000000",
            b"{}",
            &headers.webhook_signature
        ));
        assert!(!verify_standard(
            new,
            "dlv_2",
            "1700000000",
            body,
            &headers.webhook_signature
        ));
        assert!(!verify_standard(
            new,
            "dlv_1",
            "1700000001",
            body,
            &headers.webhook_signature
        ));
        assert!(!verify_baseten(new, b"{}", &headers.baseten_signature));
    }

    #[test]
    fn secrets_must_be_whsec_base64() {
        assert!(SigningKey::from_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_none());
        assert!(SigningKey::from_secret("whsec_not base64!").is_none());
        assert!(SigningKey::from_secret("whsec_").is_none());
        assert_eq!(
            format!("{:?}", key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")),
            "SigningKey(..)"
        );
    }
}
