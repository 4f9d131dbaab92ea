//! The `tollgate` binary as an operator runs it: first-start key, `--demo` and its curl
//! command, `workspace` commands, graceful shutdown on SIGTERM.

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader, Lines};
use tokio::process::{Child, Command};

use crate::support::{ok_json, status_json, TestServer};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// `tollgate` with no inherited `TOLLGATE_*` variables.
fn tollgate() -> Command {
    let mut command = Command::new(BIN);
    for (name, _) in std::env::vars() {
        if name.starts_with("TOLLGATE_") {
            command.env_remove(name);
        }
    }
    command.env("RUST_LOG", "info").kill_on_drop(true);
    command
}

struct Spawned {
    child: Child,
    stdout: Lines<BufReader<tokio::process::ChildStdout>>,
    stderr: Lines<BufReader<tokio::process::ChildStderr>>,
}

fn spawn(mut command: Command) -> Spawned {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    Spawned {
        child,
        stdout,
        stderr,
    }
}

/// Reads lines until one satisfies `pick`, within 30 s.
async fn line_where<R: AsyncRead + Unpin>(
    lines: &mut Lines<BufReader<R>>,
    pick: impl Fn(&str) -> Option<String>,
) -> String {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("process ended early");
            if let Some(found) = pick(&line) {
                return found;
            }
        }
    })
    .await
    .expect("expected line never came")
}

/// The `addr=` of the "tollgate listening" log line.
async fn listening_addr(spawned: &mut Spawned) -> String {
    line_where(&mut spawned.stderr, |line| {
        let at = line.find("addr=")?;
        line.contains("tollgate listening").then(|| {
            line[at + 5..]
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_owned()
        })
    })
    .await
}

fn sigterm(child: &Child) {
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn first_start_prints_a_working_manage_key_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("t.db").display());
    let mut command = tollgate();
    command.args(["serve", "--listen", "127.0.0.1:0", "--database", &db]);
    let mut first = spawn(command);
    let key = line_where(&mut first.stdout, |l| {
        l.starts_with("tgm_").then(|| l.trim().to_owned())
    })
    .await;
    let addr = listening_addr(&mut first).await;
    let http = reqwest::Client::new();
    let answer = http
        .get(format!("http://{addr}/v1/gateway/groups"))
        .header("Authorization", format!("Api-Key {key}"))
        .send()
        .await
        .unwrap();
    let body = ok_json(answer).await;
    assert_eq!(body["items"], json!([]));
    sigterm(&first.child);
    let status = tokio::time::timeout(Duration::from_secs(10), first.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "graceful exit, got {status}");

    // The second start on the same file prints no new key; the old one still works.
    let mut command = tollgate();
    command.args(["serve", "--listen", "127.0.0.1:0", "--database", &db]);
    let mut second = spawn(command);
    let addr = listening_addr(&mut second).await;
    let answer = http
        .get(format!("http://{addr}/v1/gateway/groups"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    sigterm(&second.child);
    second.child.wait().await.unwrap();
    let mut printed = String::new();
    while let Ok(Some(line)) = second.stdout.next_line().await {
        printed.push_str(&line);
    }
    assert!(!printed.contains("tgm_"), "no second key: {printed}");
}

#[tokio::test]
async fn demo_prints_a_curl_command_that_works_when_pasted() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("demo.db").display());
    let mut command = tollgate();
    command.args([
        "serve",
        "--demo",
        "--listen",
        "127.0.0.1:0",
        "--database",
        &db,
    ]);
    let mut demo = spawn(command);
    let curl = line_where(&mut demo.stdout, |l| {
        l.starts_with("curl ").then(|| l.to_owned())
    })
    .await;
    let output = Command::new("sh")
        .arg("-c")
        .arg(&curl)
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "curl failed: {output:?}");
    let reply: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(reply["object"], "chat.completion");
    assert_eq!(
        reply["choices"][0]["message"]["content"],
        "Hello, Tollgate!"
    );
    sigterm(&demo.child);
    assert!(demo.child.wait().await.unwrap().success());
}

