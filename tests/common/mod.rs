//! Test harness: a real server on 127.0.0.1:0 with a temporary data directory (in-process or
//! as the real binary), raw HTTP for the token endpoints, and a tungstenite WebSocket client.
#![allow(dead_code)]

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCode;
use tokio_tungstenite::tungstenite::Message;

pub mod cluster;
pub mod endpoint;
pub mod install;
pub mod stomp;

pub use sensorgate::config::{Config, DeveloperConfig};

pub const DEV: &str = "acme";
pub const KEY: &str = "acme-key";
pub const DEV2: &str = "globex";
pub const KEY2: &str = "globex-key";
/// Generous bound for anything a test waits on; tests never assert speed.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn config(dir: &Path) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        developers: vec![
            DeveloperConfig {
                id: DEV.into(),
                api_key: Some(KEY.into()),
                api_key_sha256: None,
                developer: None,
                prefixes: None,
            },
            DeveloperConfig {
                id: DEV2.into(),
                api_key: Some(KEY2.into()),
                api_key_sha256: None,
                developer: None,
                prefixes: None,
            },
        ],
        ..Config::default()
    }
}

/// An in-process server with its own data directory.
pub struct TestServer {
    pub server: Option<sensorgate::Server>,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        tweak(&mut c);
        let server = sensorgate::Server::start(c).await.expect("server starts");
        let addr = server.local_addr();
        Self {
            server: Some(server),
            addr,
            dir,
        }
    }

    pub async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await;
        }
    }

    pub async fn token(&self, path: &str) -> String {
        token(self.addr, path, DEV, KEY).await
    }

    pub async fn producer(&self, uid: &str) -> Client {
        Client::identified(
            self.addr,
            &self.token(&format!("/auth/user?id={uid}")).await,
            0,
        )
        .await
    }

    pub async fn consumer(&self) -> Client {
        Client::identified(self.addr, &self.token("/auth/developer").await, 1).await
    }

    pub async fn metrics(&self) -> String {
        http(self.addr, "GET", "/metrics", &[]).await.1
    }
}

/// A minimal HTTP/1.1 request over a fresh connection: (status, body).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    http_with_body(addr, method, path, headers, "").await
}

