//! The HTTP server: opens the store, bootstraps the default workspace, merges the
//! management and data-plane routers under one request-id layer, and serves until told
//! to stop. Shutdown is graceful: the listener closes, in-flight requests finish, the
//! usage outbox stores every event still queued and stops, then the store is closed
//! (`tests/it/durability.rs`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt as _;
use axum::{Json, Router};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tollgate_core::ids::{new_id, IdKind, RequestId};
use tollgate_core::secretbox::SecretBox;
use tollgate_core::{Clock, SystemClock};
use tollgate_proxy::outbox::{Outbox, OutboxWriter};
use tollgate_store::Store;

use crate::bootstrap;
use crate::config::Config;
use crate::database::Database;

/// A server that is accepting connections.
pub struct RunningServer {
    addr: SocketAddr,
    store: Arc<dyn Store>,
    /// Closed last, after the outbox and the webhook worker.
    database: Database,
    /// Keeps the in-memory configuration caught up; stopped before the database closes.
    refresher: tollgate_store::Refresher,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
    /// Stopped after the last request, before the store closes.
    outbox: OutboxWriter,
    /// Billing webhook batches and deliveries; stopped after the outbox's flush.
    webhooks: tollgate_billing::DeliveryWorker,
    /// Keeps the demo's mock model running as long as the server.
    _demo: Option<tollgate_testkit::MockUpstream>,
    /// What `GET /metrics` renders.
    metrics: tollgate_metrics::Metrics,
}

impl RunningServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// The server's metrics, as `GET /metrics` renders them.
    pub fn metrics(&self) -> &tollgate_metrics::Metrics {
        &self.metrics
    }

    /// Stops accepting, lets in-flight requests finish, flushes the usage outbox, closes
    /// the store.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.finish().await
    }

    /// Serves until `signal` completes, then shuts down gracefully.
    pub async fn run_until(
        mut self,
        signal: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        signal.await;
        tracing::info!("shutting down: finishing in-flight requests");
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.finish().await
    }

    async fn finish(self) -> anyhow::Result<()> {
        let served = self.task.await.context("server task");
        // Every request has ended: what its events still need is the outbox's flush.
        let usage = self.outbox.shutdown().await;
        tracing::info!(
            events = usage.events,
            transactions = usage.transactions,
            failed_transactions = usage.failed_transactions,
            largest_batch = usage.largest_batch,
            spooled_events = usage.spooled_events,
            commit_wait_p50_us = usage.wait_p50.as_micros(),
            commit_wait_p99_us = usage.wait_p99.as_micros(),
            commit_wait_max_us = usage.wait_max.as_micros(),
            "usage events flushed"
        );
        // Deliveries are durable: one abandoned now is sent, same id and bytes, on restart.
        self.webhooks.shutdown().await;
        self.refresher.stop().await;
        self.database.close().await;
        served?
    }
}

/// Opens the store, bootstraps, binds `config.listen` and starts serving.
pub async fn start(config: Config) -> anyhow::Result<RunningServer> {
    start_with_clock(config, Arc::new(SystemClock)).await
}