/// A first start that cannot serve (its port taken, a Redis URL that is not one, a spool
/// directory that is a file) prints no key: the workspace's key, shown once, comes with the
/// first start that serves.
#[tokio::test]
async fn a_first_start_that_cannot_serve_prints_no_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let cases: [(&[&str], &str); 3] = [
        (&["--listen", &taken], "Error: binding "),
        (
            &["--listen", "127.0.0.1:0", "--redis", "redis://"],
            "Error: redis: shared limiter: not a Redis URL: ",
        ),
        (
            &["--listen", "127.0.0.1:0", "--spool-dir", "a-file"],
            "Error: opening the usage spool a-file",
        ),
    ];
    for (args, error) in cases {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a-file"), b"").unwrap();
        let output = tokio::time::timeout(
            Duration::from_secs(30),
            tollgate()
                .current_dir(dir.path())
                .env("RUST_BACKTRACE", "0")
                .arg("serve")
                .args(args)
                .output(),
        )
        .await
        .expect("exits at once")
        .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.lines().any(|l| l.starts_with(error)),
            "{args:?}: {stderr}"
        );
        assert_eq!(String::from_utf8_lossy(&output.stdout), "", "{args:?}");

        let mut command = tollgate();
        command
            .current_dir(dir.path())
            .args(["serve", "--listen", "127.0.0.1:0"]);
        let mut serving = spawn(command);
        let key = line_where(&mut serving.stdout, |l| {
            l.starts_with("tgm_").then(|| l.trim().to_owned())
        })
        .await;
        assert_eq!(key.len(), "tgm_".len() + 12 + 1 + 32, "{args:?}: {key}");
        sigterm(&serving.child);
        assert!(serving.child.wait().await.unwrap().success(), "{args:?}");
    }
}

/// A start waiting on a PostgreSQL server that accepts and never answers stops on SIGTERM
/// (a supervisor's stop, or `timeout`), with a line that says so.
#[tokio::test]
async fn sigterm_stops_a_start_that_waits_on_the_database() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("postgres://u@{}/x", silent.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let mut command = tollgate();
    command
        .current_dir(dir.path())
        .env("RUST_BACKTRACE", "0")
        .env("TOLLGATE_MASTER_KEY", "A".repeat(43))
        .args(["serve", "--listen", "127.0.0.1:0", "--database", &url]);
    let mut starting = spawn(command);
    // Connected, so well past installing its signal handlers.
    let (_held, _) = tokio::time::timeout(Duration::from_secs(30), silent.accept())
        .await
        .expect("connects")
        .unwrap();
    sigterm(&starting.child);
    let status = tokio::time::timeout(Duration::from_secs(10), starting.child.wait())
        .await
        .expect("exits on SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(1));
    let error = line_where(&mut starting.stderr, |l| {
        l.starts_with("Error:").then(|| l.to_owned())
    })
    .await;
    assert_eq!(error, "Error: stopped by a signal before serving");
}

/// A database URL of another engine is refused before anything is written: the store
/// would otherwise take `mysql://db/x` for the relative path `mysql:/db/x`, create a
/// fresh SQLite file there and print a key that works against no real server. A
/// PostgreSQL server that does not answer is a connection error, never a SQLite file, and
/// `serve` on PostgreSQL wants the master key first (no data directory to generate it in).
#[tokio::test]
async fn other_database_engines_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let master_key = "A".repeat(43);
    let unsupported = "Error: database: unsupported URL scheme 'mysql://'; use sqlite://PATH";
    let no_postgres = "Error: database: cannot connect to PostgreSQL";
    let no_master_key = "Error: TOLLGATE_MASTER_KEY is required with PostgreSQL: set it \
                         (base64 of 32 bytes), the same on every instance";
    // (arguments, TOLLGATE_MASTER_KEY, first stderr line, a later line it must contain)
    let cases: [(&[&str], Option<&str>, &str, &str); 6] = [
        (
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--database",
                "mysql://u:pw@db/x",
            ],
            None,
            unsupported,
            "",
        ),
        (
            &[
                "workspace",
                "create",
                "acme",
                "--database",
                "mysql://u:pw@db/x",
            ],
            None,
            unsupported,
            "",
        ),
        (
            &[
                "workspace",
                "create",
                "acme",
                "--database",
                "postgres://u:pw@127.0.0.1:1/x",
            ],
            None,
            no_postgres,
            "Connection refused",
        ),
        (
            &[
                "workspace",
                "disable",
                "acme",
                "--database",
                "postgresql://127.0.0.1:1/x",
            ],
            None,
            no_postgres,
            "Connection refused",
        ),
        (
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--database",
                "postgres://u:pw@127.0.0.1:1/x",
            ],
            Some(&master_key),
            no_postgres,
            "Connection refused",
        ),
        (
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--database",
                "postgres://u:pw@127.0.0.1:1/x",
            ],
            None,
            no_master_key,
            "",
        ),
    ];
    for (args, master_key, first_line, later) in cases {
        let mut command = tollgate();
        command
            .current_dir(dir.path())
            .env("RUST_BACKTRACE", "0")
            .args(args);
        if let Some(key) = master_key {
            command.env("TOLLGATE_MASTER_KEY", key);
        }
        let output = tokio::time::timeout(Duration::from_secs(30), command.output())
            .await
            .expect("exits at once")
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        let mut lines = stderr.lines().filter(|l| !l.contains(" INFO "));
        assert_eq!(lines.next(), Some(first_line), "{args:?}: {stderr}");
        let rest: Vec<&str> = lines.collect();
        if later.is_empty() {
            assert!(rest.is_empty(), "{args:?}: {stderr}");
        } else {
            assert!(rest.iter().any(|l| l.contains(later)), "{args:?}: {stderr}");
        }
        assert!(!stderr.contains("pw"), "no password echoed: {stderr}");
        assert_eq!(String::from_utf8_lossy(&output.stdout), "", "{args:?}");
        let created: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(created.is_empty(), "{args:?} created {created:?}");
    }
    // A plain file path (even one named after an engine) is still a SQLite file.
    let output = tollgate()
        .current_dir(dir.path())
        .args(["workspace", "create", "acme", "--database", "postgres.db"])
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(dir.path().join("postgres.db").exists());
}

