//! sensorgate: a real-time WebSocket gateway for sensor readings.
//!
//! Producers SUBMIT readings, the gateway gives each a durable per-developer `seq` and
//! DISPATCHes it to that developer's consumers, who can REPLAY what they missed.
//!
//! # Architecture
//! ```text
//! main ──> server ──> conn ──> frontend   (wire protocols: pure, no I/O)
//!                        └──> hub ──> log (durable sequenced store: sled, or JetStream)
//! auth, metrics, config, shutdown: used by all, import nothing above them
//! ```
//! - [`config`]: schema, defaults, file + env + flags.
//! - [`server`]: the listener, connection cap, HTTP routes, WebSocket upgrades, the
//!   publish API.
//! - [`conn`]: one client's life in one task: the shared socket, then the opcode, STOMP or
//!   endpoint session on it; deadlines, close codes.
//! - [`frontend`]: the opcode protocol (seed 001), STOMP (seeds 000 and 002) and BIMserver's
//!   notification endpoint with its JSON API (seed 003): frames and session rules.
//! - [`hub`]: streams, seq assignment by one owner per stream, live topics, the endpoint
//!   registry and progress topics, fan-out, slow consumers, duplicate connections, retention;
//!   in cluster mode the stream owners on JetStream and the cluster-wide claims.
//! - [`log`]: the store traits and the sled implementation with group commit; the JetStream
//!   log of cluster mode.
//! - [`auth`]: developers, API keys, single-use tokens.
//!
//! A SUBMIT's path: socket → `conn` (frames parsed in place, size capped, fragments joined) →
//! `frontend::opcode` decode and session check → `hub` stream queue (waited on only when
//! full) → the stream owner assigns seqs, appends to `log`, commits → one shared DISPATCH
//! batch → each consumer's bounded outbox → its connection task, which writes everything
//! queued in one go.

#![forbid(unsafe_code)]

pub mod auth;
pub mod config;
pub mod conn;
pub mod frontend;
pub mod hub;
pub mod log;
pub mod metrics;
pub mod server;
pub mod shutdown;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::{Config, DeveloperConfig};
use crate::shutdown::Shutdown;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("store: {0}")]
    Store(#[from] log::LogError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    shutdown: Shutdown,
    drain_delay: Duration,
    task: JoinHandle<()>,
    /// The demo developer, when the config has none.
    pub demo: Option<DeveloperConfig>,
    /// Whether the demo developer was created by this start.
    pub demo_created: bool,
}

