//! The wire shape of a usage event, defined once for the webhook body and the events
//! pull API (`GET /v1/gateway/events`).
//!
//! `requestMetadata` is embedded as the JSON object the client sent, byte for byte (a
//! raw value, never re-encoded, so an integer above 2^53 keeps every digit), or `null`.

use serde::ser::{Serialize, SerializeStruct, Serializer};
use serde_json::value::RawValue;
use tollgate_store::UsageEvent;

/// The `type` of every webhook body.
pub const BATCH_TYPE: &str = "API_BILLING_USAGE";

/// Serializes one event in its wire shape (camelCase, SPEC §3):
/// `{idempotencyKey, timestamp, requestId, requestMetadata, modelSlug, externalEntityId,
/// externalCustomerId, apiKeyPrefix, groupId, status, tokens: {inputTokens, outputTokens,
/// cachedInputTokens}}`. Use it inside a response type to keep metadata exact.
#[derive(Debug, Clone, Copy)]
pub struct EventJson<'a>(pub &'a UsageEvent);

struct Tokens<'a>(&'a UsageEvent);

impl Serialize for Tokens<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut tokens = serializer.serialize_struct("Tokens", 3)?;
        tokens.serialize_field("inputTokens", &self.0.input_tokens)?;
        tokens.serialize_field("outputTokens", &self.0.output_tokens)?;
        tokens.serialize_field("cachedInputTokens", &self.0.cached_input_tokens)?;
        tokens.end()
    }
}

/// Stored metadata is JSON text the data plane validated as an object. Should a row hold
/// something else, it travels as a JSON string rather than being dropped or breaking the
/// body.
enum Metadata<'a> {
    Raw(&'a RawValue),
    Text(&'a str),
}

impl<'a> Metadata<'a> {
    fn of(event: &'a UsageEvent) -> Option<Metadata<'a>> {
        let text = event.request_metadata.as_deref()?;
        Some(match serde_json::from_str::<&RawValue>(text) {
            Ok(raw) => Metadata::Raw(raw),
            Err(_) => Metadata::Text(text),
        })
    }
}

impl Serialize for Metadata<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Metadata::Raw(raw) => raw.serialize(serializer),
            Metadata::Text(text) => text.serialize(serializer),
        }
    }
}

impl Serialize for EventJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let e = self.0;
        let mut event = serializer.serialize_struct("UsageEvent", 11)?;
        event.serialize_field("idempotencyKey", &e.idempotency_key)?;
        event.serialize_field("timestamp", &e.timestamp.millis())?;
        event.serialize_field("requestId", &e.request_id)?;
        event.serialize_field("requestMetadata", &Metadata::of(e))?;
        event.serialize_field("modelSlug", &e.model_slug)?;
        event.serialize_field("externalEntityId", &e.external_entity_id)?;
        // The same value under the name older receivers read.
        event.serialize_field("externalCustomerId", &e.external_entity_id)?;
        event.serialize_field("apiKeyPrefix", &e.api_key_prefix)?;
        event.serialize_field("groupId", &e.group_id)?;
        event.serialize_field("status", e.status.as_str())?;
        event.serialize_field("tokens", &Tokens(e))?;
        event.end()
    }
}

/// The event as a JSON value (the pull API's items). Metadata integers beyond 64 bits
/// lose precision in a `Value`; serialize [`EventJson`] directly where that matters.
pub fn event_json(event: &UsageEvent) -> serde_json::Value {
    serde_json::to_value(EventJson(event)).unwrap_or_else(|e| {
        // Unreachable: every field is a string, a number or validated JSON.
        tracing::error!(error = %e, idempotency_key = %event.idempotency_key, "usage event did not serialize");
        serde_json::Value::Null
    })
}