#[tokio::test]
async fn workspace_commands_create_disable_and_enable() {
    let server = TestServer::start().await;
    let db = format!(
        "sqlite://{}",
        server.dir.path().join("tollgate.db").display()
    );

    let output = tollgate()
        .args(["workspace", "create", "acme", "--database", &db])
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let key = stdout.trim();
    assert_eq!(
        stdout.lines().count(),
        1,
        "the key alone on stdout: {stdout:?}"
    );
    assert!(key.starts_with("tgm_"));

    let list = |key: String| {
        let http = server.http.clone();
        let url = server.url("/v1/gateway/groups");
        async move { http.get(url).bearer_auth(key).send().await.unwrap() }
    };
    assert_eq!(list(key.to_owned()).await.status(), 200);

    let again = tollgate()
        .args(["workspace", "create", "acme", "--database", &db])
        .output()
        .await
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    let disable = tollgate()
        .args(["workspace", "disable", "acme", "--database", &db])
        .output()
        .await
        .unwrap();
    assert!(disable.status.success());
    let (status, body) = status_json(list(key.to_owned()).await).await;
    assert_eq!(status, 403, "{body}");

    let enable = tollgate()
        .args(["workspace", "enable", "acme", "--database", &db])
        .output()
        .await
        .unwrap();
    assert!(enable.status.success());
    assert_eq!(list(key.to_owned()).await.status(), 200);

    let missing = tollgate()
        .args(["workspace", "disable", "nobody", "--database", &db])
        .output()
        .await
        .unwrap();
    assert!(!missing.status.success());
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_stream_finish() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("t.db").display());
    let admin = format!("tgm_sigtermtest{}", "x".repeat(32));
    let mock = tollgate_testkit::MockUpstream::start().await.unwrap();
    let mut command = tollgate();
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--database", &db])
        .env("TOLLGATE_ADMIN_KEY", &admin)
        .env("TOLLGATE_ALLOW_PRIVATE_NETWORKS", "true");
    let mut gateway = spawn(command);
    let addr = listening_addr(&mut gateway).await;
    let http = reqwest::Client::new();
    let post = |path: &str, body: serde_json::Value| {
        http.post(format!("http://{addr}{path}"))
            .header("Authorization", format!("Api-Key {admin}"))
            .json(&body)
            .send()
    };
    ok_json(
        post(
            "/v1/gateway/endpoints",
            json!({"slug": "acme/slow", "targets": [{"provider": "OPENAI_COMPATIBLE",
                "base_url": mock.base_url(), "target_model": "echo?chunks=20&interval_ms=50",
                "secret_id": null}]}),
        )
        .await
        .unwrap(),
    )
    .await;
    let group = ok_json(
        post(
            "/v1/gateway/groups",
            json!({"metadata": {"external_entity_id": "c1"}, "models": [{"slug": "acme/slow"}],
                   "hierarchy": {"limit_enforcement": "INDEPENDENT", "parent_group_id": null}}),
        )
        .await
        .unwrap(),
    )
    .await;
    let id = group["id"].as_str().unwrap();
    let key = ok_json(
        post(
            &format!("/v1/gateway/groups/{id}/api_keys"),
            json!({"name": null}),
        )
        .await
        .unwrap(),
    )
    .await["api_key"]
        .as_str()
        .unwrap()
        .to_owned();

    let stream = http
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": "acme/slow", "stream": true,
                      "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    sigterm(&gateway.child);
    let body = stream.text().await.unwrap();
    assert!(
        body.trim_end().ends_with("data: [DONE]"),
        "stream cut short: {body}"
    );
    // A role chunk, 20 content chunks, the finish chunk; the usage chunk the gateway asked
    // for is stripped because this client did not.
    assert_eq!(body.matches("chat.completion.chunk").count(), 22, "{body}");
    assert!(!body.contains("\"choices\":[]"), "{body}");
    let status = tokio::time::timeout(Duration::from_secs(10), gateway.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn shutdown_closes_the_listener_and_the_file_keeps_its_rows() {
    let server = TestServer::start().await;
    let url = server.url("/healthz");
    let http = server.http.clone();
    assert_eq!(http.get(&url).send().await.unwrap().status(), 200);
    let endpoint = server.create_endpoint("acme/kept", "echo").await;
    let dir = server.shutdown().await;
    assert!(http.get(&url).send().await.is_err(), "listener still open");

    let url = format!("sqlite://{}", dir.path().join("tollgate.db").display());
    let reopened = tollgate_store::SqliteStore::open(&url).await.unwrap();
    let kept = tollgate_store::Store::endpoint_by_slug(&reopened, "acme/kept")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kept.id, endpoint["id"].as_str().unwrap());
    reopened.close().await;
}

