//! Thin handlers: each inference route runs the same path — auth → entitlement →
//! limits → upstream → metering — and only says which upstream path it maps to.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tollgate_core::endpoint::Target;
use tollgate_core::ids::{new_id, IdKind, RequestId};

use crate::auth::authenticate;
use crate::entitlement::entitlement;
use crate::error::{error_response, ProxyError};
use crate::limits::{admit, insert_rate_headers, Admission};
use crate::metering::{prompt_estimate, EventContext, Meter};
use crate::models::callable_models;
use crate::relay::{relay, Shape};
use crate::request::{read_body, request_metadata, InferenceRoute, ParsedRequest};
use crate::upstream::{send, TargetHealth, UpstreamCall};
use crate::ProxyState;

/// The router's state: the caller-provided [`ProxyState`] plus the data plane's own
/// memory of upstream health.
#[derive(Clone)]
struct DataPlane {
    state: ProxyState,
    health: Arc<TargetHealth>,
}

pub fn router(state: ProxyState) -> Router {
    let plane = DataPlane {
        state,
        health: Arc::new(TargetHealth::default()),
    };
    Router::new()
        .route(
            "/v1/chat/completions",
            post(chat_completions).fallback(method_not_allowed),
        )
        .route(
            "/v1/completions",
            post(completions).fallback(method_not_allowed),
        )
        .route(
            "/v1/embeddings",
            post(embeddings).fallback(method_not_allowed),
        )
        .route("/v1/models", get(list_models).fallback(method_not_allowed))
        .with_state(plane)
}

/// Another method on a data route: 405 in the OpenAI error shape (axum adds `Allow`).
async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let message = format!("Method {method} is not allowed on {}.", uri.path());
    error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        &message,
        "invalid_request_error",
        None,
        Some("method_not_allowed"),
    )
}

async fn chat_completions(State(plane): State<DataPlane>, request: Request) -> Response {
    let id = request_id(&request);
    answer(
        &id,
        proxy(&plane, InferenceRoute::ChatCompletions, &id, request),
    )
    .await
}

async fn completions(State(plane): State<DataPlane>, request: Request) -> Response {
    let id = request_id(&request);
    answer(
        &id,
        proxy(&plane, InferenceRoute::Completions, &id, request),
    )
    .await
}

async fn embeddings(State(plane): State<DataPlane>, request: Request) -> Response {
    let id = request_id(&request);
    answer(&id, proxy(&plane, InferenceRoute::Embeddings, &id, request)).await
}

async fn list_models(State(plane): State<DataPlane>, request: Request) -> Response {
    let id = request_id(&request);
    let (parts, _body) = request.into_parts();
    let listing = async {
        let caller = authenticate(plane.state.store.as_ref(), &parts.headers).await?;
        let models = callable_models(plane.state.store.as_ref(), &caller).await?;
        Ok(Json(models).into_response())
    };
    answer(&id, listing).await
}

/// The gateway's id of this request: set by the outer middleware, made here when absent.
fn request_id(request: &Request) -> RequestId {
    request
        .extensions()
        .get::<RequestId>()
        .cloned()
        .unwrap_or_else(|| RequestId(new_id(IdKind::Request)))
}

async fn answer(
    request_id: &RequestId,
    outcome: impl std::future::Future<Output = Result<Response, ProxyError>>,
) -> Response {
    let mut response = outcome
        .await
        .unwrap_or_else(|e| e.into_logged_response(&request_id.0));
    let name = HeaderName::from_static("x-request-id");
    if !response.headers().contains_key(&name) {
        if let Ok(value) = HeaderValue::from_str(&request_id.0) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

/// The whole inference path. `request_id` is the one `answer` puts on the response, so
/// the usage event and `x-request-id` always agree.
async fn proxy(
    plane: &DataPlane,
    route: InferenceRoute,
    request_id: &RequestId,
    request: Request,
) -> Result<Response, ProxyError> {
    let state = &plane.state;
    let (parts, body) = request.into_parts();

    let caller = authenticate(state.store.as_ref(), &parts.headers).await?;
    let metadata = request_metadata(&parts.headers)?;
    let body = read_body(body, &parts.headers, state.config.max_body_bytes).await?;
    let parsed = ParsedRequest::parse(&body, route)?;
    let allowed = entitlement(state.store.as_ref(), &caller, &parsed.model).await?;

    // Limits: after the body is read and parsed (a 413 or 400 is never counted), before
    // any upstream contact.
    let prompt_estimate = prompt_estimate(parsed.body_len);
    let admission = admit(
        &state.limiter,
        &caller,
        &allowed.limits,
        &parsed.model,
        prompt_estimate,
    )
    .await?;
    let (settlement, rate_headers) = match admission {
        Admission::Refused(response) => return Ok(response),
        Admission::Admitted {
            settlement,
            headers,
        } => (settlement, headers),
    };

    let meter = Meter {
        outbox: state.outbox.clone(),
        clock: Arc::clone(&state.clock),
        context: EventContext {
            request_id: request_id.0.clone(),
            request_metadata: metadata,
            model_slug: parsed.model.clone(),
            external_entity_id: caller.external_entity_id,
            api_key_prefix: caller.key_prefix,
            group_id: caller.group_id,
            workspace_id: caller.workspace_id,
            prompt_estimate,
        },
        settlement,
    };
    let call = UpstreamCall {
        route,
        request: &parsed,
        client_headers: &parts.headers,
        request_id: &request_id.0,
    };
    let mut response = serve(plane, &allowed.endpoint.targets, &call, meter, &parsed)
        .await
        .unwrap_or_else(|e| e.into_logged_response(&request_id.0));
    // Every answer to an admitted request says where its limits stand, errors included.
    insert_rate_headers(&rate_headers, response.headers_mut());
    Ok(response)
}

/// An admitted request: the upstream call and its answer. Every path ends the meter's
/// reservation (`relay` settles or refunds; here, a call that never got an answer
/// refunds).
async fn serve(
    plane: &DataPlane,
    targets: &[Target],
    call: &UpstreamCall<'_>,
    meter: Meter,
    parsed: &ParsedRequest,
) -> Result<Response, ProxyError> {
    let state = &plane.state;
    let upstream = match send(state, &plane.health, targets, call).await {
        Ok(upstream) => upstream,
        Err(e) => {
            meter.refund().await;
            return Err(e);
        }
    };
    let shape = Shape {
        strip_usage_chunk: parsed.is_stream && !parsed.client_wants_usage,
    };
    relay(upstream, shape, meter, state.config.first_byte_timeout).await
}
