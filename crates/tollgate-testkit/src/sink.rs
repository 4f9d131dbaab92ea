//! A webhook receiver over real HTTP: records every request's raw body bytes and headers,
//! answers as scripted (a status, a sleep, a dropped connection), and checks signatures
//! with its own HMAC code, independent of the gateway's signer.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use sha2::Sha256;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};

/// How the sink answers one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkReply {
    /// Answer this status with an empty body.
    Status(u16),
    /// Wait this long, then answer 200 (a sender with a shorter timeout gave up first).
    Sleep(Duration),
    /// Close the connection without answering.
    Drop,
}

/// One request as the sink received it.
#[derive(Debug, Clone)]
pub struct ReceivedWebhook {
    pub method: String,
    pub path: String,
    /// Header names in lower case, in arrival order.
    pub headers: Vec<(String, String)>,
    /// The body exactly as it arrived.
    pub body: Bytes,
    pub received_at: Instant,
    /// What the sink answered.
    pub reply: SinkReply,
}

impl ReceivedWebhook {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// True when this request was answered 2xx.
    pub fn is_accepted(&self) -> bool {
        matches!(self.reply, SinkReply::Status(200..=299))
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The `data.events` of the body (empty when the body is not a batch).
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.json()
            .and_then(|body| body.get("data")?.get("events")?.as_array().cloned())
            .unwrap_or_default()
    }

    /// True when one entry of `webhook-signature` is `secret`'s Standard Webhooks
    /// signature of `"{webhook-id}.{webhook-timestamp}.{raw body}"`.
    pub fn verifies_standard(&self, secret: &str) -> bool {
        let (Some(id), Some(timestamp), Some(header)) = (
            self.header("webhook-id"),
            self.header("webhook-timestamp"),
            self.header("webhook-signature"),
        ) else {
            return false;
        };
        let Some(mac) = hmac_sha256(
            secret,
            &[id.as_bytes(), b".", timestamp.as_bytes(), b".", &self.body],
        ) else {
            return false;
        };
        let expected = format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac)
        );
        header.split(' ').any(|entry| entry == expected)
    }

    /// True when one entry of `X-Baseten-Signature` is `v1=<hex HMAC(key, raw body)>`.
    pub fn verifies_baseten(&self, secret: &str) -> bool {
        let Some(header) = self.header("x-baseten-signature") else {
            return false;
        };
        let Some(mac) = hmac_sha256(secret, &[&self.body]) else {
            return false;
        };
        let expected = format!("v1={}", hex::encode(mac));
        header.split(',').any(|entry| entry.trim() == expected)
    }

    /// Both signature schemes verify with `secret`.
    pub fn verifies(&self, secret: &str) -> bool {
        self.verifies_standard(secret) && self.verifies_baseten(secret)
    }
}

/// HMAC-SHA256 keyed with the bytes the base64 after `whsec_` decodes to.
fn hmac_sha256(secret: &str, parts: &[&[u8]]) -> Option<Vec<u8>> {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_")?)
        .ok()?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).ok()?;
    for part in parts {
        mac.update(part);
    }
    Some(mac.finalize().into_bytes().to_vec())
}

/// What a deduplicating receiver keeps: the events of accepted requests, one per
/// idempotency key. `duplicates` counts repeats; `conflicts` lists keys whose repeats
/// differed in any field (which a correct sender never produces).
#[derive(Debug, Clone, Default)]
pub struct Deduplicated {
    pub events: BTreeMap<String, serde_json::Value>,
    pub duplicates: usize,
    pub conflicts: Vec<String>,
}

/// Deduplicates the events of the accepted requests among `requests` by `idempotencyKey`.
pub fn dedupe_accepted(requests: &[ReceivedWebhook]) -> Deduplicated {
    let mut kept = Deduplicated::default();
    for event in requests
        .iter()
        .filter(|r| r.is_accepted())
        .flat_map(ReceivedWebhook::events)
    {
        let key = event
            .get("idempotencyKey")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned();
        match kept.events.get(&key) {
            Some(first) => {
                kept.duplicates += 1;
                if *first != event {
                    kept.conflicts.push(key);
                }
            }
            None => {
                kept.events.insert(key, event);
            }
        }
    }
    kept
}

