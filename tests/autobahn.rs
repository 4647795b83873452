//! WebSocket conformance: the Autobahn TestSuite's cases (driven by `kosoku`, from PyPI,
//! pinned in `tests/autobahn/requirements.txt`) against `/connect`, `/stomp/websocket` and
//! `/stream` of a real server. None of them is an echo endpoint, so `tests/autobahn/judge.py`
//! judges each case on what a non-echo server can be judged on: pings and pongs, frames
//! that must be refused (reserved bits and opcodes, bad fragments, invalid UTF-8, invalid
//! close codes), the close handshake, and that every close carries a documented code.
//! Compression (12.*, 13.*) is not offered, so not tested; the performance cases (9.*) judge
//! nothing (they expect echoes of 64 KiB–16 MiB messages, all over `max_frame_bytes`).

mod common;

use common::*;
use std::path::{Path, PathBuf};

fn autobahn_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/autobahn")
}

async fn conformance(path: &str, endpoint: &str) {
    let dir = autobahn_dir();
    let python = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || install::venv(&dir)
    })
    .await
    .unwrap();
    let srv = TestServer::start().await;
    let reports = tempfile::tempdir().unwrap();
    let kosoku = python.with_file_name("kosoku");
    let run = tokio::process::Command::new(&kosoku)
        .args(["-x", "9.*", "-x", "12.*", "-x", "13.*", "-p", "2", "-o"])
        .arg(reports.path())
        .arg(format!("ws://{}{path}", srv.addr))
        .output();
    // kosoku exits non-zero whenever an echo is missing; the judge decides.
    let out = tokio::time::timeout(std::time::Duration::from_secs(300), run)
        .await
        .expect("kosoku finishes in time")
        .expect("kosoku starts");
    let judged = std::process::Command::new("python3")
        .arg(dir.join("judge.py"))
        .arg(reports.path())
        .arg(endpoint)
        .output()
        .expect("the judge runs");
    let verdict = String::from_utf8_lossy(&judged.stdout);
    assert!(
        judged.status.success(),
        "{verdict}\nkosoku said:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(verdict.contains(" 0 failed"), "{verdict}");
    // And the server still serves.
    srv.producer("after-autobahn").await.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autobahn_connect() {
    conformance("/connect", "connect").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autobahn_stomp() {
    conformance("/stomp/websocket", "stomp").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autobahn_stream() {
    conformance("/stream", "stream").await;
}