/// [`start`] with the clock every part of the server reads (tests pass a `ManualClock`).
pub async fn start_with_clock(
    config: Config,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<RunningServer> {
    crate::config::check_database_url(&config.database_url)?;
    let postgres = crate::config::is_postgres_url(&config.database_url);
    if postgres && config.master_key.is_none() {
        anyhow::bail!(
            "TOLLGATE_MASTER_KEY is required with PostgreSQL: set it (base64 of 32 bytes), \
             the same on every instance"
        );
    }
    let database = Database::open(&config.database_url).await?;
    // Every part of the server reads and writes through the mirror: the data plane's
    // configuration reads come from memory (docs/ARCHITECTURE.md, "Configuration mirror").
    let mirror = tollgate_store::MirroredStore::load(
        database.store(),
        tollgate_store::MirrorOptions::default(),
    )
    .await
    .context("loading the configuration into memory")?;
    let refresher = mirror.start_refresher(match &database {
        Database::Postgres(postgres) => Some(postgres.as_ref().clone()),
        Database::Sqlite(_) => None,
    });
    let store: Arc<dyn Store> = mirror.clone();
    let master_key = match config.master_key {
        Some(key) => key,
        None => load_or_create_master_key(&config.database_url).await?,
    };
    let sealer = Arc::new(SecretBox::new(&master_key));
    check_master_key(store.as_ref(), &sealer).await?;

    let allow_private_networks = config.allow_private_networks || config.demo;
    let admin = tollgate_admin::router(tollgate_admin::AdminState {
        store: store.clone(),
        clock: clock.clone(),
        sealer: sealer.clone(),
        allow_private_networks,
    });
    let http = tollgate_proxy::http_client().context("building the upstream HTTP client")?;
    // DAY counters start each day from the usage already stored, so a restart never
    // resets a customer's day; concurrent first requests share one read.
    let baseline = Arc::new(tollgate_limits::Coalesced::new(
        tollgate_limits::StoreBaseline::new(store.clone()),
    ));
    let metrics = tollgate_metrics::Metrics::new();
    let watched = mirror.clone();
    metrics
        .register_gauge_fn(
            "database_up",
            "1 while the database answers, 0 while the data plane serves from memory without it",
            move || i64::from(watched.is_database_up()),
        )
        .context("registering tollgate_database_up")?;
    // With Redis: shared counters, per-instance limits while Redis is unreachable (a start
    // with Redis down included; docs/limits.md, "Degraded mode").
    let limiter: Arc<dyn tollgate_limits::Limiter> = match &config.redis_url {
        Some(url) => {
            let mut settings = tollgate_limits::FallbackSettings::new(url);
            settings.key_prefix = config.redis_key_prefix.clone();
            settings.expected_instances = config.expected_instances;
            let limiter = tollgate_limits::FallbackLimiter::start(
                settings,
                clock.clone(),
                baseline,
                metrics.limiter().clone(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("redis: {e}"))?;
            Arc::new(limiter)
        }
        None => Arc::new(tollgate_limits::InProcessLimiter::new(
            clock.clone(),
            baseline,
        )),
    };
    let spool = spool_dir(&config);
    let spool_shown = spool
        .as_deref()
        .map_or_else(|| "none".to_owned(), |dir| dir.display().to_string());
    let (outbox, outbox_writer) = match spool {
        Some(dir) => {
            let spool = tollgate_proxy::spool::Spool::open(&dir)
                .await
                .with_context(|| format!("opening the usage spool {}", dir.display()))?;
            Outbox::start_spooled(store.clone(), Arc::new(spool))
        }
        None => Outbox::start(store.clone()),
    };
    let proxy = tollgate_proxy::router(tollgate_proxy::ProxyState {
        store: store.clone(),
        clock: clock.clone(),
        sealer: sealer.clone(),
        limiter,
        config: tollgate_proxy::ProxyConfig {
            max_body_bytes: config.max_body_bytes,
            first_byte_timeout: config.upstream_timeout,
        },
        http,
        outbox,
    });
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route(
            "/readyz",
            get(readyz).with_state(Readiness {
                mirror: mirror.clone(),
                limiter: config
                    .redis_url
                    .is_some()
                    .then(|| metrics.limiter().clone()),
            }),
        )
        .route("/metrics", get(render_metrics).with_state(metrics.clone()))
        .merge(admin)
        .merge(proxy)
        .fallback(not_found)
        .layer(middleware::from_fn(request_id));

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    // Last of what can fail: a first start prints its workspace's key (shown once) only
    // when it goes on to serve, so a start refused for a busy port, a bad Redis URL or
    // spool directory leaves the key to the start that works.
    bootstrap::default_workspace(store.as_ref(), clock.as_ref(), config.admin_key.as_deref())
        .await?;
    let engine = if postgres { "postgresql" } else { "sqlite" };
    if postgres {
        tracing::info!(%addr, database = %engine, spool = %spool_shown, "tollgate listening");
    } else {
        tracing::info!(
            %addr,
            database = %config.database_url,
            spool = %spool_shown,
            "tollgate listening"
        );
    }

    let demo = if config.demo {
        Some(crate::demo::setup(store.as_ref(), clock.as_ref(), addr).await?)
    } else {
        None
    };

    let (stop, stopped) = oneshot::channel::<()>();
    let webhooks = tollgate_billing::DeliveryWorker::start(
        store.clone(),
        sealer.clone(),
        clock.clone(),
        tollgate_billing::WorkerConfig {
            batch_interval: config.webhooks.batch_interval,
            retry_schedule: config.webhooks.retry_schedule.clone(),
            request_timeout: config.webhooks.timeout,
            allow_private_networks,
            ..tollgate_billing::WorkerConfig::default()
        },
    )
    .context("building the webhook HTTP client")?;
    let task = tokio::spawn(async move {
        // Nagle's algorithm plus delayed ACKs adds ~40 ms to small streamed writes.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, app.into_make_service())
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
            .context("serving")
    });
    Ok(RunningServer {
        addr,
        store,
        database,
        refresher,
        stop: Some(stop),
        task,
        outbox: outbox_writer,
        webhooks,
        _demo: demo,
        metrics,
    })
}

/// Refuses a master key that does not open the stored secrets. Every instance seals and
/// opens with one key; one started with another would answer every call to an endpoint
/// with a secret as if the model server could not be reached.
async fn check_master_key(store: &dyn Store, sealer: &SecretBox) -> anyhow::Result<()> {
    let first = tollgate_store::PageRequest {
        limit: 1,
        after: None,
    };
    let page = store
        .live_secrets_page(first)
        .await
        .context("reading a stored secret to check the master key")?;
    match page.items.first() {
        Some(secret) if sealer.open(&secret.ciphertext).is_err() => anyhow::bail!(
            "the master key (TOLLGATE_MASTER_KEY, or tollgate.master_key beside a SQLite \
             file) does not open the secrets stored in this database (secret {}): start with \
             the key they were sealed with, the same on every instance",
            secret.id
        ),
        _ => Ok(()),
    }
}

/// Puts the gateway's own request id into the request and `x-request-id` on the answer.
async fn request_id(mut request: Request, next: Next) -> Response {
    let id = new_id(IdKind::Request);
    request.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(request).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

/// What `/readyz` reports on: the database as the mirror last saw it and, with Redis, the
/// limiter's state.
#[derive(Clone)]
struct Readiness {
    mirror: Arc<tollgate_store::MirroredStore>,
    limiter: Option<tollgate_metrics::LimiterMetrics>,
}

async fn readyz(axum::extract::State(readiness): axum::extract::State<Readiness>) -> Response {
    // Ready while it can serve. Without the database the data plane still serves from
    // memory, and without Redis it counts per instance (docs/scale-out.md, "Faults"): a
    // load balancer that pulled every instance then would turn a back-end outage into a
    // full one, so this stays 200 and says "degraded"; alert on the body or on the
    // `tollgate_database_up` and `tollgate_limiter_shared` gauges.
    let database_up = readiness.mirror.is_database_up();
    let redis_up = readiness.limiter.as_ref().map(|l| l.shared() == 1);
    let up = |up: bool| if up { "up" } else { "unavailable" };
    let mut body = serde_json::json!({
        "status": if database_up && redis_up != Some(false) { "ready" } else { "degraded" },
        "database": up(database_up),
    });
    if let Some(redis_up) = redis_up {
        body["redis"] = serde_json::json!(up(redis_up));
    }
    Json(body).into_response()
}

/// Prometheus text; unauthenticated like `/healthz` (counts only, no keys, no secrets).
async fn render_metrics(
    axum::extract::State(metrics): axum::extract::State<tollgate_metrics::Metrics>,
) -> Response {
    (
        [(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static(tollgate_metrics::CONTENT_TYPE),
        )],
        metrics.render(),
    )
        .into_response()
}

/// Unknown routes: the management API's error shape under `/v1/gateway`, OpenAI's
/// elsewhere. Never a bare empty 404.
async fn not_found(uri: Uri) -> Response {
    let path = uri.path();
    let body = if path.starts_with("/v1/gateway") {
        serde_json::json!({"error": format!("No route {path}"), "code": "not_found"})
    } else {
        serde_json::json!({"error": {
            "message": format!("Unknown request URL: {path}"),
            "type": "invalid_request_error",
            "param": null,
            "code": "unknown_url",
        }})
    };
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}

/// Where usage events wait while the database is unreachable: `--spool-dir`, else
/// `tollgate-spool` beside the SQLite file, else `./tollgate-spool` with PostgreSQL. An
/// in-memory database has none unless one is given.
fn spool_dir(config: &Config) -> Option<PathBuf> {
    if let Some(dir) = &config.spool_dir {
        return Some(dir.clone());
    }
    if crate::config::is_postgres_url(&config.database_url) {
        return Some(PathBuf::from("tollgate-spool"));
    }
    let db = sqlite_path(&config.database_url)?;
    let dir = db.parent().filter(|p| !p.as_os_str().is_empty());
    Some(dir.unwrap_or(Path::new(".")).join("tollgate-spool"))
}

/// The SQLite file's path, or `None` for an in-memory database.
fn sqlite_path(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let rest = rest.split('?').next().unwrap_or(rest);
    (!rest.is_empty() && rest != ":memory:").then(|| PathBuf::from(rest))
}

/// Reads `tollgate.master_key` next to the SQLite file, creating it (mode 0600) on first
/// start. An in-memory database gets a key that lives as long as the process.
async fn load_or_create_master_key(database_url: &str) -> anyhow::Result<[u8; 32]> {
    let Some(db) = sqlite_path(database_url) else {
        return Ok(rand::random());
    };
    let dir = db
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let path = dir.join("tollgate.master_key");
    match tokio::fs::read_to_string(&path).await {
        Ok(text) => crate::config::parse_master_key(&text)
            .with_context(|| format!("reading {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use base64::Engine as _;
            let key: [u8; 32] = rand::random();
            let text = base64::engine::general_purpose::STANDARD.encode(key);
            write_private_file(&path, text.as_bytes()).await?;
            tracing::info!(path = %path.display(), "generated the master key that seals stored secrets");
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

async fn write_private_file(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt as _;
    let mut options = tokio::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options
        .open(path)
        .await
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents).await?;
    file.sync_all().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_master_key_that_does_not_open_the_stored_secrets_is_refused() {
        let store = tollgate_store::SqliteStore::open("sqlite::memory:")
            .await
            .unwrap();
        let sealer = SecretBox::new(&[7; 32]);
        assert!(check_master_key(&store, &sealer).await.is_ok());
        let workspace = store
            .create_workspace("w", tollgate_core::Timestamp(0))
            .await
            .unwrap();
        store
            .insert_secret(tollgate_store::NewSecret {
                id: "sec_1".to_owned(),
                workspace_id: workspace.id,
                name: "upstream".to_owned(),
                ciphertext: sealer.seal(b"sk-123").unwrap(),
                created_at: tollgate_core::Timestamp(0),
            })
            .await
            .unwrap();
        assert!(check_master_key(&store, &sealer).await.is_ok());
        let other = SecretBox::new(&[8; 32]);
        assert_eq!(
            check_master_key(&store, &other)
                .await
                .unwrap_err()
                .to_string(),
            "the master key (TOLLGATE_MASTER_KEY, or tollgate.master_key beside a SQLite \
             file) does not open the secrets stored in this database (secret sec_1): start \
             with the key they were sealed with, the same on every instance"
        );
    }

    #[test]
    fn sqlite_paths() {
        assert_eq!(
            sqlite_path("sqlite://tollgate.db"),
            Some(PathBuf::from("tollgate.db"))
        );
        assert_eq!(
            sqlite_path("sqlite:///var/lib/t.db"),
            Some(PathBuf::from("/var/lib/t.db"))
        );
        assert_eq!(
            sqlite_path("sqlite:x.db?mode=rwc"),
            Some(PathBuf::from("x.db"))
        );
        assert_eq!(sqlite_path("sqlite::memory:"), None);
    }

    #[test]
    fn spool_dirs() {
        let mut config = Config::defaults().unwrap();
        let cases = [
            ("sqlite://tollgate.db", Some("./tollgate-spool")),
            ("sqlite:///var/lib/t.db", Some("/var/lib/tollgate-spool")),
            ("postgres://db/x", Some("tollgate-spool")),
            ("sqlite::memory:", None),
        ];
        for (url, dir) in cases {
            config.database_url = url.into();
            assert_eq!(spool_dir(&config), dir.map(PathBuf::from), "{url}");
        }
        config.spool_dir = Some(PathBuf::from("/srv/spool"));
        assert_eq!(spool_dir(&config), Some(PathBuf::from("/srv/spool")));
    }
}
