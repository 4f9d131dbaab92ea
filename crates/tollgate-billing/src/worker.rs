//! The delivery worker: one background task that cuts batches and sends them.
//!
//! Every round it (1) cuts, for each live endpoint, the events after its cursor into
//! deliveries — a full batch of [`MAX_BATCH_EVENTS`] at once, a partial one when its
//! oldest event has waited the batch interval — and (2) claims due deliveries under a
//! lease and sends each one: the stored body, signed at the attempt's time with every
//! live secret. 2xx → delivered; network error, timeout, 5xx, 429, 3xx → retried after the
//! next step of the schedule (+0..10 % jitter), dead-lettered after the last; other 4xx →
//! failed at once. The delivery id and body bytes never change (C17,
//! `tests/it/webhooks_delivery.rs`).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rand::Rng as _;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tollgate_core::endpoint::is_private_address;
use tollgate_core::ids::{new_id, IdKind};
use tollgate_core::secretbox::SecretBox;
use tollgate_core::{Clock, Timestamp};
use tollgate_store::{
    DeliveryStatus, NewWebhookDelivery, Store, WebhookAttempt, WebhookDelivery, WebhookEndpoint,
};

use crate::schedule::RetrySchedule;
use crate::{batch_body, signer, signing_keys, BillingError, MAX_BATCH_EVENTS};

/// How the worker batches and retries.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// `TOLLGATE_WEBHOOK_BATCH_INTERVAL`: a partial batch is cut once its oldest event is
    /// this old (default 1 s).
    pub batch_interval: Duration,
    /// `TOLLGATE_WEBHOOK_RETRY_SCHEDULE`.
    pub retry_schedule: RetrySchedule,
    /// Per attempt, connection to last byte of the answer (SPEC: 10 s).
    pub request_timeout: Duration,
    /// `TOLLGATE_ALLOW_PRIVATE_NETWORKS`: lets webhook URLs resolve to private addresses.
    pub allow_private_networks: bool,
    /// Attempts in flight at once, across endpoints.
    pub max_in_flight: usize,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            batch_interval: Duration::from_secs(1),
            retry_schedule: RetrySchedule::default(),
            request_timeout: Duration::from_secs(10),
            allow_private_networks: false,
            max_in_flight: 32,
        }
    }
}

impl WorkerConfig {
    /// How often the worker looks for work: a quarter of the shortest wait it must honour,
    /// between 10 ms and 250 ms, so a batch is cut and a retry sent within a quarter of
    /// their interval of being due.
    pub fn poll_interval(&self) -> Duration {
        let shortest = self
            .retry_schedule
            .steps()
            .iter()
            .copied()
            .chain([self.batch_interval])
            .min()
            .unwrap_or(self.batch_interval);
        (shortest / 4).clamp(Duration::from_millis(10), Duration::from_millis(250))
    }

    /// An attempt holds its delivery this long: past the request timeout, so a live
    /// attempt is never sent twice, yet short, so an instance that died mid-attempt
    /// delays that delivery by seconds only.
    fn lease(&self) -> Duration {
        self.request_timeout + Duration::from_secs(5)
    }
}

/// A running worker; stop it with [`DeliveryWorker::shutdown`].
#[derive(Debug)]
pub struct DeliveryWorker {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

struct Context {
    store: Arc<dyn Store>,
    sealer: Arc<SecretBox>,
    clock: Arc<dyn Clock>,
    config: WorkerConfig,
    http: reqwest::Client,
    /// Deliveries this worker is sending now (their leases are released on shutdown).
    in_flight: Mutex<HashSet<String>>,
}

impl DeliveryWorker {
    /// Starts the worker on the current Tokio runtime.
    pub fn start(
        store: Arc<dyn Store>,
        sealer: Arc<SecretBox>,
        clock: Arc<dyn Clock>,
        config: WorkerConfig,
    ) -> Result<DeliveryWorker, reqwest::Error> {
        let http = http_client(&config)?;
        let context = Arc::new(Context {
            store,
            sealer,
            clock,
            config,
            http,
            in_flight: Mutex::new(HashSet::new()),
        });
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(context, stop.clone()));
        Ok(DeliveryWorker { stop, task })
    }

    /// Stops cutting and claiming, abandons attempts in flight (their deliveries stay
    /// pending, with the same id and bytes, and are sent after the next start) and
    /// returns once the worker's task has ended.
    pub async fn shutdown(self) {
        self.stop.cancel();
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "webhook delivery worker ended abnormally");
        }
    }
}

