//! Test support: a real Tollgate server on `127.0.0.1:0` over a fresh SQLite file, with
//! a mock upstream, and admin-authenticated request builders.

use std::sync::Arc;
use std::time::Duration;

use reqwest::RequestBuilder;
use serde_json::{json, Value};
use tempfile::TempDir;
use tollgate::config::{Config, LogFormat};
use tollgate::RunningServer;
use tollgate_core::{Clock, SystemClock};
use tollgate_store::Store;
use tollgate_testkit::MockUpstream;

pub struct TestServer {
    /// `http://127.0.0.1:<port>`
    pub base_url: String,
    /// A `manage` key of workspace `default`.
    pub admin_key: String,
    pub http: reqwest::Client,
    pub store: Arc<dyn Store>,
    pub mock: MockUpstream,
    pub dir: TempDir,
    server: Option<RunningServer>,
    /// The server's clock, kept across [`TestServer::restart`].
    clock: Arc<dyn Clock>,
}

/// The configuration tests start from: private networks allowed (the mock is on
/// loopback), a fresh database file in `dir`.
pub fn test_config(dir: &TempDir) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        database_url: format!("sqlite://{}", dir.path().join("tollgate.db").display()),
        spool_dir: None,
        redis_url: None,
        redis_key_prefix: None,
        expected_instances: std::num::NonZeroU64::MIN,
        admin_key: Some(format!("tgm_testadmin{}", "k".repeat(40))),
        master_key: Some([42; 32]),
        allow_private_networks: true,
        max_body_bytes: 10 * 1024 * 1024,
        upstream_timeout: Duration::from_secs(60),
        log_format: LogFormat::Text,
        demo: false,
        webhooks: Default::default(),
    }
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts with the test configuration adjusted by `adjust`.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(&dir);
        adjust(&mut config);
        let mock = MockUpstream::start().await.unwrap();
        Self::launch(config, Arc::new(SystemClock), dir, mock).await
    }

    /// Starts with `clock` as the server's clock (limits, events, timestamps), so window
    /// tests move time instead of sleeping.
    pub async fn start_with_clock(clock: Arc<dyn Clock>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = test_config(&dir);
        let mock = MockUpstream::start().await.unwrap();
        Self::launch(config, clock, dir, mock).await
    }

    /// Graceful shutdown, then a new server over the same data directory (the same
    /// SQLite file), with the same clock and mock, as an operator's restart.
    pub async fn restart(mut self) -> Self {
        if let Some(server) = self.server.take() {
            server.shutdown().await.unwrap();
        }
        let config = test_config(&self.dir);
        Self::launch(config, self.clock, self.dir, self.mock).await
    }

    async fn launch(
        config: Config,
        clock: Arc<dyn Clock>,
        dir: TempDir,
        mock: MockUpstream,
    ) -> Self {
        let admin_key = config.admin_key.clone().unwrap();
        let server = tollgate::start_with_clock(config, Arc::clone(&clock))
            .await
            .unwrap();
        Self {
            base_url: format!("http://{}", server.local_addr()),
            admin_key,
            http: reqwest::Client::new(),
            store: server.store(),
            mock,
            dir,
            server: Some(server),
            clock,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    fn authed(&self, builder: RequestBuilder) -> RequestBuilder {
        builder.header("Authorization", format!("Api-Key {}", self.admin_key))
    }

    pub fn get(&self, path: &str) -> RequestBuilder {
        self.authed(self.http.get(self.url(path)))
    }

    pub fn post(&self, path: &str, body: &Value) -> RequestBuilder {
        self.authed(self.http.post(self.url(path)).json(body))
    }

    pub fn patch(&self, path: &str, body: &Value) -> RequestBuilder {
        self.authed(self.http.patch(self.url(path)).json(body))
    }

    pub fn delete(&self, path: &str) -> RequestBuilder {
        self.authed(self.http.delete(self.url(path)))
    }

    /// Creates endpoint `slug` with one target on the mock, called as `target_model`.
    pub async fn create_endpoint(&self, slug: &str, target_model: &str) -> Value {
        let body = json!({
            "slug": slug,
            "targets": [{
                "provider": "OPENAI_COMPATIBLE",
                "base_url": self.mock.base_url(),
                "target_model": target_model,
                "secret_id": null,
            }],
        });
        ok_json(
            self.post("/v1/gateway/endpoints", &body)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    /// Creates a group from a full create body; panics unless the answer is 200.
    pub async fn create_group(&self, body: Value) -> Value {
        ok_json(self.post("/v1/gateway/groups", &body).send().await.unwrap()).await
    }

    /// A root or child group with `models`, in `mode`; returns its id.
    pub async fn group(
        &self,
        ext: &str,
        mode: &str,
        parent: Option<&str>,
        models: Value,
    ) -> String {
        let group = self
            .create_group(json!({
                "metadata": {"external_entity_id": ext, "name": ext},
                "models": models,
                "hierarchy": {"limit_enforcement": mode, "parent_group_id": parent},
            }))
            .await;
        group["id"].as_str().unwrap().to_owned()
    }

    /// Mints an API key under `group_id`; returns the full key.
    pub async fn create_key(&self, group_id: &str) -> String {
        let path = format!("/v1/gateway/groups/{group_id}/api_keys");
        let answer = ok_json(
            self.post(&path, &json!({"name": "test"}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        answer["api_key"].as_str().unwrap().to_owned()
    }

    /// `POST /v1/chat/completions` with `key` as a Bearer token.
    pub fn chat(&self, key: &str, body: &Value) -> RequestBuilder {
        self.http
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(body)
    }

    /// Graceful shutdown, as on SIGTERM; hands back the data directory for inspection.
    pub async fn shutdown(mut self) -> TempDir {
        if let Some(server) = self.server.take() {
            server.shutdown().await.unwrap();
        }
        self.dir
    }
}

/// Asserts a 200 and returns the JSON body (the body is printed on failure).
pub async fn ok_json(response: reqwest::Response) -> Value {
    let status = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(status, 200, "unexpected status; body: {text}");
    serde_json::from_str(&text).unwrap()
}

/// Status and JSON body (Value::Null when the body is not JSON).
pub async fn status_json(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}