/// The body of one delivery: `{"type":"API_BILLING_USAGE","data":{"events":[...]}}`,
/// compact, events in storage order.
pub fn batch_body<'a>(
    events: impl IntoIterator<Item = &'a UsageEvent>,
) -> Result<Vec<u8>, serde_json::Error> {
    struct Events<'a>(Vec<EventJson<'a>>);
    impl Serialize for Events<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let mut data = serializer.serialize_struct("Data", 1)?;
            data.serialize_field("events", &self.0)?;
            data.end()
        }
    }
    struct Body<'a>(Events<'a>);
    impl Serialize for Body<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let mut body = serializer.serialize_struct("Body", 2)?;
            body.serialize_field("type", BATCH_TYPE)?;
            body.serialize_field("data", &self.0)?;
            body.end()
        }
    }
    serde_json::to_vec(&Body(Events(events.into_iter().map(EventJson).collect())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::Timestamp;
    use tollgate_store::UsageStatus;

    pub(crate) fn sample(metadata: Option<&str>) -> UsageEvent {
        UsageEvent {
            idempotency_key: "evt_1".into(),
            timestamp: Timestamp(1_796_320_404_123),
            request_id: "req_1".into(),
            request_metadata: metadata.map(str::to_owned),
            model_slug: "acme/llama".into(),
            external_entity_id: "cust-7".into(),
            api_key_prefix: "tg_abc".into(),
            group_id: "grp_1".into(),
            workspace_id: "ws_1".into(),
            status: UsageStatus::ClientCancelled,
            input_tokens: 10,
            output_tokens: 50,
            cached_input_tokens: 4,
            is_estimated: false,
        }
    }

    #[test]
    fn event_has_every_field_of_the_spec_in_camel_case() {
        let value = event_json(&sample(Some(r#"{"run": "a-1", "n": 3}"#)));
        assert_eq!(
            value,
            serde_json::json!({
                "idempotencyKey": "evt_1",
                "timestamp": 1_796_320_404_123_i64,
                "requestId": "req_1",
                "requestMetadata": {"run": "a-1", "n": 3},
                "modelSlug": "acme/llama",
                "externalEntityId": "cust-7",
                "externalCustomerId": "cust-7",
                "apiKeyPrefix": "tg_abc",
                "groupId": "grp_1",
                "status": "client_cancelled",
                "tokens": {"inputTokens": 10, "outputTokens": 50, "cachedInputTokens": 4},
            })
        );
        assert_eq!(
            event_json(&sample(None))["requestMetadata"],
            serde_json::Value::Null
        );
    }

    #[test]
    fn body_is_the_exact_compact_envelope_with_metadata_bytes_as_sent() {
        let huge = r#"{"n": 123456789012345678901234567890, "name": "\u00c9quipe"}"#;
        let body = batch_body([&sample(Some(huge)), &sample(None)]).unwrap();
        let text = String::from_utf8(body).unwrap();
        let event = |metadata: &str| {
            format!(
                "{{\"idempotencyKey\":\"evt_1\",\"timestamp\":1796320404123,\"requestId\":\"req_1\",\
                 \"requestMetadata\":{metadata},\"modelSlug\":\"acme/llama\",\
                 \"externalEntityId\":\"cust-7\",\"externalCustomerId\":\"cust-7\",\
                 \"apiKeyPrefix\":\"tg_abc\",\"groupId\":\"grp_1\",\"status\":\"client_cancelled\",\
                 \"tokens\":{{\"inputTokens\":10,\"outputTokens\":50,\"cachedInputTokens\":4}}}}"
            )
        };
        assert_eq!(
            text,
            format!(
                "{{\"type\":\"API_BILLING_USAGE\",\"data\":{{\"events\":[{},{}]}}}}",
                event(huge),
                event("null")
            )
        );
    }

    #[test]
    fn metadata_that_is_not_json_travels_as_a_string() {
        let value = event_json(&sample(Some("{not json")));
        assert_eq!(value["requestMetadata"], serde_json::json!("{not json"));
    }

    #[test]
    fn an_empty_batch_has_an_empty_list() {
        assert_eq!(
            batch_body(std::iter::empty()).unwrap(),
            br#"{"type":"API_BILLING_USAGE","data":{"events":[]}}"#
        );
    }
}