fn http_client(config: &WorkerConfig) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(config.request_timeout)
        .tcp_nodelay(true)
        .redirect(reqwest::redirect::Policy::none())
        // A proxy from the environment would resolve the name itself, past the guard.
        .no_proxy()
        .user_agent(concat!("Tollgate-Webhooks/", env!("CARGO_PKG_VERSION")))
        .dns_resolver(Arc::new(GuardedResolver {
            allow_private_networks: config.allow_private_networks,
        }))
        .build()
}

async fn run(context: Arc<Context>, stop: CancellationToken) {
    let mut sends = JoinSet::new();
    let mut failed_rounds = FailureStreak::default();
    let poll = context.config.poll_interval();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(poll) => {}
        }
        while sends.try_join_next().is_some() {}
        let round = async {
            let cut = cut_batches(&context).await;
            let free = context.config.max_in_flight.saturating_sub(sends.len());
            let claimed = claim(&context, free).await;
            let failure = match (&cut, &claimed) {
                (Err(e), _) => Some(format!("cutting webhook batches failed: {e}")),
                (_, Err(e)) => Some(format!("claiming due webhook deliveries failed: {e}")),
                _ => None,
            };
            match failure {
                // A database outage fails every round: one line when it starts, a reminder
                // now and then, one when rounds succeed again.
                Some(error) => {
                    if failed_rounds.fail() {
                        tracing::warn!(
                            %error,
                            failed_rounds = failed_rounds.count(),
                            "webhook rounds failing; retrying every round"
                        );
                    } else {
                        tracing::debug!(%error, "webhook round failed");
                    }
                }
                None => {
                    if let Some(failed) = failed_rounds.succeed() {
                        tracing::info!(failed_rounds = failed, "webhook rounds succeed again");
                    }
                }
            }
            for delivery in claimed.unwrap_or_default() {
                let context = context.clone();
                sends.spawn(async move { attempt(&context, delivery).await });
            }
        };
        tokio::select! {
            () = stop.cancelled() => break,
            () = round => {}
        }
    }
    sends.abort_all();
    while sends.join_next().await.is_some() {}
    let abandoned: Vec<String> = context.in_flight.lock().drain().collect();
    for id in abandoned {
        if let Err(e) = context.store.release_webhook_delivery(&id).await {
            tracing::warn!(error = %e, delivery = %id, "could not release a webhook delivery's lease");
        }
    }
}

/// Consecutive failed rounds, so that an outage is logged when it starts and every
/// [`FailureStreak::REMIND_EVERY`] rounds after, not once per round.
#[derive(Debug, Default)]
struct FailureStreak {
    failed: u64,
}

impl FailureStreak {
    const REMIND_EVERY: u64 = 100;

    /// Counts a failed round; `true` when this one should be logged.
    fn fail(&mut self) -> bool {
        self.failed += 1;
        self.failed % Self::REMIND_EVERY == 1
    }

    fn count(&self) -> u64 {
        self.failed
    }

    /// Ends the streak; how many rounds had failed in a row, if any.
    fn succeed(&mut self) -> Option<u64> {
        let failed = std::mem::take(&mut self.failed);
        (failed > 0).then_some(failed)
    }
}

/// Cuts every batch that is due now, for every live endpoint. One endpoint's failure
/// does not hold back the others.
async fn cut_batches(context: &Context) -> Result<(), BillingError> {
    for endpoint in context.store.all_webhook_endpoints().await? {
        if let Err(e) = cut_endpoint_batches(context, &endpoint).await {
            tracing::warn!(error = %e, webhook = %endpoint.id, "cutting a webhook batch failed; retrying next round");
        }
    }
    Ok(())
}

