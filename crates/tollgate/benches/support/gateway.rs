//! A `tollgate serve` process for the benchmark programs: this build's release binary on
//! its own database, with no `TOLLGATE_*` setting inherited from the caller's
//! environment, its log read line by line.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_tollgate");
pub const ADMIN_KEY: &str = "tgm_benchadminkeybenchadminkeybenchadminkey";

pub struct Gateway {
    pub child: Child,
    pub addr: String,
    pub lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// From spawning the process to its `tollgate listening` line.
    pub start_up: Duration,
}

impl Gateway {
    pub async fn start(db: &str) -> Gateway {
        let mut command = Command::new(BIN);
        for (name, _) in std::env::vars() {
            if name.starts_with("TOLLGATE_") {
                command.env_remove(name);
            }
        }
        let spawned = Instant::now();
        let mut child = command
            .args(["serve", "--listen", "127.0.0.1:0", "--database", db])
            .env("RUST_LOG", "info")
            .env("TOLLGATE_ADMIN_KEY", ADMIN_KEY)
            .env("TOLLGATE_ALLOW_PRIVATE_NETWORKS", "true")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let (send, mut lines) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                let _ = send.send(line);
            }
        });
        let addr = loop {
            let line = lines
                .recv()
                .await
                .expect("the gateway ended before listening");
            if let (true, Some(at)) = (line.contains("tollgate listening"), line.find("addr=")) {
                break line[at + 5..].split_whitespace().next().unwrap().to_owned();
            }
        };
        let start_up = spawned.elapsed();
        Gateway {
            child,
            addr,
            lines,
            start_up,
        }
    }

    /// The process's resident set size in bytes (`VmRSS` of /proc/PID/status).
    pub fn resident_bytes(&self) -> u64 {
        let pid = self.child.id().unwrap();
        let status = std::fs::read(format!("/proc/{pid}/status")).unwrap();
        let status = String::from_utf8_lossy(&status);
        let line = status
            .lines()
            .find(|line| line.starts_with("VmRSS:"))
            .unwrap();
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap();
        kib * 1024
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A management call with the admin key; the JSON of a 200.
    pub async fn manage(
        &self,
        http: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Value {
        let mut request = http
            .request(method, self.url(path))
            .header("Authorization", format!("Api-Key {ADMIN_KEY}"));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        assert_eq!(status, 200, "{path}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    /// SIGTERM; the `usage events flushed` line.
    pub async fn stop(&mut self) -> String {
        let pid = self.child.id().unwrap().to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(status.success());
        let mut flushed = None;
        while let Some(line) = self.lines.recv().await {
            if line.contains("usage events flushed") {
                flushed = Some(line);
            }
        }
        assert!(self.child.wait().await.unwrap().success());
        flushed.expect("no `usage events flushed` line")
    }
}

/// The number after `--name` on the command line, or `default`; anything else there (cargo
/// passes `--bench`) is ignored. A value that is not a number stops the program.
pub fn flag(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|arg| arg == name) {
        Some(at) => args
            .get(at + 1)
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("{name} N")),
        None => default,
    }
}
