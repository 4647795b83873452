//! Clients nobody here wrote, run unchanged against the real server: @stomp/stompjs (Node,
//! what most of seed 000's and 002's users run), stomp.py's WSStompConnection (which offers
//! no subprotocol), and seed 003's flow driven with `ws` exactly as BIMserver's JavaScript
//! API drives it. Their scripts live in `clients/`; the first run installs them from the
//! npm registry and PyPI at the versions pinned there, once, under a lock
//! (`common::install`).

mod common;

use common::*;
use std::path::{Path, PathBuf};

fn clients_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("clients")
        .join(name)
}

/// Installs @stomp/stompjs and ws from `package-lock.json` unless already there.
fn stompjs() -> PathBuf {
    let dir = clients_dir("stompjs");
    install::npm(&dir);
    dir.join("check.mjs")
}

/// Installs ws for the BIMserver flow from `package-lock.json` unless already there.
fn bimserver_flow() -> PathBuf {
    let dir = clients_dir("bimserver");
    install::npm(&dir);
    dir.join("flow.mjs")
}

/// A virtualenv with stomp.py from `requirements.txt`, unless already there.
fn stomppy() -> (PathBuf, PathBuf) {
    let dir = clients_dir("stomppy");
    (install::venv(&dir), dir.join("check.py"))
}

async fn output(cmd: &mut tokio::process::Command) -> (bool, String) {
    let out = tokio::time::timeout(WAIT, cmd.output())
        .await
        .expect("the client finishes in time")
        .expect("the client starts");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stompjs_runs_seed_000_and_002_topic_flows_unchanged() {
    let script = tokio::task::spawn_blocking(stompjs).await.unwrap();
    let srv = TestServer::start().await;
    let url = format!("ws://{}/stomp/websocket", srv.addr);
    let developer = srv.token("/auth/developer").await;
    let (ok, text) = output(
        tokio::process::Command::new("node")
            .arg(&script)
            .arg(&url)
            .arg(&developer),
    )
    .await;
    assert!(ok, "{text}");
    assert!(text.contains("OK stompjs"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stompjs_runs_seed_002_chat_services_unchanged() {
    let script = tokio::task::spawn_blocking(stompjs).await.unwrap();
    let chat = script.with_file_name("chat.mjs");
    // A window of one: a client whose ACKs did not settle would be closed (4009).
    let srv = TestServer::start_with(|c| c.stomp_max_unacked = 1).await;
    let employee = srv.token("/auth/user?id=e-1&employee=true").await;
    let customer = srv.token("/auth/user?id=c-1").await;
    let url = format!("ws://{}/api/v1/chat", srv.addr);
    let (ok, text) = output(
        tokio::process::Command::new("node")
            .arg(&chat)
            .arg(&url)
            .arg(&employee)
            .arg(&customer),
    )
    .await;
    assert!(ok, "{text}");
    assert!(text.contains("OK stompjs chat"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stomp_py_runs_seed_002_customer_flow_with_acks() {
    let (python, script) = tokio::task::spawn_blocking(stomppy).await.unwrap();
    // A window of one: a client whose ACKs did not settle would be closed (4009).
    let srv = TestServer::start_with(|c| c.stomp_max_unacked = 1).await;
    let customer = srv.token("/auth/user?id=c-1").await;
    let (ok, text) = output(
        tokio::process::Command::new(python)
            .arg(&script)
            .arg("127.0.0.1")
            .arg(srv.addr.port().to_string())
            .arg("/api/v1/chat")
            .arg("chat")
            .arg(&customer),
    )
    .await;
    assert!(ok, "{text}");
    assert!(text.contains("OK stomp.py chat"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stomp_py_runs_seed_000_flow_unchanged() {
    let (python, script) = tokio::task::spawn_blocking(stomppy).await.unwrap();
    let srv = TestServer::start().await;
    let (ok, text) = output(
        tokio::process::Command::new(python)
            .arg(&script)
            .arg("127.0.0.1")
            .arg(srv.addr.port().to_string())
            .arg("/stomp/websocket")
            .arg(srv.token("/auth/developer").await),
    )
    .await;
    assert!(ok, "{text}");
    assert!(text.contains("OK stomp.py"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bimserver_javascript_flow_registers_and_gets_progress_pushes() {
    let script = tokio::task::spawn_blocking(bimserver_flow).await.unwrap();
    let srv = TestServer::start_with(|c| c.endpoint_context_path = "/bimserver".into()).await;
    let token = srv.token("/auth/user?id=designer").await;
    let base = format!("http://{}/bimserver", srv.addr);
    let (ok, text) = output(
        tokio::process::Command::new("node")
            .arg(&script)
            .arg(&base)
            .arg(&token)
            .arg(DEV)
            .arg(KEY),
    )
    .await;
    assert!(ok, "{text}");
    assert!(text.contains("OK bimserver flow"), "{text}");
    let scrape = srv.metrics().await;
    assert!(
        metric(
            &scrape,
            "sensorgate_endpoint_pushes_total{method=\"progress\"}"
        ) >= 2.0
    );
}
