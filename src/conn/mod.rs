//! One client's life on a WebSocket: the reader (this connection's task, which owns the
//! protocol session), the single writer task ([`writer`]) fed by a bounded control queue and
//! the hub's outbox, the IDENTIFY and heartbeat deadlines, and the close code at the end.
//!
//! Owns nothing shared: it borrows the hub, auth and limits through [`ConnCtx`]. Must not
//! parse protocol frames itself (the front-ends do) or touch the store (the hub does).

mod opcode;
mod wire;
mod writer;

use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

use crate::auth::Auth;
use crate::config::Config;
use crate::hub::Hub;
use crate::shutdown::Shutdown;

/// Replies (ACK, pong) a connection may have waiting for the writer before it is closed
/// with 4008: a client that sends but never reads cannot grow the server.
pub const CONTROL_QUEUE: usize = 64;
/// Time the writer gets to send a close frame before the connection is dropped.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The per-connection numbers from the config.
#[derive(Debug, Clone)]
pub struct Limits {
    pub heartbeat_interval_ms: u64,
    pub heartbeat_deadline: Duration,
    pub identify_timeout: Duration,
    pub max_frame_bytes: usize,
    pub replay_chunk: usize,
    pub submit_rate_per_s: u32,
}

impl From<&Config> for Limits {
    fn from(c: &Config) -> Self {
        Self {
            heartbeat_interval_ms: c.heartbeat_interval_ms,
            heartbeat_deadline: c.heartbeat_deadline(),
            identify_timeout: Duration::from_millis(c.identify_timeout_ms),
            max_frame_bytes: c.max_frame_bytes,
            replay_chunk: c.replay_chunk,
            submit_rate_per_s: c.submit_rate_per_s,
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
}

impl ConnCtx {
    pub fn new(auth: Arc<Auth>, hub: Hub, shutdown: Shutdown, limits: Limits) -> Self {
        Self {
            auth,
            hub,
            shutdown,
            limits,
            next_id: AtomicU64::new(1),
        }
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Serves the opcode protocol on an upgraded socket. `leftover` holds bytes the client sent
/// right behind its upgrade request.
pub async fn serve_opcode(ctx: Arc<ConnCtx>, stream: TcpStream, leftover: Bytes) {
    opcode::run(ctx, stream, leftover).await
}