/// Cuts the endpoint's due batches, oldest events first, until what is left is a partial
/// batch younger than the interval. Returns how many were cut.
async fn cut_endpoint_batches(
    context: &Context,
    endpoint: &WebhookEndpoint,
) -> Result<u32, BillingError> {
    let interval_ms = i64::try_from(context.config.batch_interval.as_millis()).unwrap_or(i64::MAX);
    let mut cursor = endpoint.cursor;
    let mut cut = 0;
    loop {
        let events = context
            .store
            .usage_events_after(&endpoint.workspace_id, cursor, MAX_BATCH_EVENTS)
            .await?;
        let (Some((first_seq, oldest)), Some((last_seq, _))) = (events.first(), events.last())
        else {
            return Ok(cut);
        };
        let now = context.clock.now();
        let is_full = events.len() >= MAX_BATCH_EVENTS as usize;
        let has_waited = now.0.saturating_sub(oldest.timestamp.0) >= interval_ms;
        if !is_full && !has_waited {
            return Ok(cut);
        }
        let body = batch_body(events.iter().map(|(_, event)| event))?;
        let delivery = NewWebhookDelivery {
            id: new_id(IdKind::Delivery),
            webhook_id: endpoint.id.clone(),
            body,
            event_count: u32::try_from(events.len()).unwrap_or(MAX_BATCH_EVENTS),
            first_event_seq: *first_seq,
            last_event_seq: *last_seq,
            created_at: now,
            next_attempt_at: now,
        };
        let last_seq = *last_seq;
        if !context.store.cut_webhook_batch(delivery, cursor).await? {
            // Another instance cut from this cursor first; its batch stands.
            return Ok(cut);
        }
        cursor = last_seq;
        cut += 1;
    }
}

async fn claim(context: &Context, free: usize) -> Result<Vec<WebhookDelivery>, BillingError> {
    if free == 0 {
        return Ok(Vec::new());
    }
    let now = context.clock.now();
    let lease_until = later(now, context.config.lease());
    let claimed = context
        .store
        .claim_due_webhook_deliveries(now, lease_until, u32::try_from(free).unwrap_or(u32::MAX))
        .await?;
    context
        .in_flight
        .lock()
        .extend(claimed.iter().map(|d| d.id.clone()));
    Ok(claimed)
}

fn later(at: Timestamp, by: Duration) -> Timestamp {
    Timestamp(at.0.saturating_add(i64::try_from(by.as_millis()).unwrap_or(i64::MAX)))
}

/// What the receiver's answer (or its absence) means for the delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Delivered(u16),
    Retry { status: Option<u16>, error: String },
    Terminal(u16),
}

/// 2xx delivered; 429, 5xx and (unfollowed) 3xx retried; every other status terminal.
pub(crate) fn classify(status: u16) -> Outcome {
    match status {
        200..=299 => Outcome::Delivered(status),
        429 | 300..=399 | 500..=599 => Outcome::Retry {
            status: Some(status),
            error: format!("HTTP {status}"),
        },
        _ => Outcome::Terminal(status),
    }
}

/// The stored state after an attempt with `outcome`.
pub(crate) fn next_state(
    outcome: Outcome,
    delivery: &WebhookDelivery,
    schedule: &RetrySchedule,
    now: Timestamp,
    jitter: f64,
) -> WebhookAttempt {
    match outcome {
        Outcome::Delivered(status) => WebhookAttempt {
            at: now,
            http_status: Some(status),
            error: None,
            status: DeliveryStatus::Delivered,
            next_attempt_at: None,
        },
        Outcome::Terminal(status) => WebhookAttempt {
            at: now,
            http_status: Some(status),
            error: Some(format!("HTTP {status} (not retried)")),
            status: DeliveryStatus::Failed,
            next_attempt_at: None,
        },
        Outcome::Retry { status, error } => match schedule.step(delivery.retry_step) {
            Some(step) => WebhookAttempt {
                at: now,
                http_status: status,
                error: Some(error),
                status: DeliveryStatus::Pending,
                next_attempt_at: Some(later(now, RetrySchedule::jittered(step, jitter))),
            },
            None => WebhookAttempt {
                at: now,
                http_status: status,
                error: Some(format!("{error} (retry schedule exhausted)")),
                status: DeliveryStatus::Failed,
                next_attempt_at: None,
            },
        },
    }
}

async fn attempt(context: &Context, delivery: WebhookDelivery) {
    let outcome = send(context, &delivery).await;
    let now = context.clock.now();
    let jitter = rand::thread_rng().gen::<f64>();
    let state = match outcome {
        Ok(outcome) => next_state(
            outcome,
            &delivery,
            &context.config.retry_schedule,
            now,
            jitter,
        ),
        Err(SendError::EndpointGone) => {
            forget(context, &delivery.id);
            if let Err(e) = context.store.release_webhook_delivery(&delivery.id).await {
                tracing::warn!(error = %e, delivery = %delivery.id, "could not release a webhook delivery's lease");
            }
            return;
        }
        Err(SendError::Setup(error)) => next_state(
            Outcome::Retry {
                status: None,
                error,
            },
            &delivery,
            &context.config.retry_schedule,
            now,
            jitter,
        ),
    };
    match state.status {
        DeliveryStatus::Delivered => {
            tracing::debug!(delivery = %delivery.id, events = delivery.event_count, "webhook delivered");
        }
        DeliveryStatus::Pending => tracing::info!(
            delivery = %delivery.id,
            error = state.error.as_deref().unwrap_or(""),
            "webhook attempt failed; will retry"
        ),
        DeliveryStatus::Failed => tracing::warn!(
            delivery = %delivery.id,
            error = state.error.as_deref().unwrap_or(""),
            "webhook delivery failed for good (dead letter)"
        ),
    }
    if let Err(e) = context
        .store
        .record_webhook_attempt(&delivery.id, state)
        .await
    {
        // The lease runs out and the delivery is tried again, same id and bytes.
        tracing::error!(error = %e, delivery = %delivery.id, "could not record a webhook attempt");
    }
    forget(context, &delivery.id);
}

