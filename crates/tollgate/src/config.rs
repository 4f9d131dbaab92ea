//! Resolved configuration: defaults < TOML file (`--config`) < `TOLLGATE_*` environment <
//! command-line flags. clap already merges the last two (a flag beats its variable), so
//! this module only lays the file and the defaults underneath. Unknown file keys are an
//! error, never silently ignored.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::cli::ServeArgs;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_DATABASE: &str = "sqlite://tollgate.db";
pub const DEFAULT_MAX_BODY_BYTES: usize = 10 * 1024 * 1024;
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);
/// More instances than any deployment runs: a larger figure is a typo that would make
/// every limit 1 while Redis is unreachable.
const MAX_EXPECTED_INSTANCES: u64 = 10_000;
pub const MIN_ADMIN_KEY_LEN: usize = 32;
pub const DEFAULT_WEBHOOK_BATCH_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Everything `serve` needs, fully resolved.
#[derive(Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub database_url: String,
    /// The usage spool's directory; `None` = `tollgate-spool` beside the SQLite file, or
    /// `./tollgate-spool` with PostgreSQL (none for an in-memory database).
    pub spool_dir: Option<PathBuf>,
    /// Shared rate counters (`redis://...`); `None` = the in-process limiter.
    pub redis_url: Option<String>,
    /// Redis keys start with this instead of `tg` (several deployments on one Redis).
    pub redis_key_prefix: Option<String>,
    /// Instances sharing the Redis; while it is unreachable each enforces every limit
    /// divided by this (`docs/limits.md`, "Degraded mode").
    pub expected_instances: std::num::NonZeroU64,
    pub admin_key: Option<String>,
    /// 32 bytes; `None` = read or generate the key file next to the SQLite database
    /// (required with PostgreSQL).
    pub master_key: Option<[u8; 32]>,
    pub allow_private_networks: bool,
    pub max_body_bytes: usize,
    pub upstream_timeout: Duration,
    pub log_format: LogFormat,
    pub demo: bool,
    /// Billing webhook batching and retries.
    pub webhooks: WebhookConfig,
}

/// `TOLLGATE_WEBHOOK_BATCH_INTERVAL`, `TOLLGATE_WEBHOOK_RETRY_SCHEDULE`, and the
/// per-attempt timeout (10 s, per the spec; settable here for tests only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    pub batch_interval: Duration,
    pub retry_schedule: tollgate_billing::RetrySchedule,
    pub timeout: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            batch_interval: DEFAULT_WEBHOOK_BATCH_INTERVAL,
            retry_schedule: tollgate_billing::RetrySchedule::default(),
            timeout: DEFAULT_WEBHOOK_TIMEOUT,
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("database_url", &self.database_url)
            .field("spool_dir", &self.spool_dir)
            .field("redis_url", &self.redis_url.as_ref().map(|_| "<set>"))
            .field("redis_key_prefix", &self.redis_key_prefix)
            .field("expected_instances", &self.expected_instances)
            .field("admin_key", &self.admin_key.as_ref().map(|_| "<set>"))
            .field("master_key", &self.master_key.as_ref().map(|_| "<set>"))
            .field("allow_private_networks", &self.allow_private_networks)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("upstream_timeout", &self.upstream_timeout)
            .field("log_format", &self.log_format)
            .field("demo", &self.demo)
            .field("webhooks", &self.webhooks)
            .finish()
    }
}

impl Config {
    /// Defaults only: what `tollgate serve` uses with no file, variable or flag.
    pub fn defaults() -> anyhow::Result<Self> {
        Self::resolve(ServeArgs::default(), FileConfig::default())
    }

