//! One client's life on a WebSocket: one task per connection that owns the socket
//! ([`socket`], shared by every protocol), the protocol session, the deliveries owed
//! ([`delivery`]), the deadlines, and the close code at the end. Three protocols live here:
//! the opcode relay, STOMP, and seed 003's notification endpoint.
//!
//! Owns nothing shared: it borrows the hub, auth and limits through [`ConnCtx`], which also
//! keeps every live connection's [`Kick`] so shutdown can reach them. Must not parse
//! protocol frames itself (the front-ends do) or touch the store (the hub does).

mod delivery;
mod endpoint;
mod opcode;
mod socket;
mod stomp;
pub mod wire;

use bytes::Bytes;
use dashmap::DashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::auth::Auth;
use crate::config::{Config, StompRule};
use crate::frontend::CloseCode;
use crate::hub::{Hub, Inbox, Kick, KickReason, TopicDelivery};
use crate::shutdown::Shutdown;

/// Replies (ACK, pong) a connection may have waiting unsent before it is closed with 4008:
/// a client that sends but never reads cannot grow the server.
pub const REPLY_BACKLOG: usize = 64;
/// Time the writer gets to send a close frame before the connection is dropped.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The per-connection numbers from the config.
#[derive(Debug, Clone)]
pub struct Limits {
    pub heartbeat_interval_ms: u64,
    pub heartbeat_deadline: Duration,
    pub identify_timeout: Duration,
    pub max_frame_bytes: usize,
    pub stomp_heart_beat_ms: u64,
    pub stomp_max_headers: usize,
    pub stomp_max_header_line: usize,
    pub stomp_max_subscriptions: usize,
    pub stomp_anonymous: bool,
    pub stomp_rules: Arc<[StompRule]>,
    pub stomp_broker_prefixes: Arc<[String]>,
    pub stomp_app_prefixes: Arc<[String]>,
    pub stomp_max_pending_bytes: usize,
    pub stomp_max_unacked: usize,
    pub stomp_publish_wait: Duration,
    pub stomp_idle_timeout: Duration,
    pub replay_chunk: usize,
    pub consumer_stall_timeout: Duration,
    pub submit_rate_per_s: u32,
    pub endpoint_idle_timeout: Duration,
}

impl From<&Config> for Limits {
    fn from(c: &Config) -> Self {
        Self {
            heartbeat_interval_ms: c.heartbeat_interval_ms,
            heartbeat_deadline: c.heartbeat_deadline(),
            identify_timeout: Duration::from_millis(c.identify_timeout_ms),
            max_frame_bytes: c.max_frame_bytes,
            stomp_heart_beat_ms: c.stomp_heart_beat_ms,
            stomp_max_headers: c.stomp_max_headers,
            stomp_max_header_line: c.stomp_max_header_line,
            stomp_max_subscriptions: c.stomp_max_subscriptions,
            stomp_anonymous: c.stomp_anonymous,
            stomp_rules: c.stomp_rules.clone().into(),
            stomp_broker_prefixes: c.stomp_broker_prefixes.clone().into(),
            stomp_app_prefixes: c.stomp_app_prefixes.clone().into(),
            stomp_max_pending_bytes: c.stomp_max_pending_bytes,
            stomp_max_unacked: c.stomp_max_unacked,
            stomp_publish_wait: Duration::from_millis(c.stomp_publish_wait_ms),
            stomp_idle_timeout: Duration::from_millis(c.stomp_idle_timeout_ms),
            replay_chunk: c.replay_chunk,
            consumer_stall_timeout: Duration::from_millis(c.consumer_stall_timeout_ms),
            submit_rate_per_s: c.submit_rate_per_s,
            endpoint_idle_timeout: Duration::from_millis(c.endpoint_idle_timeout_ms),
        }
    }
}

/// What every connection shares.
pub struct ConnCtx {
    pub auth: Arc<Auth>,
    pub hub: Hub,
    pub shutdown: Shutdown,
    pub limits: Limits,
    next_id: AtomicU64,
    /// Every open connection's off switch, for shutdown.
    kicks: DashMap<u64, Arc<Kick>>,
}