fn forget(context: &Context, id: &str) {
    context.in_flight.lock().remove(id);
}

enum SendError {
    /// The endpoint was deleted since the delivery was claimed.
    EndpointGone,
    /// Something on our side (secret, URL) kept the request from being made.
    Setup(String),
}

async fn send(context: &Context, delivery: &WebhookDelivery) -> Result<Outcome, SendError> {
    let endpoint = match context.store.webhook_endpoint(&delivery.webhook_id).await {
        Ok(Some(endpoint)) => endpoint,
        Ok(None) => return Err(SendError::EndpointGone),
        Err(e) => return Err(SendError::Setup(format!("store: {e}"))),
    };
    let url = reqwest::Url::parse(&endpoint.url)
        .map_err(|e| SendError::Setup(format!("invalid URL: {e}")))?;
    if !context.config.allow_private_networks {
        if let Some(ip) = literal_ip(&url) {
            if is_private_address(ip) {
                return Err(SendError::Setup(format!("address {ip} is private")));
            }
        }
    }
    let now = context.clock.now();
    let keys = signing_keys(
        context.store.as_ref(),
        &context.sealer,
        &delivery.webhook_id,
        now,
    )
    .await
    .map_err(|e| SendError::Setup(format!("signing secret: {e}")))?;
    if keys.is_empty() {
        return Err(SendError::Setup("no live signing secret".into()));
    }
    let headers = signer::sign(&delivery.id, now.0.div_euclid(1000), &delivery.body, &keys);
    let mut request = context
        .http
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(delivery.body.clone());
    for (name, value) in headers.pairs() {
        request = request.header(name, value);
    }
    Ok(match request.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            drain_answer(response).await;
            classify(status)
        }
        Err(e) => Outcome::Retry {
            status: None,
            error: describe(&e, context.config.request_timeout),
        },
    })
}

