//! The real OpenAI Python SDK against a live gateway (`tests/sdk/smoke.py`).
//!
//! The SDK is installed into a virtual environment under the target directory on first
//! use. Without python3 or the package index this test fails: it never skips.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;
use tollgate_store::UsageStatus;

use crate::chat::{all_events, Plane, SLUG};
use crate::support::ok_json;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/smoke.py");

async fn run(program: &Path, args: &[&str]) -> std::process::Output {
    let output = tokio::time::timeout(
        Duration::from_secs(600),
        Command::new(program).args(args).output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{} {args:?} took over 10 minutes", program.display()))
    .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    output
}

fn assert_success(what: &str, output: &std::process::Output) {
    assert!(
        output.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A Python with the `openai` package: the venv's, created on first use.
async fn python_with_openai() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sdk-venv");
    let python = venv.join("bin").join("python");
    if !python.exists() {
        let venv_arg = venv.to_str().unwrap();
        let created = run(Path::new("python3"), &["-m", "venv", "--clear", venv_arg]).await;
        assert_success("python3 -m venv", &created);
    }
    let has_sdk = run(&python, &["-c", "import openai"]).await;
    if !has_sdk.status.success() {
        let installed = run(
            &python,
            &[
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "openai",
            ],
        )
        .await;
        assert_success("pip install openai", &installed);
    }
    python
}

#[tokio::test]
async fn the_openai_python_sdk_works_against_the_gateway() {
    let python = python_with_openai().await;

    let plane = Plane::start("echo?prompt_tokens=10&completion_tokens=4").await;
    let server = &plane.server;
    server.create_endpoint("acme/elsewhere", "echo").await;
    let revoked = server.create_key(&plane.group_id).await;
    let path = format!(
        "/v1/gateway/groups/{}/api_keys/{}",
        plane.group_id,
        &revoked[..16]
    );
    ok_json(server.delete(&path).send().await.unwrap()).await;

    let output = tokio::time::timeout(
        Duration::from_secs(120),
        Command::new(&python)
            .arg(SCRIPT)
            .env("TOLLGATE_BASE_URL", server.url("/v1"))
            .env("TOLLGATE_KEY", &plane.key)
            .env("TOLLGATE_REVOKED_KEY", &revoked)
            .env("TOLLGATE_SLUG", SLUG)
            .env("TOLLGATE_OTHER_SLUG", "acme/elsewhere")
            .output(),
    )
    .await
    .expect("smoke.py took over 2 minutes")
    .expect("running smoke.py");
    assert_success("smoke.py", &output);
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "smoke ok: 5 checks"
    );

    // One plain and two streamed completions were served and billed; nothing else.
    let events = all_events(server).await;
    assert_eq!(events.len(), 3, "{events:?}");
    for event in &events {
        assert_eq!(event.status, UsageStatus::Completed);
        assert_eq!((event.input_tokens, event.output_tokens), (10, 4));
        assert!(!event.is_estimated);
    }
    assert_eq!(server.mock.requests().len(), 3);
}