#[derive(Debug, Default)]
struct Script {
    next: VecDeque<SinkReply>,
    /// Used once `next` is empty; `None` = 200.
    default: Option<SinkReply>,
}

#[derive(Debug, Default)]
struct Shared {
    script: Mutex<Script>,
    received: Mutex<Vec<ReceivedWebhook>>,
    arrived: Notify,
}

/// A running webhook sink on `127.0.0.1:0`; stops (with its connections) when dropped.
#[derive(Debug)]
pub struct WebhookSink {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl WebhookSink {
    /// Starts on `127.0.0.1:0`, answering 200 until scripted otherwise.
    pub async fn start() -> std::io::Result<Self> {
        Self::serve(TcpListener::bind(("127.0.0.1", 0)).await?)
    }

    /// Serves on a listener the caller bound (to keep a port across a restart).
    pub fn serve(listener: TcpListener) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let server = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Self {
            addr,
            shared,
            server,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>/webhook`
    pub fn url(&self) -> String {
        format!("http://{}/webhook", self.addr)
    }

    /// The next requests get these answers, in order (after any already queued).
    pub fn script(&self, replies: impl IntoIterator<Item = SinkReply>) {
        self.shared.script.lock().next.extend(replies);
    }

    /// The next `n` requests are answered `500`.
    pub fn fail_next(&self, n: usize) {
        self.script(std::iter::repeat_n(SinkReply::Status(500), n));
    }

    /// How requests are answered once the script is used up.
    pub fn set_default(&self, reply: SinkReply) {
        self.shared.script.lock().default = Some(reply);
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<ReceivedWebhook> {
        self.shared.received.lock().clone()
    }

    /// Waits until `done` holds for the requests received, at most `within`.
    pub async fn wait_until(
        &self,
        within: Duration,
        done: impl Fn(&[ReceivedWebhook]) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let arrived = self.shared.arrived.notified();
            if done(&self.shared.received.lock()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return done(&self.shared.received.lock());
            }
        }
    }

    /// Waits until at least `count` requests arrived, at most `within`.
    pub async fn wait_for_requests(&self, count: usize, within: Duration) -> bool {
        self.wait_until(within, |requests| requests.len() >= count)
            .await
    }

    /// Waits until the accepted requests hold at least `count` distinct events.
    pub async fn wait_for_events(&self, count: usize, within: Duration) -> bool {
        self.wait_until(within, |requests| {
            dedupe_accepted(requests).events.len() >= count
        })
        .await
    }

    /// The deduplicated events of every accepted request so far.
    pub fn accepted_events(&self) -> Deduplicated {
        dedupe_accepted(&self.requests())
    }
}

impl Drop for WebhookSink {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, shared.clone()));
                }
                Err(error) => {
                    tracing::warn!(%error, "webhook sink: accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next() => {}
        }
    }
}

/// Returned by the service to make hyper close the connection without an answer.
#[derive(Debug, thiserror::Error)]
#[error("connection dropped as scripted")]
struct Dropped;

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
        let shared = shared.clone();
        async move { answer(request, &shared).await }
    });
    if let Err(error) = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(%error, "webhook sink: connection ended");
    }
}

async fn answer(
    request: http::Request<Incoming>,
    shared: &Shared,
) -> Result<http::Response<Full<Bytes>>, Dropped> {
    let (parts, body) = request.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return Err(Dropped),
    };
    let reply = {
        let mut script = shared.script.lock();
        script
            .next
            .pop_front()
            .or(script.default)
            .unwrap_or(SinkReply::Status(200))
    };
    let headers = parts
        .headers
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    shared.received.lock().push(ReceivedWebhook {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        headers,
        body,
        received_at: Instant::now(),
        reply,
    });
    shared.arrived.notify_waiters();
    let status = match reply {
        SinkReply::Status(status) => status,
        SinkReply::Sleep(duration) => {
            tokio::time::sleep(duration).await;
            200
        }
        SinkReply::Drop => return Err(Dropped),
    };
    let mut response = http::Response::new(Full::new(Bytes::new()));
    *response.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    Ok(response)
}