impl Server {
    /// Opens the store, binds the listener and starts serving.
    pub async fn start(config: Config) -> Result<Server, StartError> {
        let dir_err = |source| StartError::DataDir {
            path: config.data_dir.clone(),
            source,
        };
        std::fs::create_dir_all(&config.data_dir).map_err(dir_err)?;
        let secret = match &config.token_secret {
            Some(s) => s.as_bytes().to_vec(),
            None => auth::load_or_create_secret(&config.data_dir).map_err(dir_err)?,
        };
        let (developers, demo, demo_created) = if config.developers.is_empty() {
            let (demo, created) = auth::load_or_create_demo(&config.data_dir).map_err(dir_err)?;
            (vec![demo.clone()], Some(demo), created)
        } else {
            (config.developers.clone(), None, false)
        };
        let auth = Arc::new(
            auth::Auth::new(&developers, &secret, config.token_ttl_s)
                .with_publishers(&config.publishers)
                .with_developer_grants(&developers, &config.developer_publish_prefixes)
                .with_endpoint_tokens(&config.endpoint_tokens)
                .with_journal(&config.data_dir.join(auth::REDEEMED_DIR))
                .map_err(dir_err)?,
        );
        metrics::handles();
        metrics::worker_threads(tokio::runtime::Handle::current().metrics().num_workers());

        let hub = match &config.cluster {
            None => {
                let store = log::SledStore::open(
                    &config.data_dir.join("store"),
                    config.durability,
                    Duration::from_millis(config.fast_flush_interval_ms),
                )?;
                // Only strict mode waits for the commit thread between a SUBMIT and its
                // DISPATCH; in fast mode it runs behind, at the process's priority.
                let nice = config.commit_thread_nice;
                if config.durability == config::Durability::Strict && nice != 0 {
                    match store.set_commit_nice(nice) {
                        Ok(()) => tracing::info!(nice, "commit thread priority set"),
                        Err(e) => tracing::warn!(
                            nice,
                            error = %e,
                            "the commit thread keeps the process's priority (it needs CAP_SYS_NICE; commit_thread_nice = 0 silences this)"
                        ),
                    }
                }
                hub::Hub::new(Arc::new(store), hub::HubConfig::from(&config))
            }
            Some(cluster) => {
                let node_id = match &cluster.node_id {
                    Some(id) => id.clone(),
                    None => load_or_create_node_id(&config.data_dir).map_err(dir_err)?,
                };
                let retention = log::jetstream::Retention {
                    max_age_s: config.retention_max_age_s,
                    max_per_stream: config.retention_max_per_stream,
                };
                let js = log::jetstream::JetStream::connect(cluster, &node_id, retention).await?;
                tracing::info!(node = %node_id, nats = ?cluster.nats_urls, replicas = cluster.stream_replicas, "cluster mode: streams on JetStream");
                let claims = hub::claims::Claims::open(
                    &js,
                    &node_id,
                    cluster.stream_replicas,
                    config.token_ttl_s,
                    config.max_consumers_per_developer,
                )
                .await?;
                let link = hub::cluster::Cluster::new(
                    js,
                    claims,
                    node_id,
                    Duration::from_millis(cluster.publish_retry_ms),
                    cluster.max_acks_pending,
                );
                hub::Hub::cluster(Arc::new(link), hub::HubConfig::from(&config))
            }
        };
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;

        let shutdown = Shutdown::new();
        let ctx = Arc::new(conn::ConnCtx::new(
            auth,
            hub.clone(),
            shutdown.clone(),
            conn::Limits::from(&config),
        ));
        let app = Arc::new(server::App {
            ctx,
            handshake_timeout: Duration::from_millis(config.handshake_timeout_ms),
            max_connections: config.max_connections,
            max_unauthenticated: config.max_unauthenticated_connections,
            stomp_paths: config.stomp_paths.clone(),
            endpoint_context_path: config.endpoint_context_path.clone(),
            allowed_origins: config.allowed_origins.clone(),
            admin_listener: config.admin_listen.is_some(),
        });
        let admin = match config.admin_listen {
            Some(at) => Some(
                TcpListener::bind(at)
                    .await
                    .map_err(|source| StartError::Bind { addr: at, source })?,
            ),
            None => None,
        };
        let admin_addr = match &admin {
            Some(l) => Some(l.local_addr().map_err(|source| StartError::Bind {
                addr: config.listen,
                source,
            })?),
            None => None,
        };
        if let Some(l) = admin {
            tokio::spawn(server::admin_loop(l, app.clone()));
        }
        tracing::info!(%addr, admin = ?admin_addr, durability = ?config.durability, data_dir = %config.data_dir.display(), "listening");
        let grace = Duration::from_millis(config.shutdown_grace_ms);
        let task = tokio::spawn(run(listener, app, hub, shutdown.clone(), grace));
        Ok(Server {
            addr,
            admin_addr,
            shutdown,
            drain_delay: Duration::from_millis(config.drain_delay_ms),
            task,
            demo,
            demo_created,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin listener's address, when `admin_listen` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Drains as SIGTERM does: readiness off, `drain_delay_ms` of service, then stop
    /// accepting, close every client with 1001, last commit. Waits for all of it.
    pub async fn stop(self) {
        self.shutdown.mark_draining();
        tokio::time::sleep(self.drain_delay).await;
        self.shutdown.begin();
        let _ = self.task.await;
    }

    /// Serves until SIGTERM or SIGINT, then drains.
    pub async fn run_until_signal(self) {
        tokio::select! {
            _ = shutdown::signal() => {}
            _ = self.shutdown.cancelled() => {}
        }
        self.stop().await
    }
}

/// This node's cluster id: kept in `data_dir/node-id`, made up on first start.
fn load_or_create_node_id(dir: &std::path::Path) -> std::io::Result<String> {
    let path = dir.join("node-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if config::nats_safe(id.trim()) => return Ok(id.trim().to_owned()),
        Ok(_) => {
            return Err(std::io::Error::other(format!(
                "{} does not hold a node id (letters, digits, '_', '-')",
                path.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut bytes = [0u8; 6];
    getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
    let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let id = format!("node-{id}");
    std::fs::write(&path, &id)?;
    Ok(id)
}

async fn run(
    listener: TcpListener,
    app: Arc<server::App>,
    hub: hub::Hub,
    shutdown: Shutdown,
    grace: Duration,
) {
    let background = tokio::spawn(background(hub.clone(), shutdown.clone()));
    server::accept_loop(listener, app.clone()).await;
    // The token is cancelled: kick every connection (1001); any that registers later sees
    // the token and kicks itself.
    app.ctx.close_all();
    shutdown.tracker().close();
    if tokio::time::timeout(grace, shutdown.tracker().wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = shutdown.tracker().len(),
            "connections still open after the grace period"
        );
    }
    let _ = background.await;
    match tokio::time::timeout(grace, hub.close()).await {
        Ok(Ok(())) => tracing::info!("store closed; shutdown complete"),
        Ok(Err(e)) => tracing::error!(error = %e, "closing the store failed"),
        Err(_) => tracing::error!("closing the store timed out"),
    }
}

/// Histogram upkeep, retention, the `/v1/topic/heartbeat` ticks, and held progress pushes
/// and idle progress topics, until shutdown.
async fn background(hub: hub::Hub, shutdown: Shutdown) {
    let mut upkeep = tokio::time::interval(Duration::from_secs(5));
    // Held progress goes out at most a quarter window late.
    let window = hub.endpoints().limits().progress_interval_ms;
    let mut progress = tokio::time::interval(Duration::from_millis((window / 4).max(10)));
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retention = tokio::time::interval(Duration::from_secs(10));
    let beat_every = hub.chat().map_or(Duration::ZERO, |c| c.heartbeat_every());
    // A period of zero turns the ticks off; the interval then never fires.
    let mut beat = tokio::time::interval(if beat_every.is_zero() {
        Duration::from_secs(86_400 * 365)
    } else {
        beat_every
    });
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    beat.tick().await;
    loop {
        tokio::select! {
            _ = upkeep.tick() => metrics::upkeep(),
            _ = progress.tick(), if window > 0 => {
                let push = frontend::endpoint::frame::progress_push;
                hub.endpoints().flush_due(hub::now_ms(), hub.topics(), push);
            }
            _ = beat.tick(), if !beat_every.is_zero() => {
                if let Some(chat) = hub.chat() {
                    chat.heartbeat(hub::now_ms());
                }
            }
            _ = retention.tick() => {
                let expired = hub.endpoints().expire(hub::now_ms(), hub.topics());
                if expired > 0 {
                    tracing::debug!(expired, "idle progress topics dropped");
                }
                let hub = hub.clone();
                match tokio::task::spawn_blocking(move || hub.retain(hub::now_ms())).await {
                    Ok(Ok(0)) => {}
                    Ok(Ok(n)) => tracing::debug!(removed = n, "retention pass"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "retention pass failed"),
                    Err(e) => tracing::warn!(error = %e, "retention task failed"),
                }
            }
            _ = shutdown.cancelled() => return,
        }
    }
}