impl ConnCtx {
    pub fn new(auth: Arc<Auth>, hub: Hub, shutdown: Shutdown, limits: Limits) -> Self {
        Self {
            auth,
            hub,
            shutdown,
            limits,
            next_id: AtomicU64::new(1),
            kicks: DashMap::new(),
        }
    }

    /// A new connection: its id and off switch, counted and reachable by
    /// [`ConnCtx::close_all`]. One that opens after shutdown began is kicked at once.
    fn open(&self) -> (u64, Arc<Kick>) {
        crate::metrics::handles().connections_opened.increment(1);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let kick = Kick::new();
        self.kicks.insert(id, kick.clone());
        if self.shutdown.token().is_cancelled() {
            kick.kick(KickReason::Shutdown);
        }
        (id, kick)
    }

    /// The one inbox a connection's topic subscriptions (STOMP topics, endpoint pushes)
    /// deliver to, bounded by `consumer_queue_max` and `stomp_max_pending_bytes`.
    fn topic_inbox(
        &self,
        id: u64,
        kick: &Arc<Kick>,
    ) -> (Inbox, mpsc::UnboundedReceiver<TopicDelivery>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let inbox = Inbox {
            conn: id,
            tx,
            outbox: self.hub.outbox_bytes(self.limits.stomp_max_pending_bytes),
            kick: kick.clone(),
        };
        (inbox, rx)
    }

    fn unregister(&self, id: u64) {
        self.kicks.remove(&id);
    }

    /// Asks every open connection to close with 1001.
    pub fn close_all(&self) {
        for entry in self.kicks.iter() {
            entry.value().kick(KickReason::Shutdown);
        }
    }

    /// Open connections (upgraded, not yet closed).
    pub fn open_connections(&self) -> usize {
        self.kicks.len()
    }
}

/// The close code for a connection the hub kicked.
fn kicked(reason: KickReason) -> socket::End {
    match reason {
        KickReason::Duplicate => CloseCode::Duplicate.into(),
        KickReason::TooSlow => CloseCode::TooSlow.into(),
        KickReason::StoreFailed => CloseCode::Internal.into(),
        KickReason::Shutdown => CloseCode::GoingAway.into(),
    }
}

/// A connection's place in `max_unauthenticated_connections`, taken at accept. The
/// connection gives it back once its client authenticates (IDENTIFY, a STOMP token, an
/// endpoint token); HTTP connections and anonymous STOMP clients keep it to the end.
pub struct Unauthenticated {
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Unauthenticated {
    pub fn new(permit: tokio::sync::OwnedSemaphorePermit) -> Self {
        crate::metrics::handles().unauthenticated.increment(1.0);
        Self { _permit: permit }
    }
}

impl Drop for Unauthenticated {
    fn drop(&mut self) {
        crate::metrics::handles().unauthenticated.decrement(1.0);
    }
}

/// A socket the HTTP side upgraded: the stream, the bytes the client sent right behind its
/// upgrade request, and its place among the unauthenticated.
pub struct Upgraded {
    pub stream: TcpStream,
    pub leftover: Bytes,
    pub unauthenticated: Option<Unauthenticated>,
}

/// Serves the opcode protocol on an upgraded socket.
pub async fn serve_opcode(ctx: Arc<ConnCtx>, socket: Upgraded) {
    opcode::run(ctx, socket).await
}

/// Serves seed 003's notification endpoint (`/stream`) on an upgraded socket.
pub async fn serve_endpoint(ctx: Arc<ConnCtx>, socket: Upgraded) {
    endpoint::run(ctx, socket).await
}

pub use endpoint::execute as execute_json;

/// Serves STOMP on an upgraded socket. `bearer` is a token from the upgrade request's
/// `Authorization: Bearer` header, for clients that authenticate there (seed 002).
pub async fn serve_stomp(ctx: Arc<ConnCtx>, socket: Upgraded, bearer: Option<String>) {
    stomp::run(ctx, socket, bearer).await
}