/// [`http`] with a request body.
pub async fn http_with_body(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

pub async fn token(addr: SocketAddr, path: &str, dev: &str, key: &str) -> String {
    let (status, body) = http(addr, "POST", path, &[("dev-id", dev), ("x-api-key", key)]).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["token"].as_str().unwrap().to_string()
}

pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// The next text message on any WebSocket client; pings are answered by the library as it
/// reads. Panics on close or timeout.
pub async fn recv_text(ws: &mut Ws) -> String {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame in time");
        match msg {
            Some(Ok(Message::Text(t))) => return t.to_string(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Reads until the server closes; returns the code, skipping any frames before it.
pub async fn closed(ws: &mut Ws) -> Closed {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("close in time");
        match msg {
            Some(Ok(Message::Close(Some(frame)))) => {
                return Closed::Code(u16::from(frame.code), frame.reason.to_string())
            }
            Some(Ok(Message::Close(None))) => return Closed::Code(1005, String::new()),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return Closed::Abrupt,
        }
    }
}

/// A WebSocket client speaking the opcode protocol.
pub struct Client {
    pub ws: Ws,
}

/// What a client saw when the connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Closed {
    Code(u16, String),
    /// No close frame: the TCP connection just ended.
    Abrupt,
}

/// A WebSocket over a socket with a small receive window: a client that stops reading fills
/// the server's socket after a few hundred KB instead of the tens of MB loopback's
/// autotuning would take.
pub async fn connect_small_window(url: &str) -> Ws {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let req = url.into_client_request().unwrap();
    let addr: SocketAddr = req.uri().authority().unwrap().as_str().parse().unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(addr).await.unwrap();
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
    let (ws, _) = tokio_tungstenite::client_async(req, stream)
        .await
        .expect("upgrade");
    ws
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/connect"))
            .await
            .expect("upgrade");
        Self::hello(ws).await
    }

    /// A consumer that can stop reading: see [`connect_small_window`].
    pub async fn consumer_small_window(addr: SocketAddr, token: &str) -> Self {
        let ws = connect_small_window(&format!("ws://{addr}/connect")).await;
        let mut c = Self::hello(ws).await;
        c.send(&format!(r#"{{"op":3,"d":{{"token":"{token}","type":1}}}}"#))
            .await;
        assert_eq!(c.recv().await, r#"{"op":4}"#);
        c
    }

    async fn hello(ws: Ws) -> Self {
        let mut c = Self { ws };
        let hello = c.recv_json().await;
        assert_eq!(hello["op"], 2, "HELLO first: {hello}");
        assert!(
            hello["d"]["heartbeat_interval"].as_u64().is_some(),
            "{hello}"
        );
        c
    }

    pub async fn identified(addr: SocketAddr, token: &str, kind: u8) -> Self {
        let mut c = Self::connect(addr).await;
        c.send(&format!(
            r#"{{"op":3,"d":{{"token":"{token}","type":{kind}}}}}"#
        ))
        .await;
        assert_eq!(c.recv().await, r#"{"op":4}"#);
        c
    }

    pub async fn send(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    pub async fn send_msg(&mut self, msg: Message) {
        self.ws.send(msg).await.expect("send");
    }

    /// The next text frame; panics on close or timeout.
    pub async fn recv(&mut self) -> String {
        recv_text(&mut self.ws).await
    }

    pub async fn recv_json(&mut self) -> Value {
        serde_json::from_str(&self.recv().await).unwrap()
    }

    /// Reads until the server closes; returns the code, skipping any frames before it.
    pub async fn closed(&mut self) -> Closed {
        closed(&mut self.ws).await
    }

    pub async fn close_code(&mut self) -> u16 {
        match self.closed().await {
            Closed::Code(c, _) => c,
            Closed::Abrupt => panic!("connection dropped without a close frame"),
        }
    }

    pub async fn submit(&mut self, t: &str, d: &str) {
        self.send(&format!(r#"{{"op":6,"t":"{t}","d":{d}}}"#)).await;
    }

    /// Heartbeat round trip: proves the server still serves this connection.
    pub async fn ping(&mut self) {
        self.send(r#"{"op":0}"#).await;
        assert_eq!(self.recv().await, r#"{"op":1}"#);
    }
}

/// One raw text frame: `first` starts a message (else a continuation), `fin` ends it.
pub fn fragment(data: &[u8], first: bool, fin: bool) -> Message {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    let op = if first { Data::Text } else { Data::Continue };
    Message::Frame(Frame::message(data.to_vec(), OpCode::Data(op), fin))
}

pub fn ws_close(code: u16) -> Message {
    Message::Close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: WsCode::from(code),
        reason: "".into(),
    }))
}

/// A `sensorgate` process, for kill -9 and SIGTERM tests.
pub struct Process {
    pub child: std::process::Child,
    pub addr: SocketAddr,
}

impl Process {
    /// Starts the binary with `config_path` and waits until it answers /healthz.
    pub async fn start(config_path: &Path, port: u16) -> Self {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_sensorgate"))
            .arg("--config")
            .arg(config_path)
            // SG_TEST_LOG=info shows what a node did while a test ran.
            .env(
                "SENSORGATE_LOG",
                std::env::var("SG_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("binary starts");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let started = std::time::Instant::now();
        loop {
            if let Ok(Ok(mut s)) =
                tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await
            {
                let _ = s
                    .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .await;
                let mut buf = Vec::new();
                if s.read_to_end(&mut buf).await.is_ok() && buf.starts_with(b"HTTP/1.1 200") {
                    break;
                }
            }
            assert!(started.elapsed() < WAIT, "server did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self { child, addr }
    }

    pub fn signal(&self, sig: &str) {
        signal(self.child.id(), sig);
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

/// Sends `sig` (a name: TERM, STOP, …) to process `pid`.
pub fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

/// A test that fails half-way leaves no server behind.
impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A slow disk for a running process: strace delays every write and sync by 150 ms, so a
/// test can land REPLAYs and a kill -9 inside a group commit instead of hoping to.
pub struct SlowDisk {
    child: std::process::Child,
}

impl SlowDisk {
    /// Attaches to `pid` and every thread it has or starts; returns once attached.
    pub async fn attach(pid: u32) -> Self {
        let child = std::process::Command::new("strace")
            .args(["-f", "-qq", "-o", "/dev/null", "-p", &pid.to_string()])
            .args(["-e", "trace=pwrite64,fdatasync,fsync"])
            .args(["-e", "inject=pwrite64,fdatasync,fsync:delay_enter=150000"])
            .spawn()
            .expect("strace runs (Debian package strace; .ci/run installs it)");
        let status = format!("/proc/{pid}/status");
        let started = std::time::Instant::now();
        loop {
            let text = std::fs::read_to_string(&status).unwrap_or_default();
            let traced = text
                .lines()
                .find_map(|l| l.strip_prefix("TracerPid:"))
                .is_some_and(|v| v.trim() != "0");
            if traced {
                break;
            }
            assert!(started.elapsed() < WAIT, "strace did not attach");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // -f reaches the other threads a moment after the first.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Self { child }
    }
}

impl Drop for SlowDisk {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port (bound and released; the process binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes a config file for a [`Process`].
pub fn write_config(dir: &Path, port: u16, extra: &str) -> PathBuf {
    let path = dir.join("sensorgate.toml");
    let text = format!(
        "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n{extra}\n[[developers]]\nid = \"{DEV}\"\napi_key = \"{KEY}\"\n",
        dir.join("data").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Parses a DISPATCH frame into (seq, uid, t, d-as-text).
pub fn dispatch(text: &str) -> (u64, String, String, String) {
    let v: Value = serde_json::from_str(text).unwrap();
    assert_eq!(v["op"], 5, "{text}");
    (
        v["seq"].as_u64().unwrap(),
        v["uid"].as_str().unwrap().into(),
        v["t"].as_str().unwrap().into(),
        v["d"].to_string(),
    )
}

/// The value of a metric line `name{labels} value` in a scrape, 0 when absent.
pub fn metric(scrape: &str, name_and_labels: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}
