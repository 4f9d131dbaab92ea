//! Command-line arguments only. Every `serve` option can also come from a `TOLLGATE_*`
//! environment variable or the `--config` TOML file; precedence is
//! defaults < file < environment < flags (see `config.rs`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "tollgate", version, about = "Self-hosted inference gateway")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once at start-up; boxing buys nothing"
)]
pub enum Command {
    /// Run the gateway (management API and OpenAI-compatible data plane).
    Serve(ServeArgs),
    /// Create, disable or enable workspaces.
    Workspace {
        #[command(subcommand)]
        action: WorkspaceAction,
        /// Database URL (`sqlite://tollgate.db` by default).
        #[arg(
            long,
            env = "TOLLGATE_DATABASE_URL",
            global = true,
            hide_env_values = true
        )]
        database: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum WorkspaceAction {
    /// Create a workspace; prints its first `manage` key alone on stdout.
    Create { name: String },
    /// Refuse the workspace's management calls (403) and API keys (401).
    Disable { name: String },
    /// Restore a disabled workspace.
    Enable { name: String },
}

#[derive(Debug, Args, Default)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "TOLLGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "TOLLGATE_LISTEN")]
    pub listen: Option<String>,
    /// Database URL [default: sqlite://tollgate.db].
    #[arg(long, env = "TOLLGATE_DATABASE_URL", hide_env_values = true)]
    pub database: Option<String>,
    /// Directory where usage events wait while the database is unreachable [default:
    /// `tollgate-spool` beside the SQLite file; ./tollgate-spool with PostgreSQL].
    #[arg(long = "spool-dir", env = "TOLLGATE_SPOOL_DIR")]
    pub spool_dir: Option<PathBuf>,
    /// Redis URL for shared rate counters (unset: in-process limiter).
    #[arg(long, env = "TOLLGATE_REDIS_URL", hide_env_values = true)]
    pub redis: Option<String>,
    /// Prefix of every Redis key [default: tg]; distinct deployments sharing one Redis
    /// need distinct prefixes.
    #[arg(long = "redis-key-prefix", env = "TOLLGATE_REDIS_KEY_PREFIX")]
    pub redis_key_prefix: Option<String>,
    /// How many instances share the Redis: while Redis is unreachable each instance
    /// enforces every limit divided by this [default: 1].
    #[arg(long = "expected-instances", env = "TOLLGATE_EXPECTED_INSTANCES")]
    pub expected_instances: Option<u64>,
    /// A `manage` key of workspace `default`, at least 32 characters, valid on every start.
    #[arg(long = "admin-key", env = "TOLLGATE_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// Base64 of 32 bytes that seal stored secrets (generated next to the SQLite file when
    /// unset; required with PostgreSQL, the same on every instance).
    #[arg(
        long = "master-key",
        env = "TOLLGATE_MASTER_KEY",
        hide_env_values = true
    )]
    pub master_key: Option<String>,
    /// Let upstream and webhook URLs resolve to loopback / private / link-local addresses.
    #[arg(
        long = "allow-private-networks",
        env = "TOLLGATE_ALLOW_PRIVATE_NETWORKS"
    )]
    pub allow_private_networks: Option<bool>,
    /// Largest accepted request body in bytes [default: 10485760].
    #[arg(long = "max-body-bytes", env = "TOLLGATE_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Time allowed for an upstream's response headers, e.g. `60s` [default: 60s].
    #[arg(long = "upstream-timeout", env = "TOLLGATE_UPSTREAM_TIMEOUT")]
    pub upstream_timeout: Option<String>,
    /// Log format: `text` or `json` [default: text].
    #[arg(long = "log-format", env = "TOLLGATE_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Longest a billing event waits before its webhook batch is cut, e.g. `1s` [default: 1s].
    #[arg(
        long = "webhook-batch-interval",
        env = "TOLLGATE_WEBHOOK_BATCH_INTERVAL"
    )]
    pub webhook_batch_interval: Option<String>,
    /// Waits between webhook retries, comma-separated [default: 5s,30s,2m,10m,1h,3h,8h].
    #[arg(
        long = "webhook-retry-schedule",
        env = "TOLLGATE_WEBHOOK_RETRY_SCHEDULE"
    )]
    pub webhook_retry_schedule: Option<String>,
    /// Also run a built-in mock model and register endpoint `demo/echo`, a group and a key.
    #[arg(long)]
    pub demo: bool,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::Cli;

    /// `--help` prints an option's environment value unless hidden; these URLs may carry
    /// a password, so `--help` must never show them.
    #[test]
    fn help_never_shows_the_value_of_a_url_that_may_hold_a_password() {
        let cli = Cli::command();
        let hidden = |command: &str, arg: &str| {
            cli.find_subcommand(command)
                .and_then(|sub| sub.get_arguments().find(|a| a.get_id() == arg))
                .map(clap::Arg::is_hide_env_values_set)
        };
        assert_eq!(hidden("serve", "database"), Some(true));
        assert_eq!(hidden("serve", "redis"), Some(true));
        assert_eq!(hidden("serve", "admin_key"), Some(true));
        assert_eq!(hidden("serve", "master_key"), Some(true));
        assert_eq!(hidden("workspace", "database"), Some(true));
    }
}
