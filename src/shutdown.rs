//! Shutdown as a feature: one cancellation token every task watches, one tracker every
//! connection registers with, and the signal handling that starts the drain.
//!
//! Owns no sockets and no store; the server decides what "close" means for each part.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Shared by the accept loop, every connection and the background tasks.
#[derive(Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    tracker: TaskTracker,
    draining: Arc<AtomicBool>,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Turns readiness false while still serving, so a load balancer stops sending new
    /// clients before the listener closes.
    pub fn mark_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Starts the drain: readiness turns false and every watcher of the token wakes.
    pub fn begin(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.token.cancel();
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Connections are spawned here so the drain can wait for them; hyper's own graceful
    /// shutdown does not see upgraded sockets.
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// Resolves when cancellation has begun.
    pub async fn cancelled(&self) {
        self.token.cancelled().await
    }
}

/// Resolves on the first SIGTERM or SIGINT (Ctrl-C).
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; only SIGINT stops the server");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