/// Rotating `TOLLGATE_ADMIN_KEY` retires the value it replaces: after a restart with a new
/// value the old one answers 401, while the new one and keys minted through the API work.
#[tokio::test]
async fn a_rotated_admin_key_stops_working() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let old_key = format!("tgm_rotation-old{}", "a".repeat(32));
    let new_key = format!("tgm_rotation-new{}", "b".repeat(32));
    let start = |admin_key: &str| {
        let mut config = crate::support::test_config(&dir);
        config.admin_key = Some(admin_key.to_owned());
        tollgate::start(config)
    };
    let groups = |server: &tollgate::RunningServer, key: &str| {
        http.get(format!("http://{}/v1/gateway/groups", server.local_addr()))
            .bearer_auth(key)
            .send()
    };

    let first = start(&old_key).await.unwrap();
    assert_eq!(groups(&first, &old_key).await.unwrap().status(), 200);
    let minted = ok_json(
        http.post(format!(
            "http://{}/v1/gateway/management_keys",
            first.local_addr()
        ))
        .bearer_auth(&old_key)
        .json(&json!({"name": "ops", "scope": "manage"}))
        .send()
        .await
        .unwrap(),
    )
    .await;
    let ops_key = minted["key"].as_str().unwrap().to_owned();
    first.shutdown().await.unwrap();

    // The same value on the next start keeps working.
    let same = start(&old_key).await.unwrap();
    assert_eq!(groups(&same, &old_key).await.unwrap().status(), 200);
    same.shutdown().await.unwrap();

    let rotated = start(&new_key).await.unwrap();
    assert_eq!(groups(&rotated, &new_key).await.unwrap().status(), 200);
    assert_eq!(groups(&rotated, &ops_key).await.unwrap().status(), 200);
    let (status, body) = status_json(groups(&rotated, &old_key).await.unwrap()).await;
    assert_eq!(
        (status, body),
        (
            401,
            json!({"error": "Invalid management key", "code": "unauthorized"})
        )
    );
    rotated.shutdown().await.unwrap();
}

