//! Back-end servers a test owns and can stop: a private `redis-server` and a private
//! PostgreSQL cluster, each on a free loopback port with its files in a fresh temporary
//! directory, so a fault test can take one down under load without touching the shared
//! services other tests use.
//!
//! `stop` models a crash (Redis: SIGKILL; PostgreSQL: `pg_ctl stop -m immediate`, which
//! severs every connection at once and leaves recovery to the next start), and
//! `start_again` brings the same server back on the same port (PostgreSQL with the same
//! data). Dropping either stops the server and deletes its directory.
//!
//! PostgreSQL refuses to run as root: as root, `initdb` and `pg_ctl` run as the
//! `postgres` OS user (`runuser -u postgres --`) over a directory owned by it.

use std::ffi::OsStr;
use std::io;
use std::net::TcpListener as StdTcpListener;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// How long a server may take to accept connections after it was started.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// A fresh directory under the system temporary directory, removed by [`TempRoot::drop`].
#[derive(Debug)]
struct TempRoot(PathBuf);

impl TempRoot {
    fn create(kind: &str) -> io::Result<TempRoot> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!(
                "tollgate-{kind}-{}-{n}-{nanos:08x}",
                std::process::id()
            ));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(TempRoot(path)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for TempRoot {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!(%error, dir = %self.0.display(), "could not remove a test server's directory");
        }
    }
}