    /// Lays the file's values under the flags / environment.
    pub fn from_args(args: ServeArgs) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        Self::resolve(args, file)
    }

    fn resolve(args: ServeArgs, file: FileConfig) -> anyhow::Result<Self> {
        let listen_text = args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen = parse_listen(&listen_text)?;
        let redis_url = args.redis.or(file.redis_url);
        if let Some(url) = &redis_url {
            if url.starts_with("rediss://") {
                bail!(
                    "redis: rediss:// (TLS) is not supported by this build; use redis:// \
                     (on a private network, or through a TLS tunnel such as stunnel)"
                );
            }
            if !url.starts_with("redis://") {
                bail!("redis: the URL must start with redis://");
            }
        }
        let redis_key_prefix = args.redis_key_prefix;
        if redis_key_prefix.as_deref() == Some("") {
            bail!("redis key prefix must not be empty");
        }
        let expected_instances = args
            .expected_instances
            .or(file.expected_instances)
            .unwrap_or(1);
        let Some(expected_instances) = std::num::NonZeroU64::new(expected_instances)
            .filter(|n| n.get() <= MAX_EXPECTED_INSTANCES)
        else {
            bail!("expected_instances must be between 1 and {MAX_EXPECTED_INSTANCES}");
        };
        let admin_key = args.admin_key.or(file.admin_key);
        if let Some(key) = &admin_key {
            if key.chars().count() < MIN_ADMIN_KEY_LEN {
                bail!("TOLLGATE_ADMIN_KEY must be at least {MIN_ADMIN_KEY_LEN} characters");
            }
            if !key.bytes().all(|c| c.is_ascii_graphic()) {
                bail!("TOLLGATE_ADMIN_KEY must be printable ASCII without spaces");
            }
        }
        let master_key = match args.master_key.or(file.master_key) {
            Some(text) => Some(parse_master_key(&text)?),
            None => None,
        };
        let webhooks = webhook_config(
            args.webhook_batch_interval.or(file.webhook_batch_interval),
            args.webhook_retry_schedule.or(file.webhook_retry_schedule),
        )?;
        let upstream_timeout = match args.upstream_timeout.or(file.upstream_timeout) {
            Some(text) => humantime::parse_duration(&text).with_context(|| {
                format!("upstream_timeout: '{text}' is not a duration like 60s")
            })?,
            None => DEFAULT_UPSTREAM_TIMEOUT,
        };
        let max_body_bytes = args
            .max_body_bytes
            .or(file.max_body_bytes)
            .unwrap_or(DEFAULT_MAX_BODY_BYTES);
        if max_body_bytes == 0 {
            bail!("max_body_bytes must be positive");
        }
        let log_format = match args.log_format.or(file.log_format).as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => bail!("log_format: '{other}' is not 'text' or 'json'"),
        };
        let database_url = args
            .database
            .or(file.database_url)
            .unwrap_or_else(|| DEFAULT_DATABASE.to_owned());
        check_database_url(&database_url)?;
        let spool_dir = args.spool_dir.or(file.spool_dir);
        if spool_dir
            .as_ref()
            .is_some_and(|dir| dir.as_os_str().is_empty())
        {
            bail!("spool_dir must not be empty");
        }
        Ok(Self {
            listen,
            database_url,
            spool_dir,
            redis_url,
            redis_key_prefix,
            expected_instances,
            admin_key,
            master_key,
            allow_private_networks: args
                .allow_private_networks
                .or(file.allow_private_networks)
                .unwrap_or(false),
            max_body_bytes,
            upstream_timeout,
            log_format,
            demo: args.demo,
            webhooks,
        })
    }
}

/// The webhook settings from their text forms (`1s`; `5s,30s,2m`). A zero batch
/// interval is refused: it would cut one delivery per event.
fn webhook_config(
    batch_interval: Option<String>,
    retry_schedule: Option<String>,
) -> anyhow::Result<WebhookConfig> {
    let mut webhooks = WebhookConfig::default();
    if let Some(text) = batch_interval {
        webhooks.batch_interval = humantime::parse_duration(&text).with_context(|| {
            format!("webhook_batch_interval: '{text}' is not a duration like 1s")
        })?;
        if webhooks.batch_interval.is_zero() {
            bail!("webhook_batch_interval must be longer than zero");
        }
    }
    if let Some(text) = retry_schedule {
        webhooks.retry_schedule = tollgate_billing::RetrySchedule::parse(&text)
            .map_err(|why| anyhow::anyhow!("webhook_retry_schedule: {why}"))?;
    }
    Ok(webhooks)
}