/// C11, the time-zone half: a gateway process whose local zone is Asia/Tokyo (UTC+9)
/// still counts DAY limits per UTC day — its 429 says come back at the next 00:00 UTC
/// and its usage report resets then. (The day arithmetic itself, 23:50 → 600 s, is pinned
/// with an injected clock in `limits::c11_the_day_is_a_utc_day`.)
#[tokio::test]
async fn day_limits_follow_utc_whatever_the_servers_time_zone() {
    use tollgate_core::{Clock, SystemClock};

    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("t.db").display());
    let admin = format!("tgm_tokyotest{}", "z".repeat(32));
    let mock = tollgate_testkit::MockUpstream::start().await.unwrap();
    let mut command = tollgate();
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--database", &db])
        .env("TZ", "Asia/Tokyo")
        .env("TOLLGATE_ADMIN_KEY", &admin)
        .env("TOLLGATE_ALLOW_PRIVATE_NETWORKS", "true");
    let mut gateway = spawn(command);
    let addr = listening_addr(&mut gateway).await;
    let http = reqwest::Client::new();
    let admin_post = |path: String, body: serde_json::Value| {
        http.post(format!("http://{addr}{path}"))
            .header("Authorization", format!("Api-Key {admin}"))
            .json(&body)
            .send()
    };
    ok_json(
        admin_post(
            "/v1/gateway/endpoints".into(),
            json!({"slug": "acme/m", "targets": [{"provider": "OPENAI_COMPATIBLE",
                "base_url": mock.base_url(),
                "target_model": "m?prompt_tokens=10&completion_tokens=20",
                "secret_id": null}]}),
        )
        .await
        .unwrap(),
    )
    .await;
    let group = ok_json(
        admin_post(
            "/v1/gateway/groups".into(),
            json!({"metadata": {"external_entity_id": "tokyo"},
                   "models": [{"slug": "acme/m", "usage_limits": [
                       {"type": "TOKEN", "unit": "DAY", "threshold": 30}]}],
                   "hierarchy": {"limit_enforcement": "INDEPENDENT", "parent_group_id": null}}),
        )
        .await
        .unwrap(),
    )
    .await;
    let id = group["id"].as_str().unwrap().to_owned();
    let key = ok_json(
        admin_post(
            format!("/v1/gateway/groups/{id}/api_keys"),
            json!({"name": null}),
        )
        .await
        .unwrap(),
    )
    .await["api_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let chat = || {
        http.post(format!("http://{addr}/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&json!({"model": "acme/m", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };
    assert_eq!(chat().await.unwrap().status(), 200);

    let before = SystemClock.now();
    let refused = chat().await.unwrap();
    let after = SystemClock.now();
    assert_eq!(refused.status(), 429);
    let retry: i64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // Whole seconds to the next 00:00 UTC, rounded up, measured around the call.
    let earliest = (before.next_utc_midnight().0 - after.0) / 1000;
    let latest = (after.next_utc_midnight().0 - before.0 + 999) / 1000;
    assert!(
        (earliest..=latest).contains(&retry),
        "Retry-After {retry} not in {earliest}..={latest}"
    );

    let report = ok_json(
        http.get(format!("http://{addr}/v1/gateway/groups/{id}/usage"))
            .header("Authorization", format!("Api-Key {admin}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let entry = &report["usage"]["acme/m"][0];
    assert_eq!(entry["current_usage"], 30);
    let midnights = [
        before.next_utc_midnight().to_rfc3339(),
        after.next_utc_midnight().to_rfc3339(),
    ];
    assert!(
        midnights.contains(&entry["reset_at"].as_str().unwrap().to_owned()),
        "reset_at {} is not the next 00:00 UTC",
        entry["reset_at"]
    );
    sigterm(&gateway.child);
    assert!(gateway.child.wait().await.unwrap().success());
}