/// A port nobody listens on right now (bound, read, released).
fn free_port() -> io::Result<u16> {
    Ok(StdTcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

/// `name` on `PATH`, else in the newest `/usr/lib/postgresql/<version>/bin`.
fn find_binary(name: &str) -> io::Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    if let Some(found) = on_path
        .iter()
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
    {
        return Ok(found);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, entry.path().join("bin").join(name)))
        })
        .filter(|(_, candidate)| is_executable(candidate))
        .collect();
    versions.sort();
    versions.pop().map(|(_, path)| path).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{name} is neither on PATH nor in /usr/lib/postgresql/*/bin"),
        )
    })
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.mode() & 0o111 != 0)
}

/// True when this process runs as root (owner of `/proc/self` is the effective user).
fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|meta| meta.uid() == 0)
}

/// Whether something accepts TCP connections on `127.0.0.1:port`.
async fn accepts(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).await.is_ok()
}

/// A `redis-server` of the test's own: no persistence, files in a temporary directory.
#[derive(Debug)]
pub struct RedisServer {
    binary: PathBuf,
    port: u16,
    child: Option<std::process::Child>,
    dir: TempRoot,
}

impl RedisServer {
    /// Starts `redis-server` (found on `PATH`) on a free port and waits until it answers
    /// `PING`.
    pub async fn start() -> io::Result<RedisServer> {
        let mut server = RedisServer {
            binary: find_binary("redis-server")?,
            port: free_port()?,
            child: None,
            dir: TempRoot::create("redis")?,
        };
        server.start_again().await?;
        Ok(server)
    }

    /// `redis://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the server (SIGKILL, like a crash) and waits for it to exit; its counters
    /// are gone. Stopping a stopped server does nothing.
    pub async fn stop(&mut self) -> io::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts the server again on the same port (empty) and waits until it answers
    /// `PING`; does nothing when it runs.
    pub async fn start_again(&mut self) -> io::Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let child = std::process::Command::new(&self.binary)
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--logfile",
                "",
            ])
            .arg("--dir")
            .arg(&self.dir.0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + READY_WITHIN;
        loop {
            if ping(self.port).await {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(io::Error::other(format!(
                    "redis-server on port {} exited at start: {status}",
                    self.port
                )));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("redis-server on port {} never answered PING", self.port),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether a Redis on `port` answers `PING` with `+PONG`.
async fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    if stream.write_all(b"*1\r\n$4\r\nPING\r\n").await.is_err() {
        return false;
    }
    let mut answer = [0_u8; 7];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), stream.read_exact(&mut answer)).await,
        Ok(Ok(_))
    ) && &answer == b"+PONG\r\n"
}

/// A PostgreSQL cluster of the test's own: trust authentication, `fsync=off`, listening on
/// `127.0.0.1:<port>` and a socket in its directory. Its superuser is `postgres`.
#[derive(Debug)]
pub struct PostgresServer {
    pg_ctl: PathBuf,
    port: u16,
    /// Run the tools as the `postgres` OS user (this process is root).
    as_postgres: bool,
    running: bool,
    root: TempRoot,
}

impl PostgresServer {
    /// `initdb` into a fresh directory, then starts the server on a free port and waits
    /// until it accepts connections.
    pub async fn start() -> io::Result<PostgresServer> {
        let initdb = find_binary("initdb")?;
        let pg_ctl = find_binary("pg_ctl")?;
        let as_postgres = is_root();
        let root = TempRoot::create("postgres")?;
        if as_postgres {
            let owned = tokio::process::Command::new("chown")
                .arg("postgres:")
                .arg(&root.0)
                .status()
                .await?;
            if !owned.success() {
                return Err(io::Error::other(format!(
                    "chown postgres {}: {owned}",
                    root.0.display()
                )));
            }
            // Every directory above it must let `postgres` through (a TMPDIR under /root
            // would not).
            let reachable = tokio::process::Command::new("runuser")
                .args(["-u", "postgres", "--", "test", "-w"])
                .arg(&root.0)
                .stdin(Stdio::null())
                .status()
                .await?;
            if !reachable.success() {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "the postgres OS user cannot write {} (is every directory above it \
                         open to others? set TMPDIR to e.g. /tmp)",
                        root.0.display()
                    ),
                ));
            }
        }
        let mut server = PostgresServer {
            pg_ctl,
            port: free_port()?,
            as_postgres,
            running: false,
            root,
        };
        let data = server.data_dir();
        server
            .run(
                &initdb,
                [
                    OsStr::new("-D"),
                    data.as_os_str(),
                    OsStr::new("-U"),
                    OsStr::new("postgres"),
                    OsStr::new("-A"),
                    OsStr::new("trust"),
                    OsStr::new("-E"),
                    OsStr::new("UTF8"),
                    OsStr::new("--locale=C"),
                    OsStr::new("--no-sync"),
                    OsStr::new("--no-instructions"),
                ],
            )
            .await?;
        server.start_again().await?;
        Ok(server)
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Stops the server the way a crash would: `pg_ctl stop -m immediate` ends every
    /// backend at once, in-flight transactions are lost and committed ones are recovered
    /// from the WAL by the next start. Stopping a stopped server does nothing.
    pub async fn stop(&mut self) -> io::Result<()> {
        if !self.running {
            return Ok(());
        }
        let data = self.data_dir();
        let pg_ctl = self.pg_ctl.clone();
        self.run(
            &pg_ctl,
            [
                OsStr::new("stop"),
                OsStr::new("-D"),
                data.as_os_str(),
                OsStr::new("-m"),
                OsStr::new("immediate"),
                OsStr::new("-w"),
            ],
        )
        .await?;
        self.running = false;
        Ok(())
    }

    /// Starts the server on the same port over the same data and waits until it accepts
    /// connections; does nothing when it runs.
    pub async fn start_again(&mut self) -> io::Result<()> {
        if self.running {
            return Ok(());
        }
        let data = self.data_dir();
        let log = self.root.0.join("server.log");
        // fsync=off and full_page_writes=off only matter when the machine itself crashes;
        // synchronous_commit stays on: `stop` ends the server at once, and a commit the
        // WAL writer had not yet written would be lost.
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off",
            self.port,
            self.root.0.display()
        );
        let pg_ctl = self.pg_ctl.clone();
        let started = self
            .run(
                &pg_ctl,
                [
                    OsStr::new("start"),
                    OsStr::new("-D"),
                    data.as_os_str(),
                    OsStr::new("-l"),
                    log.as_os_str(),
                    OsStr::new("-o"),
                    OsStr::new(&options),
                    OsStr::new("-w"),
                    OsStr::new("-t"),
                    OsStr::new("60"),
                ],
            )
            .await;
        if let Err(error) = started {
            return Err(io::Error::other(format!(
                "PostgreSQL on port {} did not start: {error}\n{}",
                self.port,
                self.log_tail().await
            )));
        }
        self.running = true;
        let deadline = tokio::time::Instant::now() + READY_WITHIN;
        while !accepts(self.port).await {
            if tokio::time::Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "PostgreSQL on port {} never accepted connections\n{}",
                        self.port,
                        self.log_tail().await
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// The last lines of the server's log, headed for an error message.
    pub async fn log_tail(&self) -> String {
        const LINES: usize = 30;
        let path = self.root.0.join("server.log");
        match tokio::fs::read(&path).await {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(LINES)..];
                format!("last lines of {}:\n{}", path.display(), tail.join("\n"))
            }
            Err(error) => format!("no server log at {}: {error}", path.display()),
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.root.0.join("data")
    }

    /// Runs `binary args` (as `postgres` when root) in the server's directory; an error
    /// carries its output when it fails.
    async fn run<'a>(
        &self,
        binary: &Path,
        args: impl IntoIterator<Item = &'a OsStr>,
    ) -> io::Result<()> {
        let mut command = self.command(binary);
        command.args(args);
        let output = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .await?;
        if output.status.success() {
            return Ok(());
        }
        Err(io::Error::other(format!(
            "{} failed ({}):\n{}{}",
            binary.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )))
    }

    fn command(&self, binary: &Path) -> tokio::process::Command {
        let mut command = if self.as_postgres {
            let mut command = tokio::process::Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(binary);
            command
        } else {
            tokio::process::Command::new(binary)
        };
        // The caller's directory may be closed to the `postgres` user.
        command.current_dir(&self.root.0);
        command
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        if !self.running {
            return;
        }
        let mut command = if self.as_postgres {
            let mut command = std::process::Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&self.pg_ctl);
            command
        } else {
            std::process::Command::new(&self.pg_ctl)
        };
        let stopped = command
            .current_dir(&self.root.0)
            .arg("stop")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !stopped.is_ok_and(|status| status.success()) {
            tracing::warn!(port = self.port, "could not stop a test PostgreSQL server");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection as _;

    /// The back-end suites run where `TOLLGATE_TEST_*` say the servers are installed.
    fn enabled(variable: &str, test: &str) -> bool {
        if std::env::var_os(variable).is_some() {
            return true;
        }
        println!("skipped {test}: set {variable}");
        false
    }

    /// Sends one command and returns the raw answer (enough for small replies).
    async fn redis_command(port: u16, args: &[&str]) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = vec![0_u8; 512];
        let n = stream.read(&mut answer).await.unwrap();
        String::from_utf8(answer[..n].to_vec()).unwrap()
    }

    #[tokio::test]
    async fn redis_starts_stops_and_starts_again_on_the_same_port_empty() {
        if !enabled(
            "TOLLGATE_TEST_REDIS_URL",
            "redis_starts_stops_and_starts_again_on_the_same_port_empty",
        ) {
            return;
        }
        let mut redis = RedisServer::start().await.unwrap();
        let port = redis.port();
        assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}"));
        assert_eq!(redis_command(port, &["SET", "k", "v"]).await, "+OK\r\n");
        assert_eq!(redis_command(port, &["GET", "k"]).await, "$1\r\nv\r\n");

        redis.stop().await.unwrap();
        assert!(!redis.is_running());
        assert!(!accepts(port).await);
        redis.stop().await.unwrap();

        redis.start_again().await.unwrap();
        assert!(redis.is_running());
        assert_eq!(redis.port(), port);
        // Nothing is kept on disk: a restarted Redis is empty.
        assert_eq!(redis_command(port, &["GET", "k"]).await, "$-1\r\n");
        let dir = redis.dir.0.clone();
        drop(redis);
        assert!(!accepts(port).await);
        assert!(!dir.exists());
    }

    #[tokio::test]
    async fn postgres_starts_stops_and_starts_again_with_its_data() {
        if !enabled(
            "TOLLGATE_TEST_POSTGRES_URL",
            "postgres_starts_stops_and_starts_again_with_its_data",
        ) {
            return;
        }
        let mut postgres = PostgresServer::start().await.unwrap();
        let port = postgres.port();
        assert_eq!(
            postgres.url(),
            format!("postgres://postgres@127.0.0.1:{port}/postgres")
        );
        // One connection, not a pool: a pool would wait out its acquire timeout once the
        // server is gone.
        let mut conn = sqlx::PgConnection::connect(&postgres.url()).await.unwrap();
        sqlx::query("CREATE TABLE kept (n BIGINT)")
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::query("INSERT INTO kept VALUES (41), (1)")
            .execute(&mut conn)
            .await
            .unwrap();

        postgres.stop().await.unwrap();
        assert!(!postgres.is_running());
        assert!(!accepts(port).await);
        assert!(sqlx::query("SELECT 1").execute(&mut conn).await.is_err());
        drop(conn);
        postgres.stop().await.unwrap();

        postgres.start_again().await.unwrap();
        assert!(postgres.is_running());
        assert_eq!(postgres.port(), port);
        let mut conn = sqlx::PgConnection::connect(&postgres.url()).await.unwrap();
        let (sum,): (i64,) = sqlx::query_as("SELECT sum(n)::BIGINT FROM kept")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(sum, 42);
        conn.close().await.unwrap();

        let dir = postgres.root.0.clone();
        drop(postgres);
        assert!(!accepts(port).await);
        assert!(!dir.exists());
    }
}
