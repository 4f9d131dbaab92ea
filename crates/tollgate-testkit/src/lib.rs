//! Test kit: a scriptable OpenAI-compatible mock upstream that speaks real HTTP and SSE
//! (also behind `tollgate serve --demo`), and a [`WebhookSink`] that records billing
//! webhooks byte for byte and answers them as scripted.
//!
//! The mock echoes the last user message. Tests script it through the `model` name they
//! give an endpoint's `target_model`: `echo?prompt_tokens=10&completion_tokens=50` — see
//! [`Script`] for every key. It records every request, and notices when the client (the
//! gateway) closes a connection before the answer is complete.

mod journal;
mod net;
mod reply;
mod routes;
mod script;
mod services;
mod sink;
mod stream;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use journal::RecordedRequest;
pub use script::{
    AfterError, Delivery, Ending, ErrorEventAt, ErrorShape, Framing, IdStyle, IncludeUsage, Script,
    ScriptError, UsageOn,
};

pub use services::{PostgresServer, RedisServer};
pub use sink::{dedupe_accepted, Deduplicated, ReceivedWebhook, SinkReply, WebhookSink};

use journal::Recorder;

/// A running mock upstream; stops (with all its connections) when dropped.
#[derive(Debug)]
pub struct MockUpstream {
    addr: SocketAddr,
    recorder: Recorder,
    server: JoinHandle<()>,
}

impl MockUpstream {
    /// Starts on `127.0.0.1:0`.
    pub async fn start() -> std::io::Result<Self> {
        Self::serve(TcpListener::bind(("127.0.0.1", 0)).await?)
    }

    /// Serves on a listener the caller bound (e.g. the demo's own port). Must be called
    /// within a Tokio runtime.
    pub fn serve(listener: TcpListener) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(std::io::Error::other)?;
        let recorder = Recorder::default();
        let app = routes::router(recorder.clone());
        let server = runtime.spawn(net::accept_loop(listener, app));
        Ok(Self {
            addr,
            recorder,
            server,
        })
    }

    /// `http://127.0.0.1:<port>/v1`
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests received so far, oldest first (the last 1024).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.recorder.requests()
    }

    /// Answers the client cut short by closing its connection (streams and waits alike).
    pub fn disconnects(&self) -> u64 {
        self.recorder.disconnects()
    }

    /// Waits until at least `count` disconnects were seen, at most `within`; returns
    /// whether they were.
    pub async fn wait_for_disconnects(&self, count: u64, within: Duration) -> bool {
        self.recorder
            .wait_until(within, |journal| journal.disconnects() >= count)
            .await
    }

    /// Waits until at least `count` requests arrived in total, at most `within`.
    pub async fn wait_for_requests(&self, count: u64, within: Duration) -> bool {
        self.recorder
            .wait_until(within, |journal| journal.request_count() >= count)
            .await
    }

    /// Forgets recorded requests and disconnects.
    pub fn clear(&self) {
        self.recorder.clear();
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}