/// Most bytes of a receiver's answer read (and dropped).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Reads a short answer to its end (for at most a second) so the connection can be
/// reused; stops after [`MAX_ANSWER_BYTES`] and drops the response, closing the
/// connection, so a receiver that answers with an endless or huge body costs neither
/// memory nor more than that second.
async fn drain_answer(mut response: reqwest::Response) {
    let drain = async {
        let mut read = 0;
        while read <= MAX_ANSWER_BYTES {
            match response.chunk().await {
                Ok(Some(chunk)) => read += chunk.len(),
                Ok(None) | Err(_) => break,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

fn literal_ip(url: &reqwest::Url) -> Option<IpAddr> {
    match url.host()? {
        url::Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
        url::Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
        url::Host::Domain(_) => None,
    }
}

/// A short, secret-free reason for `last_error`.
fn describe(error: &reqwest::Error, timeout: Duration) -> String {
    if error.is_timeout() {
        return format!("timed out after {}", humantime::format_duration(timeout));
    }
    let mut text = if error.is_connect() {
        "connection failed".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Resolves webhook hosts and refuses, at connection time, names that resolve to private
/// addresses unless the operator allows them — so a name validated at creation cannot be
/// re-pointed at the internal network later (DNS rebinding).
struct GuardedResolver {
    allow_private_networks: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("{host} resolves to private address {ip}")]
struct PrivateAddress {
    host: String,
    ip: IpAddr,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private_networks;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if !allow_private {
                if let Some(private) = addrs.iter().find(|a| is_private_address(a.ip())) {
                    return Err(Box::new(PrivateAddress {
                        host,
                        ip: private.ip(),
                    })
                        as Box<dyn std::error::Error + Send + Sync>);
                }
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_streak_is_logged_at_its_start_every_hundred_rounds_and_at_its_end() {
        let mut streak = FailureStreak::default();
        assert_eq!(streak.succeed(), None);
        let logged: Vec<u64> = (1..=250).filter(|_| streak.fail()).collect();
        assert_eq!(logged, [1, 101, 201]);
        assert_eq!(streak.count(), 250);
        assert_eq!(streak.succeed(), Some(250));
        assert_eq!(streak.succeed(), None);
        assert!(streak.fail());
    }

    fn pending(retry_step: u32) -> WebhookDelivery {
        WebhookDelivery {
            id: "dlv_1".into(),
            webhook_id: "wh_1".into(),
            body: b"{}".to_vec(),
            event_count: 1,
            first_event_seq: 1,
            last_event_seq: 1,
            status: DeliveryStatus::Pending,
            attempts: retry_step,
            retry_step,
            next_attempt_at: Some(Timestamp(0)),
            last_attempt_at: None,
            last_http_status: None,
            last_error: None,
            lease_until: None,
            created_at: Timestamp(0),
        }
    }

    #[test]
    fn statuses_are_delivered_retried_or_terminal() {
        assert_eq!(classify(200), Outcome::Delivered(200));
        assert_eq!(classify(204), Outcome::Delivered(204));
        for retried in [429, 500, 502, 503, 504, 301, 307] {
            assert_eq!(
                classify(retried),
                Outcome::Retry {
                    status: Some(retried),
                    error: format!("HTTP {retried}")
                }
            );
        }
        for terminal in [400, 401, 403, 404, 408, 410, 413, 422] {
            assert_eq!(classify(terminal), Outcome::Terminal(terminal));
        }
    }

    #[test]
    fn failures_walk_the_schedule_then_dead_letter() {
        let schedule = RetrySchedule::parse("5s,30s").unwrap();
        let now = Timestamp(1_000_000);
        let retry = || Outcome::Retry {
            status: Some(503),
            error: "HTTP 503".into(),
        };
        let first = next_state(retry(), &pending(0), &schedule, now, 0.0);
        assert_eq!(first.status, DeliveryStatus::Pending);
        assert_eq!(first.next_attempt_at, Some(Timestamp(1_005_000)));
        assert_eq!(first.http_status, Some(503));
        let second = next_state(retry(), &pending(1), &schedule, now, 1.0);
        assert_eq!(second.next_attempt_at, Some(Timestamp(1_033_000)));
        let last = next_state(retry(), &pending(2), &schedule, now, 0.5);
        assert_eq!(last.status, DeliveryStatus::Failed);
        assert_eq!(last.next_attempt_at, None);
        assert_eq!(
            last.error.as_deref(),
            Some("HTTP 503 (retry schedule exhausted)")
        );
    }

    #[test]
    fn success_and_terminal_statuses_end_the_delivery() {
        let schedule = RetrySchedule::default();
        let now = Timestamp(7);
        let done = next_state(Outcome::Delivered(200), &pending(3), &schedule, now, 0.3);
        assert_eq!(
            done,
            WebhookAttempt {
                at: now,
                http_status: Some(200),
                error: None,
                status: DeliveryStatus::Delivered,
                next_attempt_at: None,
            }
        );
        let refused = next_state(Outcome::Terminal(400), &pending(0), &schedule, now, 0.3);
        assert_eq!(refused.status, DeliveryStatus::Failed);
        assert_eq!(refused.error.as_deref(), Some("HTTP 400 (not retried)"));
    }

    #[test]
    fn polls_at_a_quarter_of_the_shortest_wait_within_bounds() {
        let mut config = WorkerConfig::default();
        assert_eq!(config.poll_interval(), Duration::from_millis(250));
        config.retry_schedule = RetrySchedule::parse("100ms,200ms").unwrap();
        assert_eq!(config.poll_interval(), Duration::from_millis(25));
        config.batch_interval = Duration::from_millis(1);
        assert_eq!(config.poll_interval(), Duration::from_millis(10));
        assert_eq!(config.lease(), Duration::from_secs(15));
    }

    #[test]
    fn literal_addresses_are_found() {
        let url = |text: &str| reqwest::Url::parse(text).unwrap();
        assert_eq!(
            literal_ip(&url("http://127.0.0.1:9/hook")),
            Some("127.0.0.1".parse().unwrap())
        );
        assert_eq!(
            literal_ip(&url("http://[::1]:9/hook")),
            Some("::1".parse().unwrap())
        );
        assert_eq!(literal_ip(&url("https://billing.example.com/hook")), None);
    }
}