/// Whether `url` names a PostgreSQL database (`postgres://` or `postgresql://`).
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Refuses a database URL this build cannot open, before anything is created: any
/// `scheme://` but SQLite's and PostgreSQL's, which the SQLite store would take for a
/// relative file path (`mysql://db/x` → `mysql:/db/x`). A plain path is a SQLite file.
/// The URL itself is never echoed: it may hold a password.
pub fn check_database_url(url: &str) -> anyhow::Result<()> {
    let Some((scheme, _)) = url.split_once("://") else {
        return Ok(());
    };
    let is_scheme = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    match scheme {
        _ if !is_scheme => Ok(()),
        "sqlite" | "postgres" | "postgresql" => Ok(()),
        other => bail!("database: unsupported URL scheme '{other}://'; use sqlite://PATH"),
    }
}

/// `host:port` where host is an IP address or a name (`localhost:8080`), resolved once
/// at start-up to its first address.
fn parse_listen(text: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    use std::net::ToSocketAddrs as _;
    text.to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .with_context(|| format!("listen: '{text}' is not an address like 127.0.0.1:8080"))
}

/// Base64 (standard or URL-safe, padding optional) of exactly 32 bytes.
pub fn parse_master_key(text: &str) -> anyhow::Result<[u8; 32]> {
    use base64::Engine as _;
    let text = text.trim();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text))
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(text))
        .context("master key: not base64")?;
    bytes.try_into().map_err(|b: Vec<u8>| {
        anyhow::anyhow!("master key: must decode to 32 bytes, got {}", b.len())
    })
}

/// The `--config` file (see `tollgate.example.toml`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub database_url: Option<String>,
    pub spool_dir: Option<PathBuf>,
    pub redis_url: Option<String>,
    pub expected_instances: Option<u64>,
    pub admin_key: Option<String>,
    pub master_key: Option<String>,
    pub allow_private_networks: Option<bool>,
    pub max_body_bytes: Option<usize>,
    pub upstream_timeout: Option<String>,
    pub log_format: Option<String>,
    pub webhook_batch_interval: Option<String>,
    pub webhook_retry_schedule: Option<String>,
}

impl FileConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        #[expect(
            clippy::disallowed_methods,
            reason = "read once at start-up, before the runtime serves anything"
        )]
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("config file {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls_of_other_engines_are_refused() {
        for ok in [
            "sqlite://tollgate.db",
            "sqlite:///var/lib/t.db",
            "sqlite::memory:",
            "t.db",
            "postgres.db",
            "./odd://name.db",
            "postgres://u:pw@db/x",
            "postgresql://db/x?options=-csearch_path%3Dt",
        ] {
            assert!(check_database_url(ok).is_ok(), "{ok}");
        }
        for (url, postgres) in [
            ("postgres://db/x", true),
            ("postgresql://db/x", true),
            ("sqlite://t.db", false),
            ("postgres.db", false),
        ] {
            assert_eq!(is_postgres_url(url), postgres, "{url}");
        }
        for (url, message) in [
            (
                "mysql://db/x",
                "database: unsupported URL scheme 'mysql://'; use sqlite://PATH",
            ),
            (
                "SQLITE://t.db",
                "database: unsupported URL scheme 'SQLITE://'; use sqlite://PATH",
            ),
        ] {
            let e = check_database_url(url).unwrap_err();
            assert_eq!(e.to_string(), message, "{url}");
        }
    }

    #[test]
    fn redis_settings_are_taken_and_checked() {
        let args = ServeArgs {
            redis: Some("redis://127.0.0.1:6379/2".into()),
            redis_key_prefix: Some("tg-a".into()),
            ..ServeArgs::default()
        };
        let config = Config::resolve(args, FileConfig::default()).unwrap();
        assert_eq!(
            config.redis_url.as_deref(),
            Some("redis://127.0.0.1:6379/2")
        );
        assert_eq!(config.redis_key_prefix.as_deref(), Some("tg-a"));
        assert_eq!(config.expected_instances.get(), 1);
        let args = ServeArgs {
            expected_instances: Some(3),
            ..ServeArgs::default()
        };
        let file: FileConfig = toml::from_str("expected_instances = 5\n").unwrap();
        assert_eq!(
            Config::resolve(args, file)
                .unwrap()
                .expected_instances
                .get(),
            3
        );
        let file: FileConfig = toml::from_str("expected_instances = 5\n").unwrap();
        assert_eq!(
            Config::resolve(ServeArgs::default(), file)
                .unwrap()
                .expected_instances
                .get(),
            5
        );
        let file: FileConfig = toml::from_str("redis_url = \"redis://cache:6380\"\n").unwrap();
        let config = Config::resolve(ServeArgs::default(), file).unwrap();
        assert_eq!(config.redis_url.as_deref(), Some("redis://cache:6380"));
        let file: FileConfig = toml::from_str("redis_url = \"rediss://cache:6380\"\n").unwrap();
        assert_eq!(
            Config::resolve(ServeArgs::default(), file)
                .unwrap_err()
                .to_string(),
            "redis: rediss:// (TLS) is not supported by this build; use redis:// (on a private \
             network, or through a TLS tunnel such as stunnel)"
        );
        assert_eq!(Config::defaults().unwrap().redis_url, None);
        for (args, message) in [
            (
                ServeArgs {
                    redis: Some("127.0.0.1:6379".into()),
                    ..ServeArgs::default()
                },
                "redis: the URL must start with redis://",
            ),
            (
                ServeArgs {
                    redis_key_prefix: Some(String::new()),
                    ..ServeArgs::default()
                },
                "redis key prefix must not be empty",
            ),
            (
                ServeArgs {
                    expected_instances: Some(0),
                    ..ServeArgs::default()
                },
                "expected_instances must be between 1 and 10000",
            ),
            (
                ServeArgs {
                    expected_instances: Some(10_001),
                    ..ServeArgs::default()
                },
                "expected_instances must be between 1 and 10000",
            ),
        ] {
            let e = Config::resolve(args, FileConfig::default()).unwrap_err();
            assert_eq!(e.to_string(), message);
        }
    }

    #[test]
    fn defaults_match_the_spec() {
        let config = Config::defaults().unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.database_url, "sqlite://tollgate.db");
        assert_eq!(config.max_body_bytes, 10_485_760);
        assert_eq!(config.upstream_timeout, Duration::from_secs(60));
        assert!(!config.allow_private_networks);
        assert_eq!(config.webhooks.batch_interval, Duration::from_secs(1));
        assert_eq!(config.webhooks.timeout, Duration::from_secs(10));
        assert_eq!(
            config.webhooks.retry_schedule,
            tollgate_billing::RetrySchedule::parse("5s,30s,2m,10m,1h,3h,8h").unwrap()
        );
    }

    #[test]
    fn the_example_file_holds_the_webhook_defaults() {
        let file: FileConfig =
            toml::from_str(include_str!("../../../tollgate.example.toml")).unwrap();
        let config = Config::resolve(ServeArgs::default(), file).unwrap();
        assert_eq!(config.webhooks, WebhookConfig::default());
    }

    #[test]
    fn webhook_settings_come_from_the_file_or_the_environment() {
        let file: FileConfig = toml::from_str(
            "webhook_batch_interval = \"250ms\"\nwebhook_retry_schedule = \"1s, 1m\"\n",
        )
        .unwrap();
        let config = Config::resolve(ServeArgs::default(), file).unwrap();
        assert_eq!(config.webhooks.batch_interval, Duration::from_millis(250));
        assert_eq!(
            config.webhooks.retry_schedule.steps(),
            [Duration::from_secs(1), Duration::from_secs(60)]
        );
        let args = ServeArgs {
            webhook_retry_schedule: Some("100ms,200ms".into()),
            ..ServeArgs::default()
        };
        let file: FileConfig = toml::from_str("webhook_retry_schedule = \"1h\"\n").unwrap();
        let config = Config::resolve(args, file).unwrap();
        assert_eq!(
            config.webhooks.retry_schedule.steps(),
            [Duration::from_millis(100), Duration::from_millis(200)]
        );
        for (args, message) in [
            (
                ServeArgs {
                    webhook_batch_interval: Some("soon".into()),
                    ..ServeArgs::default()
                },
                "webhook_batch_interval: 'soon' is not a duration like 1s",
            ),
            (
                ServeArgs {
                    webhook_batch_interval: Some("0s".into()),
                    ..ServeArgs::default()
                },
                "webhook_batch_interval must be longer than zero",
            ),
            (
                ServeArgs {
                    webhook_retry_schedule: Some("5s,0s".into()),
                    ..ServeArgs::default()
                },
                "webhook_retry_schedule: '0s': retry waits must be longer than zero",
            ),
        ] {
            let error = Config::resolve(args, FileConfig::default()).unwrap_err();
            assert_eq!(error.to_string(), message);
        }
    }

    #[test]
    fn the_spool_dir_comes_from_flags_or_the_file() {
        assert_eq!(Config::defaults().unwrap().spool_dir, None);
        let file: FileConfig = toml::from_str("spool_dir = \"/var/spool/tg\"\n").unwrap();
        let config = Config::resolve(ServeArgs::default(), file).unwrap();
        assert_eq!(config.spool_dir, Some(PathBuf::from("/var/spool/tg")));
        let args = ServeArgs {
            spool_dir: Some(PathBuf::from("here")),
            ..ServeArgs::default()
        };
        let file: FileConfig = toml::from_str("spool_dir = \"/var/spool/tg\"\n").unwrap();
        let config = Config::resolve(args, file).unwrap();
        assert_eq!(config.spool_dir, Some(PathBuf::from("here")));
        let empty = ServeArgs {
            spool_dir: Some(PathBuf::new()),
            ..ServeArgs::default()
        };
        let e = Config::resolve(empty, FileConfig::default()).unwrap_err();
        assert_eq!(e.to_string(), "spool_dir must not be empty");
    }

    #[test]
    fn listen_takes_addresses_and_host_names() {
        assert_eq!(parse_listen("0.0.0.0:9").unwrap().to_string(), "0.0.0.0:9");
        assert_eq!(parse_listen("[::1]:9").unwrap().to_string(), "[::1]:9");
        assert_eq!(parse_listen("localhost:8080").unwrap().port(), 8080);
        assert!(parse_listen("localhost").is_err());
        assert!(parse_listen("no such host!:80").is_err());
    }

    #[test]
    fn flags_and_environment_beat_the_file() {
        let file: FileConfig =
            toml::from_str("listen = \"127.0.0.1:9000\"\nmax_body_bytes = 5\n").unwrap();
        let args = ServeArgs {
            listen: Some("127.0.0.1:9001".into()),
            ..ServeArgs::default()
        };
        let config = Config::resolve(args, file).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:9001");
        assert_eq!(config.max_body_bytes, 5);
    }

    #[test]
    fn unknown_file_keys_and_bad_values_are_errors() {
        assert!(toml::from_str::<FileConfig>("lisen = \"x\"").is_err());
        let short = ServeArgs {
            admin_key: Some("short".into()),
            ..ServeArgs::default()
        };
        assert!(Config::resolve(short, FileConfig::default()).is_err());
        let bad_format = ServeArgs {
            log_format: Some("xml".into()),
            ..ServeArgs::default()
        };
        assert!(Config::resolve(bad_format, FileConfig::default()).is_err());
        assert!(parse_master_key("AAAA").is_err());
        let mysql = ServeArgs {
            database: Some("mysql://root:hunter2@db/x".into()),
            ..ServeArgs::default()
        };
        let e = Config::resolve(mysql, FileConfig::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "database: unsupported URL scheme 'mysql://'; use sqlite://PATH"
        );
        assert_eq!(parse_master_key(&"A".repeat(43)).unwrap(), [0; 32]);
    }
}
